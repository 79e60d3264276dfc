"""Shared building blocks: every model in the package is composed from these.

Each parameter carries logical axis names (flax partitioning), so that the
sharding rules in the config decide where it lives. The vocabulary of logical
names used across the package:

  embed      model width (LLM hidden, encoder width, projector width)
  mlp        feed-forward hidden width
  heads      query heads;  kv_heads  key/value heads;  head_dim  per-head width
  vocab      vocabulary
  layers     the stacked axis that ``nn.scan`` adds over layers
  queries    learnable query / output tokens of a projector
  conv_*     convolution kernels (small, replicated)
  features   the encoder-feature width entering a projector

Activations use ``batch`` and ``length`` in addition.

Every module has ``dtype`` (compute) and ``param_dtype`` (storage).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def with_axes(init: Callable, axes: Axes) -> Callable:
  """An initializer that tags the parameter with logical axis names."""
  return nn.with_logical_partitioning(init, axes)


class Dense(nn.Module):
  """A Dense layer whose kernel/bias carry logical axis names.

  ``features`` may be an int or a tuple (then the output is reshaped, e.g.
  ``(heads, head_dim)``); ``axis`` picks the contracted input axes.
  """
  features: int | Sequence[int]
  kernel_axes: Axes
  use_bias: bool = True
  axis: int | Sequence[int] = -1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    in_shape = tuple(x.shape[a] for a in axis)
    kernel = self.param("kernel", with_axes(self.kernel_init, self.kernel_axes),
                        in_shape + features, self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    contract = tuple(range(len(axis)))
    y = jax.lax.dot_general(x, kernel, ((axis, contract), ((), ())))
    if self.use_bias:
      bias_axes = self.kernel_axes[len(axis):]
      bias = self.param("bias", with_axes(nn.initializers.zeros, bias_axes), features,
                        self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def hf_rms_norm(x, w, *, epsilon: float, offset: float, dtype):
  """RMSNorm of x [..., E] with weight w [E] as transformers' Llama-family models
  compute it.

  Llama: ``w * normed.astype(dtype)``. Gemma (``offset=1``): ``normed * (1 + w)``
  in float32, then cast.
  """
  xf = x.astype(jnp.float32)
  normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + epsilon)
  if offset:
    return (normed * (offset + w.astype(jnp.float32))).astype(dtype)
  return w.astype(dtype) * normed.astype(dtype)


class LayerNorm(nn.Module):
  """LayerNorm with logically named scale and bias (computed in fp32)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
    bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
    xf = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
    return jnp.asarray(y, self.dtype)


def attention_weights_mask(query_mask: jax.Array | None, key_mask: jax.Array,
                           causal: bool = False) -> jax.Array:
  """Boolean mask [B, 1, Sq, Sk]: which keys each query may attend to.

  Only key validity and causality restrict attention; padded queries still
  attend to valid keys (their outputs are ignored downstream), which keeps
  every softmax row non-empty.
  """
  del query_mask
  mask = key_mask[:, None, None, :].astype(bool)
  if causal:
    sq = sk = key_mask.shape[-1]
    mask = mask & jnp.tril(jnp.ones((sq, sk), bool))[None, None]
  return mask


