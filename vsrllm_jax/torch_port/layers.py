"""Torch mirrors of ``vsrllm_jax/models/layers.py``: same names, same math.

Unlike flax, torch modules are built before they see an input, so every
module takes its input widths as arguments. Parameter names and layouts are
what ``vsrllm_jax.formats.torch_layout`` writes: our Dense is an ``nn.Linear``
(weight [prod(out), prod(in)]), norms have ``weight`` (and ``bias``).

The compute dtype is the dtype of a module's parameters: cast a module with
``.to(torch.bfloat16)`` as ours runs with ``dtype=bfloat16``; norms and the
attention softmax compute in fp32, as ours do.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (int(x),) if isinstance(x, int) else tuple(int(v) for v in x)


class Dense(nn.Linear):
  """Our ``layers.Dense`` as an ``nn.Linear`` over flattened axes.

  ``in_shape``: the sizes of the contracted input axes ``axis`` (in that
  order); ``features``: int or tuple, the output's trailing shape (e.g.
  ``(heads, head_dim)``). As ours, the output is x's other axes, in order,
  followed by ``features``.
  """

  def __init__(self, in_shape: int | Sequence[int], features: int | Sequence[int], *,
               axis: int | Sequence[int] = -1, bias: bool = True):
    self.in_shape, self.features, self.axis = _tuple(in_shape), _tuple(features), _tuple(axis)
    if len(self.axis) != len(self.in_shape):
      raise ValueError(f"Dense: axis {self.axis} and in_shape {self.in_shape} must have the "
                       "same length")
    super().__init__(math.prod(self.in_shape), math.prod(self.features), bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    axis = tuple(a % x.ndim for a in self.axis)
    shape = tuple(x.shape[a] for a in axis)
    if shape != self.in_shape:
      raise ValueError(f"Dense expects sizes {self.in_shape} on axes {self.axis}; got input "
                       f"{tuple(x.shape)}")
    rest = [d for d in range(x.ndim) if d not in axis]
    order = rest + list(axis)
    if order != list(range(x.ndim)):
      x = x.permute(*order)
    batch = x.shape[:len(rest)]
    y = F.linear(x.reshape(*batch, self.in_features).to(self.weight.dtype), self.weight,
                 self.bias)
    return y.reshape(*batch, *self.features)


class LayerNorm(nn.LayerNorm):
  """Our LayerNorm: eps 1e-5, computed in fp32, output in the params' dtype."""

  def __init__(self, dim: int, eps: float = 1e-5):
    super().__init__(dim, eps=eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                     self.eps)
    return y.to(self.weight.dtype)


def activation_fn(name: str):
  """Our Mlp's activations; 'gelu' is the exact (erf) GELU, as ours."""
  table = {"gelu": lambda z: F.gelu(z, approximate="none"),
           "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
           "silu": F.silu, "relu": F.relu}
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
  return table[name]


def attention_weights_mask(key_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
  """Boolean mask [B, 1, Sq, Sk] from key validity (and causality), as ours."""
  mask = key_mask.bool()[:, None, None, :]
  if causal:
    s = key_mask.shape[-1]
    mask = mask & torch.tril(torch.ones(s, s, dtype=torch.bool, device=key_mask.device))
  return mask


def dot_product_attention(q, k, v, mask):
  """Grouped-query attention, softmax in fp32.

  q [B, Sq, H, D]; k, v [B, Sk, Hkv, D]; mask bool broadcastable to [B, H, Sq, Sk].
  Masked logits become fp32's minimum (not -inf), as ours: a row with no
  valid key then averages all keys uniformly instead of giving NaN.
  """
  b, sq, h, d = q.shape
  hkv, sk = k.shape[2], k.shape[1]
  groups = h // hkv
  q = q.reshape(b, sq, hkv, groups, d)
  logits = torch.einsum("bqkgd,bskd->bkgqs", q.float(), k.float()) / math.sqrt(d)
  mask = torch.broadcast_to(mask, (b, h, sq, sk)).reshape(b, hkv, groups, sq, sk)
  logits = logits.masked_fill(~mask, torch.finfo(torch.float32).min)
  probs = torch.softmax(logits, dim=-1).to(v.dtype)
  out = torch.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, sq, h, d)


