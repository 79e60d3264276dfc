"""The frozen LLM: one Flax decoder for Llama-family checkpoints, loadable from HF.

Covers what transformers runs as Llama 2/3/3.1/3.2 (``rope_type`` default,
linear, llama3), Mistral (sliding window on every layer), Qwen2/2.5 (q/k/v
bias; ``use_sliding_window`` with ``max_window_layers`` or ``layer_types``)
and Gemma 1 (embeddings * sqrt(hidden), ``(1 + w)`` RMSNorm, GeGLU, own
head_dim, tied head). Config fields that would change the math and are not
implemented (Gemma 2/3, soft-capping, partial rotary, MLP bias, other rope
types, ...) raise (``llm.config``). Checkpoint I/O lives in ``hf_llm``. Layers
run under ``nn.scan`` (compile time flat in depth); per-layer windows come
from a constant table indexed by the carried layer number. Pure: the KV cache
is a pytree passed in and returned. Positions count real tokens only, so
padding anywhere (the composed model pads inside
``[instruction][visual][label]``) neither shifts positions nor receives
attention.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax.models import lora as lora_lib
from vsrllm_jax.models import rope
from vsrllm_jax.models.layers import default_kernel_init, dot_product_attention, \
    dtype_from_name, hf_rms_norm, scan_layers, with_axes
from vsrllm_jax.models.llm.config import ACTIVATIONS, LlmConfig
from vsrllm_jax.sharding import constrain

ACT_HIDDEN = ("act_batch", "act_length", "act_embed")   # the residual stream
CACHE_AXES = dict(k=("layers", "batch", "kv_heads", "head_dim", "length"),
                  v=("layers", "batch", "kv_heads", "length", "head_dim"),
                  mask=("batch", "length"), key_positions=("batch", "length"), index=(),
                  positions=("batch",))  # for sharding


class _RmsNorm(nn.Module):
  """RMSNorm as transformers computes it per family (``layers.hf_rms_norm``; the
  stored weight is ``scale``, zero-centred for Gemma)."""
  epsilon: float
  offset: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    w = self.param("scale", with_axes(init, ("embed",)), (x.shape[-1],), self.param_dtype)
    return hf_rms_norm(x, w, epsilon=self.epsilon, offset=self.offset, dtype=self.dtype)


def _dense(cfg: LlmConfig, target: str, *args, layer=None, dropout_key=None, **kwargs):
  """The projection ``target`` ('q', ..., 'down'): a Dense, with a LoRA adapter when
  ``cfg.lora`` targets it (``models/lora.py``). Returns x -> y."""
  lora = cfg.lora if cfg.lora is not None and target in cfg.lora.targets else None
  module = lora_lib.LoraDense(*args, dtype=dtype_from_name(cfg.dtype),
                              param_dtype=dtype_from_name(cfg.param_dtype), lora=lora,
                              name=lora_lib.TARGETS[target][1], **kwargs)
  if lora is None:
    return module
  return functools.partial(module, dropout_key=lora_lib.layer_dropout_key(dropout_key, layer,
                                                                          target))


class _Attention(nn.Module):
  """GQA self-attention with RoPE; writes into / reads from the carried cache."""
  config: LlmConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv, layer, write_index, lengths=None, dropout_key=None):
    cfg = self.config
    dense = functools.partial(_dense, cfg, layer=layer, dropout_key=dropout_key)
    q = dense("q", (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
              use_bias=cfg.attention_bias)(x)  # [B, S, H, D]
    k = dense("k", (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=cfg.attention_bias)(x)  # [B, S, Hkv, D]
    v = dense("v", (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
              use_bias=cfg.attention_bias)(x)  # [B, S, Hkv, D]
    cos, sin = cos[:, :, None], sin[:, :, None]   # [B, S, 1, D]: every head
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
    if kv is not None:
      # Write only the new slots in place, then read this layer's keys and values. The
      # stacked cache ([L, ...]) holds keys as [B, Hkv, D, Smax] and values as
      # [B, Hkv, Smax, D] per layer (``init_cache``), the order attention reads them in.
      def put(buf, new, at):
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype)[None], (layer,) + at)
      zero = jnp.int32(0)
      k_buf = put(kv[0], jnp.transpose(k, (0, 2, 3, 1)), (zero, zero, zero, write_index))
      v_buf = put(kv[1], jnp.swapaxes(v, 1, 2), (zero, zero, write_index, zero))
      kv = (k_buf, v_buf)
      k_buf = jax.lax.dynamic_index_in_dim(k_buf, layer, 0, keepdims=False)
      v_buf = jax.lax.dynamic_index_in_dim(v_buf, layer, 0, keepdims=False)
      out = dot_product_attention(q, k_buf, v_buf, mask, dtype=dtype_from_name(cfg.dtype),
                                  cache_layout=True)
    elif cfg.attention_impl == "cudnn":   # fused; no cache in training
      if lengths is not None:   # right-padded, causal: cuDNN skips masked blocks
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                           key_value_seq_lengths=lengths,
                                           implementation="cudnn")
      else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    else:
      out = dot_product_attention(q, k, v, mask, dtype=dtype_from_name(cfg.dtype))
    out = dense("o", cfg.hidden_dim, ("heads", "head_dim", "embed"), axis=(-2, -1),
                use_bias=cfg.attention_out_bias)(out)  # [B, S, E]
    return out, kv


class _GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)), no biases: SwiGLU (silu) or Gemma's GeGLU (tanh gelu)."""
  config: LlmConfig

  @nn.compact
  def __call__(self, x, layer=None, dropout_key=None):
    cfg = self.config
    dense = functools.partial(_dense, cfg, layer=layer, dropout_key=dropout_key, use_bias=False)
    act = ACTIVATIONS[cfg.mlp_activation]
    h = act(dense("gate", cfg.mlp_dim, ("embed", "mlp"))(x)) * \
        dense("up", cfg.mlp_dim, ("embed", "mlp"))(x)  # [B, S, M]
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return dense("down", cfg.hidden_dim, ("mlp", "embed"))(h)


