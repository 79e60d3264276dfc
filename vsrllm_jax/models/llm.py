"""The frozen LLM: one Flax decoder for Llama-family checkpoints, loadable from HF.

Covers what transformers runs as Llama 2/3/3.1/3.2 (``rope_type`` default,
linear, llama3), Mistral (sliding window on every layer), Qwen2/2.5 (q/k/v
bias; ``use_sliding_window`` with ``max_window_layers`` or ``layer_types``)
and Gemma 1 (embeddings * sqrt(hidden), ``(1 + w)`` RMSNorm, GeGLU, own
head_dim, tied head). Config fields that would change the math and are not
implemented (Gemma 2/3, soft-capping, partial rotary, MLP bias, other rope
types, ...) raise. Checkpoint I/O lives in ``hf_checkpoint``. Layers run
under ``nn.scan`` (compile time flat in depth); per-layer windows come from a
constant table indexed by the carried layer number. Pure: the KV cache is a
pytree passed in and returned. Positions count real tokens only, so padding
anywhere (the composed model pads inside ``[instruction][visual][label]``)
neither shifts positions nor receives attention.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax.models import rope
from vsrllm_jax.models.layers import Dense, default_kernel_init, dot_product_attention, \
    dtype_from_name, scan_layers, with_axes

_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
_ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_NO_WINDOW = np.iinfo(np.int32).max  # window of a full-attention layer
CACHE_AXES = dict(k=("layers", "batch", "length", "kv_heads", "head_dim"),
                  v=("layers", "batch", "length", "kv_heads", "head_dim"),
                  mask=("batch", "length"), key_positions=("batch", "length"), index=(),
                  positions=("batch",))  # for sharding


def _freeze(d: Mapping[str, Any]) -> tuple[tuple[str, Any], ...] | None:
  """A dict as sorted (key, value) pairs, so the config stays hashable (jit static)."""
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items())) or None


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Shape and numerics of the decoder; hashable so a model can be a jit static arg."""
  vocab_size: int
  hidden_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  attention_bias: bool = False        # bias on q/k/v (Qwen2; Llama's attention_bias=True)
  attention_out_bias: bool = False    # bias on o_proj (Llama's attention_bias=True only)
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict, see rope.py
  embedding_scale: bool = False       # Gemma: token embeddings * sqrt(hidden_dim)
  norm_offset: float = 0.0            # Gemma: RMSNorm scales by (offset + w), w init 0
  mlp_activation: str = "silu"        # gated MLP: 'silu' (SwiGLU) | 'gelu_pytorch_tanh' (GeGLU)
  sliding_window: int | None = None   # a query sees keys less than this many positions back
  layer_types: tuple[str, ...] | None = None  # per layer; None: all sliding if a window is set
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
    rope.inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # validates
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r}; expected one of "
                       f"{sorted(_ACTIVATIONS)}")
    if self.sliding_window is not None and int(self.sliding_window) < 1:
      raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
    types = None if self.layer_types is None else tuple(self.layer_types)
    if types is not None:
      if len(types) != self.num_layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"layer_types must list {self.num_layers} entries from {_LAYER_TYPES}, "
                         f"got {types}")
      if "sliding_attention" in types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None")
      if "sliding_attention" not in types:  # canonical form: no window at all
        object.__setattr__(self, "sliding_window", None)
      if len(set(types)) == 1:
        types = None
    object.__setattr__(self, "layer_types", types)

  def layer_windows(self) -> tuple[int, ...]:
    """Per-layer attention window in positions (a huge number for full attention)."""
    if self.sliding_window is None:
      return (_NO_WINDOW,) * self.num_layers
    types = self.layer_types or ("sliding_attention",) * self.num_layers
    return tuple(int(self.sliding_window) if t == "sliding_attention" else _NO_WINDOW
                 for t in types)

  @classmethod
  def from_config_dict(cls, cfg_llm, vocab_size: int, **overrides) -> "LlmConfig":
    """From the ``c.llm`` ConfigDict (shape keys) plus e.g. dtype/param_dtype kwargs."""
    names = ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
             "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
             "remat_policy", "attention_bias", "attention_out_bias", "rope_scaling",
             "embedding_scale", "norm_offset", "mlp_activation", "sliding_window", "layer_types")
    kw = {n: cfg_llm[n] for n in names if n in cfg_llm}
    if kw.get("rope_scaling") is not None:
      kw["rope_scaling"] = _freeze(dict(kw["rope_scaling"]))
    kw.update(overrides)
    return cls(vocab_size=vocab_size, **kw)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     **overrides) -> "LlmConfig":
    """From a transformers Llama/Mistral/Qwen2/Gemma config.json dict.

    Anything that would change the math and that we do not implement raises
    ValueError naming the field and ``source`` (rather than loading silently wrong).
    """
    def bad(field, why):
      raise ValueError(f"{source}: field {field!r} = {hf.get(field)!r} is not supported ({why})")

    model_type = hf.get("model_type", "llama")
    if str(model_type).startswith(("gemma2", "gemma3", "gemma4")):
      bad("model_type", "Gemma 2/3 (soft-capping, local/global layers, extra norms) are not "
          "implemented; Gemma 1 ('gemma') is")
    if model_type not in _MODEL_TYPES:
      bad("model_type", f"expected one of {_MODEL_TYPES}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
      if hf.get(field) is not None:
        bad(field, "logit soft-capping is not implemented")
    if hf.get("query_pre_attn_scalar") not in (None, head_dim):
      bad("query_pre_attn_scalar", f"attention is scaled by head_dim={head_dim} ** -0.5 only")
    if hf.get("mlp_bias", False):
      bad("mlp_bias", "MLP biases are not implemented")
    if hf.get("use_bidirectional_attention"):
      bad("use_bidirectional_attention", "the decoder is causal")
    theta, scaling = rope.from_hf_config(hf, bad)
    gemma = model_type == "gemma"
    window, layer_types = _hf_sliding_window(hf, model_type, bad)
    # transformers hard-codes q/k/v bias for Qwen2 and none for Mistral.
    bias = {"qwen2": True, "mistral": False}.get(model_type, bool(hf.get("attention_bias", False)))
    kw = dict(vocab_size=hf["vocab_size"], hidden_dim=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
              mlp_dim=hf["intermediate_size"], rope_theta=theta,
              rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
              max_position_embeddings=hf.get("max_position_embeddings", 2048),
              attention_bias=bias, attention_out_bias=bias and model_type != "qwen2",
              rope_scaling=None if scaling is None else _freeze(scaling),
              embedding_scale=gemma, norm_offset=1.0 if gemma else 0.0,
              mlp_activation=_hf_activation(hf, gemma, bad), sliding_window=window,
              layer_types=layer_types)
    kw.update(overrides)
    return cls(**kw)

  def _hf_family(self) -> str:
    """The transformers model_type that computes what this config does (or raise)."""
    gemma = (self.embedding_scale, self.norm_offset, self.mlp_activation) != (False, 0.0, "silu")
    if gemma:
      if (self.embedding_scale, self.norm_offset, self.mlp_activation) != (
          True, 1.0, "gelu_pytorch_tanh") or self.sliding_window is not None or (
          self.attention_bias != self.attention_out_bias):
        raise ValueError("embedding_scale / norm_offset / mlp_activation only export as "
                         "transformers' Gemma: all three Gemma-style, no sliding window, "
                         "attention_bias == attention_out_bias")
      return "gemma"
    if self.attention_out_bias and not self.attention_bias:
      raise ValueError("attention_out_bias without attention_bias has no transformers equivalent")
    if self.attention_bias and not self.attention_out_bias:
      return "qwen2"
    if self.sliding_window is not None:
      if self.attention_bias or self.layer_types is not None:
        raise ValueError("transformers' Mistral windows every layer and has no biases; "
                         "per-layer windows export only with q/k/v-only bias (Qwen2)")
      return "mistral"
    return "llama"

  def to_hf_config(self) -> dict[str, Any]:
    """A config.json dict transformers loads (Llama, Mistral, Qwen2 or Gemma, as the math asks)."""
    family = self._hf_family()
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[family]
    rope_params = dict(self.rope_scaling or {"rope_type": "default"})
    hf = dict(model_type=family, architectures=[arch],
              vocab_size=self.vocab_size, hidden_size=self.hidden_dim,
              intermediate_size=self.mlp_dim, num_hidden_layers=self.num_layers,
              num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
              head_dim=self.head_dim, hidden_act=self.mlp_activation,
              max_position_embeddings=self.max_position_embeddings,
              rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
              rope_theta=self.rope_theta, rope_scaling=dict(self.rope_scaling or {}) or None,
              rope_parameters=dict(rope_params, rope_theta=self.rope_theta),
              dtype=self.param_dtype, torch_dtype=self.param_dtype)
    if family == "qwen2":
      types = [t == "sliding_attention" for t in self.layer_types or ()] or \
          [self.sliding_window is not None] * self.num_layers
      full = types.index(True) if True in types else self.num_layers
      hf.update(use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window, max_window_layers=full,
                layer_types=[_LAYER_TYPES[t] for t in types])
    elif family == "mistral":
      hf.update(sliding_window=self.sliding_window)
    else:
      hf.update(attention_bias=self.attention_bias, mlp_bias=False)
    if family == "gemma":
      hf.update(hidden_activation=self.mlp_activation)  # what transformers 4.x reads
    return hf


def _hf_activation(hf: Mapping[str, Any], gemma: bool, bad) -> str:
  """The gated MLP's activation from config.json's hidden_act (and Gemma's legacy field)."""
  act = hf.get("hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
  if not gemma:
    if act != "silu":
      bad("hidden_act", "only 'silu' (SwiGLU) for Llama/Mistral/Qwen2")
    return act
  # Gemma's "gelu" always meant the tanh form. transformers 4.x read hidden_activation
  # (default gelu_pytorch_tanh) and ignored hidden_act; 5.x reads hidden_act: accept
  # only values both agree on.
  tanh = lambda a: "gelu_pytorch_tanh" if a == "gelu" else a
  legacy = hf.get("hidden_activation")
  if legacy is not None and tanh(legacy) != tanh(act):
    bad("hidden_activation", f"disagrees with hidden_act={act!r}")
  if tanh(act) != "gelu_pytorch_tanh":
    bad("hidden_act", "Gemma's MLP is GeGLU with gelu_pytorch_tanh (transformers 4.x ignored "
        "hidden_act for Gemma, so other values are ambiguous)")
  return "gelu_pytorch_tanh"


def _hf_sliding_window(hf: Mapping[str, Any], model_type: str, bad):
  """(sliding_window, layer_types) as transformers applies them for ``model_type``."""
  n = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types is not None and (len(types) != n or any(t not in _LAYER_TYPES for t in types)):
    bad("layer_types", f"expected {n} entries from {_LAYER_TYPES}")
  window = hf.get("sliding_window")
  if model_type == "qwen2":  # layer_types wins; else layers >= max_window_layers slide
    window = window if hf.get("use_sliding_window", False) else None
    if types is None and window is not None:
      types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
               "full_attention" for i in range(n)]
    if window is None and "sliding_attention" in (types or ()):
      bad("layer_types", "sliding layers but use_sliding_window/sliding_window disable the window")
  elif model_type == "mistral":  # every layer; transformers ignores layer_types
    if types is not None and set(types) != {_LAYER_TYPES[window is not None]}:
      bad("layer_types", "transformers' Mistral applies sliding_window to every layer and ignores "
          "layer_types (alternating layers are Ministral)")
  else:
    if window is not None:
      bad("sliding_window", f"transformers' {model_type} has no sliding-window attention "
          "(it ignores the field); use model_type 'mistral' or 'qwen2'")
    if "sliding_attention" in (types or ()):
      bad("layer_types", f"transformers' {model_type} has no sliding-window attention")
  if window is not None and (not isinstance(window, int) or window < 1):
    bad("sliding_window", "expected a positive int or null")
  return window, None if types is None else tuple(types)


class _RmsNorm(nn.Module):
  """RMSNorm as transformers computes it per family (the stored weight is ``scale``).

  Llama: ``w * normed.astype(dtype)``. Gemma (``offset=1``): ``normed * (1 + w)``
  in float32, then cast; ``w`` is stored zero-centred (initialised to 0).
  """
  epsilon: float
  offset: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    w = self.param("scale", with_axes(init, ("embed",)), (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
    if self.offset:
      return (normed * (self.offset + w.astype(jnp.float32))).astype(self.dtype)
    return w.astype(self.dtype) * normed.astype(self.dtype)


class _Attention(nn.Module):
  """GQA self-attention with RoPE; writes into / reads from the carried cache."""
  config: LlmConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, layer, write_index):
    cfg = self.config
    dense = functools.partial(Dense, dtype=dtype_from_name(cfg.dtype),
                              param_dtype=dtype_from_name(cfg.param_dtype))
    q = dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
              use_bias=cfg.attention_bias, name="q_proj")(x)  # [B, S, H, D]
    k = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=cfg.attention_bias, name="k_proj")(x)  # [B, S, Hkv, D]
    v = dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=cfg.attention_bias, name="v_proj")(x)  # [B, S, Hkv, D]
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    if kv is not None:
      # Write only the new slots of this layer in place, then read the layer back.
      k_all, v_all = kv  # [L, B, Smax, Hkv, D]
      start = (layer, jnp.int32(0), write_index, jnp.int32(0), jnp.int32(0))
      k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
      v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
      k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)  # [B, Smax, Hkv, D]
      v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
      kv = (k_all, v_all)
    out = dot_product_attention(q, k, v, mask, dtype=dtype_from_name(cfg.dtype))
    out = dense(cfg.hidden_dim, ("heads", "head_dim", "embed"), axis=(-2, -1),
                use_bias=cfg.attention_out_bias, name="o_proj")(out)  # [B, S, E]
    return out, kv