def dot_product_attention(q, k, v, mask, *, dtype=jnp.float32, cache_layout=False):
  """Grouped-query attention.

  q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] with H a multiple of Hkv;
  mask: bool, broadcastable to [B, H, Sq, Sk]. Softmax in fp32.
  ``cache_layout`` (the KV cache's): k [B, Hkv, D, Sk] and v [B, Hkv, Sk, D],
  so that both score matmuls read the cache in their natural order, with no
  transposed copy of it per token (``grouped_attention``).
  Returns [B, Sq, H, D].
  """
  b, sq, h, d = q.shape
  hkv = k.shape[1] if cache_layout else k.shape[2]
  q = q.reshape(b, sq, hkv, h // hkv, d)
  if cache_layout:   # a small transpose of q before, and of the output after
    out = grouped_attention(jnp.transpose(q, (0, 2, 3, 1, 4)), k, v, mask, dtype=dtype)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, sq, h, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  out = jnp.einsum("bkgqs,bskd->bqkgd", _attention_probs(logits, mask, d, dtype), v.astype(dtype))
  return out.reshape(b, sq, h, d)


def grouped_attention(q, k, v, mask, *, dtype=jnp.float32):
  """The cache-layout core: batch axes (b, k) leading on every side, so both
  matmuls are plain batched ones in the operands' natural order.

  q [B, Hkv, G, Sq, D]; k [B, Hkv, D, Sk]; v [B, Hkv, Sk, D]; mask broadcastable
  to [B, Hkv * G, Sq, Sk]. Returns [B, Hkv, G, Sq, D].
  """
  logits = jnp.einsum("bkgqd,bkds->bkgqs", q, k, preferred_element_type=jnp.float32)
  return jnp.einsum("bkgqs,bksd->bkgqd", _attention_probs(logits, mask, q.shape[-1], dtype),
                    v.astype(dtype))


def _attention_probs(logits, mask, head_dim: int, dtype):
  """Scaled, masked fp32 softmax of logits [B, Hkv, G, Sq, Sk] -> probs in ``dtype``."""
  b, hkv, groups, sq, sk = logits.shape
  logits = logits / jnp.sqrt(jnp.float32(head_dim))
  mask = jnp.broadcast_to(mask, (b, hkv * groups, sq, sk)).reshape(logits.shape)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


class MultiHeadAttention(nn.Module):
  """Bidirectional multi-head attention from ``x`` to ``context`` (default self).

  x: [B, Sq, E]; context: [B, Sk, Ec]; key_mask: [B, Sk] bool.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask, context=None):
    context = x if context is None else context
    dense = lambda f, axes, name, **kw: Dense(f, axes, use_bias=self.use_bias, dtype=self.dtype,
                                              param_dtype=self.param_dtype, name=name, **kw)
    shape = (self.num_heads, self.head_dim)
    q = dense(shape, ("embed", "heads", "head_dim"), "query")(x)
    k = dense(shape, ("embed", "heads", "head_dim"), "key")(context)
    v = dense(shape, ("embed", "heads", "head_dim"), "value")(context)
    mask = attention_weights_mask(None, key_mask)
    out = dot_product_attention(q, k, v, mask, dtype=self.dtype)
    return dense(x.shape[-1], ("heads", "head_dim", "embed"), "out", axis=(-2, -1))(out)


class Mlp(nn.Module):
  """Feed-forward block: Dense-act-Dense, or gated (SwiGLU / GeGLU)."""
  hidden_dim: int
  out_dim: int | None = None
  activation: str = "gelu"  # gelu | silu | relu
  gated: bool = False
  use_bias: bool = True
  in_axis_name: str = "embed"
  out_axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = {"gelu": lambda z: nn.gelu(z, approximate=False),
           "gelu_tanh": lambda z: nn.gelu(z, approximate=True),
           "silu": nn.silu, "relu": nn.relu}[self.activation]
    out_dim = self.out_dim or x.shape[-1]
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.hidden_dim, (self.in_axis_name, "mlp"), name="wi", **kw)(x)
    if self.gated:
      h = act(h) * Dense(self.hidden_dim, (self.in_axis_name, "mlp"), name="wg", **kw)(x)
    else:
      h = act(h)
    return Dense(out_dim, ("mlp", self.out_axis_name), name="wo", **kw)(h)


class TransformerLayer(nn.Module):
  """Pre-LN Transformer layer: self-attention (masked) then MLP.

  With ``cross_attention`` a cross-attention sub-block to ``context`` sits
  between them. Returns ``(x, None)`` so that it can be scanned directly.
  x: [B, S, E]; mask: [B, S]; context: [B, Sc, Ec]; context_mask: [B, Sc].
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, context=None, context_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(name="attn_norm", **kw)(x)
    x = x + MultiHeadAttention(self.num_heads, self.head_dim, name="attn", **kw)(h, mask)
    if self.cross_attention:
      h = LayerNorm(name="cross_norm", **kw)(x)
      x = x + MultiHeadAttention(self.num_heads, self.head_dim, name="cross", **kw)(
          h, context_mask, context)
    h = LayerNorm(name="mlp_norm", **kw)(x)
    return x + Mlp(self.mlp_dim, name="mlp", **kw)(h), None


_UNROLL_SCANS = contextvars.ContextVar("unroll_scans", default=False)


@contextlib.contextmanager
def unrolled_scans():
  """Layer stacks built inside unroll their ``nn.scan`` fully: XLA's cost analysis
  counts a loop body once, so FLOP counting (``throughput``) lowers them unrolled."""
  token = _UNROLL_SCANS.set(True)
  try:
    yield
  finally:
    _UNROLL_SCANS.reset(token)


def scan_layers(layer_cls: type[nn.Module], num_layers: int, *, num_broadcast: int,
                remat_policy: str = "none", unroll: int = 1) -> type[nn.Module]:
  """``nn.scan`` over ``num_layers`` copies of ``layer_cls`` (params stacked on 'layers').

  The layer is called as ``layer(carry, *broadcast_args) -> (carry, None)``;
  compile time stays flat in depth. ``remat_policy`` is 'none', 'full' or a
  name in ``jax.checkpoint_policies`` (e.g. 'dots_with_no_batch_dims_saveable').
  ``unroll`` layers run per loop iteration (num_layers: no loop; on GPUs that
  saves stacking each layer's residuals into [L, ...] buffers, at compile time).
  """
  if remat_policy != "none":
    policy = None if remat_policy == "full" else getattr(jax.checkpoint_policies, remat_policy)
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=False)
  return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * num_broadcast, length=num_layers,
                 unroll=num_layers if _UNROLL_SCANS.get() else unroll,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class TransformerStack(nn.Module):
  """``num_layers`` TransformerLayers under ``nn.scan``. x: [B, S, E] -> [B, S, E]."""
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  cross_attention: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, context=None, context_mask=None):
    stack = scan_layers(TransformerLayer, self.num_layers, num_broadcast=3,
                        remat_policy=self.remat_policy)
    x, _ = stack(self.num_heads, self.head_dim, self.mlp_dim, self.cross_attention,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="layers")(
                     x, mask, context, context_mask)
    return x


def masked_mean(x: jax.Array, mask: jax.Array, axis: int = 1) -> jax.Array:
  """Mean of ``x`` over ``axis`` counting only positions where ``mask`` is set."""
  m = mask.astype(x.dtype)
  m = m.reshape(m.shape + (1,) * (x.ndim - m.ndim))
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1)


def masked_temporal_pool(x: jax.Array, mask: jax.Array, window: int):
  """Mean over non-overlapping windows of real frames.

  x [B, T, D], mask [B, T] -> ([B, ceil(T/w), D], [B, ceil(T/w)]); a window
  is real if it holds at least one real frame.
  """
  if window == 1:
    return x, mask.astype(bool)
  b, t, d = x.shape
  pad = (-t) % window
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  m = jnp.pad(mask.astype(x.dtype), ((0, 0), (0, pad)))
  x = x.reshape(b, -1, window, d)
  m = m.reshape(b, -1, window)
  total = jnp.sum(x * m[..., None], axis=2)
  count = jnp.sum(m, axis=2)
  return total / jnp.maximum(count, 1)[..., None], count > 0


def dtype_from_name(name: str | Dtype) -> Dtype:
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype (dtypes pass through)."""
  if not isinstance(name, str):
    return name
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
  return table[name]