class DecoderLayer(nn.Module):
  """Pre-norm Llama block. carry = (x [B,S,E], kv cache or None, layer index).

  ``masks`` = (mask [B,1,S,Sk], rel or None, lengths or None): with per-layer
  windows, ``rel`` [B,S,Sk] is query minus key position and this layer's window
  (looked up by the carried layer index, so ``nn.scan`` compiles one body)
  narrows the mask; ``lengths`` [B] (right-padded input, no windows) lets
  fused attention use its causal + padding form instead of the mask.
  ``dropout_key``: LoRA dropout in training (None: none), folded with the layer index.
  """
  config: LlmConfig

  @nn.compact
  def __call__(self, carry, cos, sin, masks, write_index, dropout_key):
    cfg = self.config
    norm = functools.partial(_RmsNorm, epsilon=cfg.rms_norm_eps, offset=cfg.norm_offset,
                             dtype=dtype_from_name(cfg.dtype),
                             param_dtype=dtype_from_name(cfg.param_dtype))
    x, kv, layer = carry
    mask, rel, lengths = masks
    if rel is not None:
      window = jnp.asarray(cfg.layer_windows(), jnp.int32)[layer]
      mask = mask & (rel < window)[:, None]
    h, kv = _Attention(cfg, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask,
                                              kv, layer, write_index, lengths, dropout_key)
    x = x + h
    x = x + _GatedMlp(cfg, name="mlp")(norm(name="post_attention_layernorm")(x), layer,
                                       dropout_key)
    x = constrain(x, ACT_HIDDEN)
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
    stack = scan_layers(DecoderLayer, cfg.num_layers, num_broadcast=5,
                        remat_policy=cfg.remat_policy, unroll=cfg.scan_unroll)
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
               position_ids=None, cache=None, logit_positions=None, right_padded=False,
               train=False):
    """Logits [B, S|P, V] float32; with ``cache`` returns ``(logits, new_cache)``.

    attention_mask [B, S] (1 = real). Attention is causal and over real keys
    only. Default positions are the running count of real tokens (continued
    from ``cache['positions']`` with a cache). ``logit_positions`` [B, P]
    restricts the final norm + LM head to those sequence positions.
    ``right_padded``: the caller promises every row is real tokens then padding
    (``pack_right``), so fused attention may run causal with sequence lengths.
    ``train``: LoRA adapters drop their inputs (``lora.dropout``, the 'dropout' rng).
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids / inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    x = constrain(x.astype(dtype_from_name(cfg.dtype)), ACT_HIDDEN)  # [B, S, E]
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

    lengths = None
    if right_padded and cache is None and cfg.sliding_window is None:
      lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
    masks = (attn_mask, rel, lengths)
    dropout_key = None
    if train and cfg.lora is not None and cfg.lora.dropout > 0:
      dropout_key = self.make_rng("dropout")
    (x, kv, _), _ = self.layers((x, kv, jnp.int32(0)), cos, sin, masks, write_index,
                                dropout_key)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logit_positions, jnp.int32)[..., None], axis=1)
    x = self.final_norm(x)  # [B, P, E]
    if cfg.tie_word_embeddings:
      table = self.embed_tokens.embedding.astype(x.dtype)  # [V, E]
      logits = jnp.einsum("bpe,ve->bpv", x, table, preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(x)
    logits = constrain(logits.astype(jnp.float32), ("act_batch", None, "act_vocab"))  # [B, P, V]
    if cache is None:
      return logits
    last = jnp.max(jnp.where(mask, position_ids, -1), axis=1) + 1  # [B]
    next_pos = jnp.maximum(last, cache["positions"])
    new_cache = dict(k=kv[0], v=kv[1], mask=key_mask, key_positions=key_pos,
                     index=write_index + s, positions=next_pos.astype(jnp.int32))
    return logits, new_cache


def init_cache(config: LlmConfig, batch: int, max_length: int, dtype=None) -> dict:
  """An empty KV cache of ``max_length`` slots (slots past the end are not checked).

  Heads-major, in the order attention reads them: keys [L, B, Hkv, D, Smax], values
  [L, B, Hkv, Smax, D] (``CACHE_AXES``). ``key_positions`` keeps each slot's
  position id, which sliding windows compare.
  """
  dt = dtype_from_name(dtype or config.dtype)
  n, hkv, d = config.num_layers, config.num_kv_heads, config.head_dim
  return dict(k=jnp.zeros((n, batch, hkv, d, max_length), dt),
              v=jnp.zeros((n, batch, hkv, max_length, d), dt),
              mask=jnp.zeros((batch, max_length), bool),
              key_positions=jnp.zeros((batch, max_length), jnp.int32),
              index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch,), jnp.int32))