class _GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)), no biases: SwiGLU (silu) or Gemma's GeGLU (tanh gelu)."""
  config: LlmConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(Dense, use_bias=False, dtype=dtype_from_name(cfg.dtype),
                              param_dtype=dtype_from_name(cfg.param_dtype))
    act = _ACTIVATIONS[cfg.mlp_activation]
    h = act(dense(cfg.mlp_dim, ("embed", "mlp"), name="gate_proj")(x)) * \
        dense(cfg.mlp_dim, ("embed", "mlp"), name="up_proj")(x)  # [B, S, M]
    return dense(cfg.hidden_dim, ("mlp", "embed"), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm Llama block. carry = (x [B,S,E], kv cache or None, layer index).

  ``masks`` = (mask [B,1,S,Sk], rel or None): with per-layer windows, ``rel``
  [B,S,Sk] is query minus key position and this layer's window (looked up by
  the carried layer index, so ``nn.scan`` compiles one body) narrows the mask.
  """
  config: LlmConfig

  @nn.compact
  def __call__(self, carry, cos, sin, masks, write_index):
    cfg = self.config
    norm = functools.partial(_RmsNorm, epsilon=cfg.rms_norm_eps, offset=cfg.norm_offset,
                             dtype=dtype_from_name(cfg.dtype),
                             param_dtype=dtype_from_name(cfg.param_dtype))
    x, kv, layer = carry
    mask, rel = masks
    if rel is not None:
      window = jnp.asarray(cfg.layer_windows(), jnp.int32)[layer]
      mask = mask & (rel < window)[:, None]
    h, kv = _Attention(cfg, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask,
                                              kv, layer, write_index)
    x = x + h
    x = x + _GatedMlp(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    return (x, kv, layer + 1), None


class _LmHead(nn.Module):
  """Untied output projection; logits accumulate and come out in float32."""
  vocab_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", with_axes(default_kernel_init, ("embed", "vocab")),
                        (x.shape[-1], self.vocab_size), self.param_dtype)
    return jnp.einsum("bpe,ev->bpv", x.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class LlamaModel(nn.Module):
  """Llama-family decoder. See ``__call__`` for masks, positions, logits and cache."""
  config: LlmConfig

  def setup(self):
    cfg = self.config
    dt, pdt = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_dim, dtype=dt, param_dtype=pdt,
                                 embedding_init=with_axes(default_kernel_init, ("vocab", "embed")))
    stack = scan_layers(DecoderLayer, cfg.num_layers, num_broadcast=4,
                        remat_policy=cfg.remat_policy)
    self.layers = stack(cfg)
    self.final_norm = _RmsNorm(epsilon=cfg.rms_norm_eps, offset=cfg.norm_offset, dtype=dt,
                               param_dtype=pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = _LmHead(cfg.vocab_size, dtype=dt, param_dtype=pdt)

  def embed(self, ids):
    """Token ids [B, S] -> embeddings [B, S, E]: the (frozen) table, Gemma-scaled.

    Like transformers, the scale belongs to the embedding lookup, so
    ``inputs_embeds`` passed to ``__call__`` are taken as already scaled.
    """
    x = self.embed_tokens(ids)
    if self.config.embedding_scale:  # transformers casts sqrt(E) to the hidden dtype first
      x = x * jnp.asarray(np.float32(math.sqrt(self.config.hidden_dim)), x.dtype)
    return x

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None,
               position_ids=None, cache=None, logit_positions=None):
    """Logits [B, S|P, V] float32; with ``cache`` returns ``(logits, new_cache)``.

    attention_mask [B, S] (1 = real). Attention is causal and over real keys
    only. Default positions are the running count of real tokens (continued
    from ``cache['positions']`` with a cache). ``logit_positions`` [B, P]
    restricts the final norm + LM head to those sequence positions.
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids / inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    x = x.astype(dtype_from_name(cfg.dtype))  # [B, S, E]
    b, s = x.shape[:2]
    mask = (jnp.ones((b, s), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))  # [B, S]
    start = 0 if cache is None else cache["positions"][:, None]
    if position_ids is None:
      position_ids = start + jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    position_ids = jnp.asarray(position_ids, jnp.int32)  # [B, S]
    cos, sin = rope.rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    if cache is None:
      kv, write_index = None, None
      key_mask, key_pos, key_slot, query_slot = mask, position_ids, jnp.arange(s), jnp.arange(s)
    else:
      kv, write_index = (cache["k"], cache["v"]), cache["index"]
      at = (jnp.int32(0), write_index)
      key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, at)  # [B, Smax]
      key_pos = jax.lax.dynamic_update_slice(cache["key_positions"], position_ids, at)
      key_slot, query_slot = jnp.arange(key_mask.shape[1]), write_index + jnp.arange(s)
    causal = key_slot[None, :] <= query_slot[:, None]  # [S, Sk]
    attn_mask = key_mask[:, None, None, :] & causal[None, None]  # [B, 1, S, Sk]
    # Sliding windows are measured in our position ids (real tokens counted). For
    # unpadded and right-padded batches that is exactly transformers' window (on
    # sequence indices); with padding inside or on the left, transformers would
    # also count the pad slots.
    rel, windows = None, cfg.layer_windows()
    if cfg.sliding_window is not None:
      rel = position_ids[:, :, None] - key_pos[:, None, :]  # [B, S, Sk]
      if len(set(windows)) == 1:  # the same window everywhere (Mistral): fold it in once
        attn_mask, rel = attn_mask & (rel < windows[0])[:, None], None

    (x, kv, _), _ = self.layers((x, kv, jnp.int32(0)), cos, sin, (attn_mask, rel), write_index)

    if logit_positions is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logit_positions, jnp.int32)[..., None], axis=1)
    x = self.final_norm(x)  # [B, P, E]
    if cfg.tie_word_embeddings:
      table = self.embed_tokens.embedding.astype(x.dtype)  # [V, E]
      logits = jnp.einsum("bpe,ve->bpv", x, table, preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)  # [B, P, V]
    if cache is None:
      return logits
    last = jnp.max(jnp.where(mask, position_ids, -1), axis=1) + 1  # [B]
    next_pos = jnp.maximum(last, cache["positions"])
    new_cache = dict(k=kv[0], v=kv[1], mask=key_mask, key_positions=key_pos,
                     index=write_index + s, positions=next_pos.astype(jnp.int32))
    return logits, new_cache


def init_cache(config: LlmConfig, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache of ``max_length`` slots (slots past the end are not checked).

  ``key_positions`` keeps each slot's position id, which sliding windows compare.
  """
  dt = dtype_from_name(dtype or config.dtype)
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
              mask=jnp.zeros((batch, max_length), bool),
              key_positions=jnp.zeros((batch, max_length), jnp.int32),
              index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch,), jnp.int32))


def from_pretrained(path, **kwargs):
  """(LlamaModel, params) from a local Hugging Face checkpoint dir; see ``hf_checkpoint``.

  kwargs: ``dtype``, ``param_dtype`` (None: bf16 on accelerators, else as
  stored), ``mesh`` and ``rules`` (place each tensor straight into its
  NamedSharding; without a mesh the params are host numpy arrays).
  """
  from vsrllm_jax.models import hf_checkpoint  # imports this module
  return hf_checkpoint.from_pretrained(path, **kwargs)


def save_pretrained(path, config: LlmConfig, params) -> None:
  """config.json + model.safetensors that transformers loads; see ``hf_checkpoint``."""
  from vsrllm_jax.models import hf_checkpoint
  hf_checkpoint.save_pretrained(path, config, params)
