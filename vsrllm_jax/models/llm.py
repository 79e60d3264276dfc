"""The frozen LLM: one Flax decoder for the Llama family, loadable from HF checkpoints.

Llama 2/3/3.x, Mistral (no sliding window), Qwen2/2.5 (q/k/v bias); checkpoint
I/O lives in ``hf_checkpoint``. Layers run under ``nn.scan`` (compile time flat
in depth). Pure: the KV cache is a pytree passed in and returned. Positions count real tokens only, so padding anywhere
(the composed model pads inside ``[instruction][visual][label]``) neither
shifts positions nor receives attention.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import rope
from vsrllm_jax.models.layers import (Dense, RMSNorm, attention_weights_mask, default_kernel_init,
                                      dot_product_attention, dtype_from_name, scan_layers, with_axes)

_MODEL_TYPES = ("llama", "mistral", "qwen2")
CACHE_AXES = dict(k=("layers", "batch", "length", "kv_heads", "head_dim"),
                  v=("layers", "batch", "length", "kv_heads", "head_dim"),
                  mask=("batch", "length"), index=(), positions=("batch",))  # for sharding


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

  @classmethod
  def from_config_dict(cls, cfg_llm, vocab_size: int, **overrides) -> "LlmConfig":
    """From the ``c.llm`` ConfigDict (shape keys) plus e.g. dtype/param_dtype kwargs."""
    names = ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
             "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
             "remat_policy", "attention_bias", "attention_out_bias", "rope_scaling")
    kw = {n: cfg_llm[n] for n in names if n in cfg_llm}
    if kw.get("rope_scaling") is not None:
      kw["rope_scaling"] = _freeze(dict(kw["rope_scaling"]))
    kw.update(overrides)
    return cls(vocab_size=vocab_size, **kw)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     **overrides) -> "LlmConfig":
    """From a transformers Llama/Mistral/Qwen2 config.json dict.

    Anything that would change the math and that we do not implement raises
    ValueError naming the field and ``source`` (rather than loading silently wrong).
    """
    def bad(field, why):
      raise ValueError(f"{source}: field {field!r} = {hf.get(field)!r} is not supported ({why})")

    model_type = hf.get("model_type", "llama")
    if model_type not in _MODEL_TYPES:
      bad("model_type", f"expected one of {_MODEL_TYPES}")
    if hf.get("hidden_act", "silu") != "silu":
      bad("hidden_act", "only 'silu' (SwiGLU)")
    if hf.get("mlp_bias", False):
      bad("mlp_bias", "MLP biases are not implemented")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
      bad("layer_types", "only full attention, no sliding window")
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
      bad("use_sliding_window", "sliding-window attention is not implemented")
    if model_type != "qwen2" and hf.get("sliding_window") is not None:
      bad("sliding_window", "sliding-window attention is not implemented")
    # transformers>=5 writes rope_parameters; older files rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    field = "rope_parameters" if params else "rope_scaling"
    if not params:
      params = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.rope_type(params)
    if kind not in rope.SUPPORTED_ROPE_TYPES:
      bad(field, f"rope type {kind!r}; supported: {rope.SUPPORTED_ROPE_TYPES}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
      bad(field, "partial_rotary_factor must be 1")
    if kind == "llama3" and "original_max_position_embeddings" not in params:
      params["original_max_position_embeddings"] = hf["max_position_embeddings"]
    params.pop("type", None)
    scaling = None if kind == "default" else _freeze(dict(params, rope_type=kind))
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    kw = dict(vocab_size=hf["vocab_size"], hidden_dim=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=heads,
              num_kv_heads=hf.get("num_key_value_heads") or heads,
              head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
              mlp_dim=hf["intermediate_size"], rope_theta=theta,
              rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
              max_position_embeddings=hf.get("max_position_embeddings", 2048),
              attention_bias=bias, attention_out_bias=bias and model_type != "qwen2",
              rope_scaling=scaling)
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """A config.json dict transformers loads (LlamaForCausalLM, or Qwen2 for q/k/v-only bias)."""
    if self.attention_out_bias and not self.attention_bias:
      raise ValueError("attention_out_bias without attention_bias has no transformers equivalent")
    qwen = self.attention_bias and not self.attention_out_bias
    rope_params = dict(self.rope_scaling or {"rope_type": "default"})
    hf = dict(model_type="qwen2" if qwen else "llama",
              architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
              vocab_size=self.vocab_size, hidden_size=self.hidden_dim,
              intermediate_size=self.mlp_dim, num_hidden_layers=self.num_layers,
              num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
              head_dim=self.head_dim, hidden_act="silu",
              max_position_embeddings=self.max_position_embeddings,
              rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
              rope_theta=self.rope_theta, rope_scaling=dict(self.rope_scaling or {}) or None,
              rope_parameters=dict(rope_params, rope_theta=self.rope_theta),
              dtype=self.param_dtype, torch_dtype=self.param_dtype)
    if qwen:
      hf.update(use_sliding_window=False, sliding_window=None)
    else:
      hf.update(attention_bias=self.attention_bias, mlp_bias=False)
    return hf


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


class _SwiGlu(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases."""
  config: LlmConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(Dense, use_bias=False, dtype=dtype_from_name(cfg.dtype),
                              param_dtype=dtype_from_name(cfg.param_dtype))
    h = nn.silu(dense(cfg.mlp_dim, ("embed", "mlp"), name="gate_proj")(x)) * \
        dense(cfg.mlp_dim, ("embed", "mlp"), name="up_proj")(x)  # [B, S, M]
    return dense(cfg.hidden_dim, ("mlp", "embed"), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm Llama block. carry = (x [B,S,E], kv cache or None, layer index)."""
  config: LlmConfig

  @nn.compact
  def __call__(self, carry, cos, sin, mask, write_index):
    cfg = self.config
    norm = functools.partial(RMSNorm, epsilon=cfg.rms_norm_eps, dtype=dtype_from_name(cfg.dtype),
                             param_dtype=dtype_from_name(cfg.param_dtype))
    x, kv, layer = carry
    h, kv = _Attention(cfg, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask,
                                              kv, layer, write_index)
    x = x + h
    x = x + _SwiGlu(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
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
    self.final_norm = RMSNorm(epsilon=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = _LmHead(cfg.vocab_size, dtype=dt, param_dtype=pdt)

  def embed(self, ids):
    """Token ids [B, S] -> embeddings [B, S, E] from the (frozen) input table."""
    return self.embed_tokens(ids)

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
      attn_mask = attention_weights_mask(None, mask, causal=True)  # [B, 1, S, S]
    else:
      kv, write_index = (cache["k"], cache["v"]), cache["index"]
      slots_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (jnp.int32(0), write_index))
      slot = jnp.arange(slots_mask.shape[1])  # [Smax]
      query_slot = write_index + jnp.arange(s)  # [S]
      causal = slot[None, :] <= query_slot[:, None]  # [S, Smax]
      attn_mask = slots_mask[:, None, None, :] & causal[None, None]  # [B, 1, S, Smax]

    (x, kv, _), _ = self.layers((x, kv, jnp.int32(0)), cos, sin, attn_mask, write_index)

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
    new_cache = dict(k=kv[0], v=kv[1], mask=slots_mask, index=write_index + s,
                     positions=next_pos.astype(jnp.int32))
    return logits, new_cache


def init_cache(config: LlmConfig, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache of ``max_length`` slots (slots past the end are not checked)."""
  dt = dtype_from_name(dtype or config.dtype)
  shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
  return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
              mask=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32),
              positions=jnp.zeros((batch,), jnp.int32))


def from_pretrained(path, **kwargs):
  """(LlamaModel, params) from a local Hugging Face checkpoint dir; see ``hf_checkpoint``."""
  from vsrllm_jax.models import hf_checkpoint  # imports this module
  return hf_checkpoint.from_pretrained(path, **kwargs)


def save_pretrained(path, config: LlmConfig, params) -> None:
  """config.json + model.safetensors that transformers loads; see ``hf_checkpoint``."""
  from vsrllm_jax.models import hf_checkpoint
  hf_checkpoint.save_pretrained(path, config, params)