class MultiHeadAttention(nn.Module):
  """Bidirectional attention from x [B, Sq, width] to context [B, Sk, context_dim].

  Submodules ``query``, ``key``, ``value`` (-> [heads, head_dim]) and ``out``.
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, *,
               context_dim: int | None = None, use_bias: bool = True):
    super().__init__()
    shape = (num_heads, head_dim)
    context_dim = context_dim or width
    self.query = Dense(width, shape, bias=use_bias)
    self.key = Dense(context_dim, shape, bias=use_bias)
    self.value = Dense(context_dim, shape, bias=use_bias)
    self.out = Dense(shape, width, axis=(-2, -1), bias=use_bias)

  def forward(self, x, key_mask, context=None):
    context = x if context is None else context
    q, k, v = self.query(x), self.key(context), self.value(context)
    return self.out(dot_product_attention(q, k, v, attention_weights_mask(key_mask)))


class Mlp(nn.Module):
  """Dense-act-Dense (``wi``, ``wo``), or gated with ``wg`` (SwiGLU / GeGLU)."""

  def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, *,
               activation: str = "gelu", gated: bool = False, use_bias: bool = True):
    super().__init__()
    activation_fn(activation)            # fails early on an unknown name
    self.activation = activation
    self.wi = Dense(in_dim, hidden_dim, bias=use_bias)
    self.wg = Dense(in_dim, hidden_dim, bias=use_bias) if gated else None
    self.wo = Dense(hidden_dim, out_dim or in_dim, bias=use_bias)

  def forward(self, x):
    h = activation_fn(self.activation)(self.wi(x))
    if self.wg is not None:
      h = h * self.wg(x)
    return self.wo(h)


class TransformerLayer(nn.Module):
  """Pre-LN layer: self-attention, optional cross-attention to ``context``, MLP."""

  def __init__(self, width: int, num_heads: int, head_dim: int, mlp_dim: int, *,
               cross_attention: bool = False, context_dim: int | None = None):
    super().__init__()
    self.attn_norm = LayerNorm(width)
    self.attn = MultiHeadAttention(width, num_heads, head_dim)
    if cross_attention:
      self.cross_norm = LayerNorm(width)
      self.cross = MultiHeadAttention(width, num_heads, head_dim, context_dim=context_dim)
    self.cross_attention = cross_attention
    self.mlp_norm = LayerNorm(width)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, x, mask, context=None, context_mask=None):
    x = x + self.attn(self.attn_norm(x), mask)
    if self.cross_attention:
      if context is None or context_mask is None:
        raise ValueError("TransformerLayer(cross_attention=True) needs context and context_mask")
      x = x + self.cross(self.cross_norm(x), context_mask, context)
    return x + self.mlp(self.mlp_norm(x))


class TransformerStack(nn.Module):
  """``num_layers`` TransformerLayers in ``layers`` (ours scans them). [B, S, E] -> [B, S, E]."""

  def __init__(self, num_layers: int, width: int, num_heads: int, head_dim: int, mlp_dim: int,
               *, cross_attention: bool = False, context_dim: int | None = None):
    super().__init__()
    self.layers = nn.ModuleList(
        TransformerLayer(width, num_heads, head_dim, mlp_dim, cross_attention=cross_attention,
                         context_dim=context_dim) for _ in range(num_layers))

  def forward(self, x, mask, context=None, context_mask=None):
    for layer in self.layers:
      x = layer(x, mask, context, context_mask)
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
  """Mean of x over ``dim`` counting only positions where ``mask`` is set (0 if none)."""
  m = mask.to(x.dtype)
  m = m.reshape(m.shape + (1,) * (x.ndim - m.ndim))
  return torch.sum(x * m, dim=dim) / torch.clamp(torch.sum(m, dim=dim), min=1)


def masked_temporal_pool(x: torch.Tensor, mask: torch.Tensor, window: int):
  """Mean over non-overlapping windows of real frames, as ours.

  x [B, T, D], mask [B, T] -> ([B, ceil(T/w), D], [B, ceil(T/w)]); a window
  is real if it holds at least one real frame.
  """
  if window == 1:
    return x, mask.bool()
  b, t, d = x.shape
  pad = (-t) % window
  x = F.pad(x, (0, 0, 0, pad))
  m = F.pad(mask.to(x.dtype), (0, pad))
  x = x.reshape(b, -1, window, d)
  m = m.reshape(b, -1, window)
  total = torch.sum(x * m[..., None], dim=2)
  count = torch.sum(m, dim=2)
  return total / torch.clamp(count, min=1)[..., None], count > 0


def sinusoid(positions: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
  """Ours (projectors/multiscale_contrastive.py): frame times [...] -> [..., 2 * (dim // 2)]."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half, 1))
  angles = positions[..., None].float() * freqs.to(positions.device)
  return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
