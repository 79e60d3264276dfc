"""The LLM's decoder layers as CPU decoding runs them: feature-major, one by one.

Decoding multiplies a handful of token rows by every weight of the model at each
step, so a step costs what streaming the weights from memory costs. XLA's CPU
matmul streams a weight fastest as the left operand in ``[out, in]`` order, times
activations held feature-major ``[in, tokens]`` (measured here, 8 rows through
the 8-layer benchmark LLM: ~11% less time per step than ``[tokens, in] @ [in,
out]``; no difference for a prompt's 800 rows). So this path keeps each
layer's kernels as ``[out, in]`` matrices (``decoding_layout``, made once per
set of weights) and the residual stream as ``[E, tokens]``, and transposes only
activations at the edges. The math is ``llm.DecoderLayer``'s, op for op in the
same dtypes; the family tests hold the two to the same logits and tokens.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vsrllm_jax.models import rope
from vsrllm_jax.models.layers import dtype_from_name, grouped_attention, hf_rms_norm
from vsrllm_jax.models.llm_config import ACTIVATIONS, NO_WINDOW, LlmConfig

# Linen kernel -> [out, in]: which leading axes are the input ones.
_IN_AXES = {("self_attn", "q_proj"): 1, ("self_attn", "k_proj"): 1,
            ("self_attn", "v_proj"): 1, ("self_attn", "o_proj"): 2,
            ("mlp", "gate_proj"): 1, ("mlp", "up_proj"): 1, ("mlp", "down_proj"): 1}


def decoding_layout(layer: dict) -> dict:
  """One layer's linen params (``DecoderLayer``) -> the same tree with each kernel an
  ``[out, in]`` matrix and each bias a vector; norm scales as they are."""
  out = {name: dict(sub) for name, sub in layer.items()}
  for (block, proj), n_in in _IN_AXES.items():
    p = dict(layer[block][proj])
    kernel = p["kernel"]
    p["kernel"] = jnp.reshape(kernel, (math.prod(kernel.shape[:n_in]), -1)).T
    if "bias" in p:
      p["bias"] = jnp.reshape(p["bias"], (-1,))
    out[block][proj] = p
  return out


def run_layers(cfg: LlmConfig, layer_params, x, kv, cos, sin, masks, write_index):
  """The layers on ``decoding_layout`` params: x [B, S, E] -> (x [B, S, E], kv).

  ``kv``: None, or per-layer key buffers [B, Hkv, D, Smax] and value buffers
  [B, Hkv, Smax, D] (``init_cache(per_layer=True)``), written at ``write_index``.
  ``masks`` and ``cos``/``sin`` [B, S, D] are ``LlamaModel.__call__``'s.
  """
  if len(layer_params) != cfg.num_layers:
    raise ValueError(f"layer_params has {len(layer_params)} layers; the config has "
                     f"{cfg.num_layers}")
  if kv is not None and not isinstance(kv[0], (tuple, list)):
    raise ValueError("with layer_params the cache must be per layer: "
                     "init_cache(..., per_layer=True)")
  b, s, e = x.shape
  xt = x.reshape(b * s, e).T                                    # [E, N]
  cos_t = cos.reshape(b * s, -1).T                              # [D, N]
  sin_t = sin.reshape(b * s, -1).T
  mask, rel, _ = masks
  keys, values = [], []
  for i, (params, window) in enumerate(zip(layer_params, cfg.layer_windows())):
    layer_mask = mask if rel is None or window == NO_WINDOW else \
        mask & (rel < window)[:, None]
    layer_kv = None if kv is None else (kv[0][i], kv[1][i])
    h, layer_kv = _attention(cfg, params["self_attn"], _norm(cfg, params["input_layernorm"], xt),
                             cos_t, sin_t, layer_mask, layer_kv, write_index, (b, s))
    xt = xt + h
    xt = xt + _mlp(cfg, params["mlp"], _norm(cfg, params["post_attention_layernorm"], xt))
    if layer_kv is not None:
      keys.append(layer_kv[0])
      values.append(layer_kv[1])
  x = xt.T.reshape(b, s, e)
  return x, (None if kv is None else (tuple(keys), tuple(values)))


def _dense(params, xt, dtype):
  """[out, in] @ [in, N] (+ bias) -> [out, N]."""
  y = jax.lax.dot_general(jnp.asarray(params["kernel"], dtype), jnp.asarray(xt, dtype),
                          (((1,), (0,)), ((), ())))
  if "bias" in params:
    y = y + jnp.asarray(params["bias"], dtype)[:, None]
  return y


def _norm(cfg: LlmConfig, params, xt):
  """``llm._RmsNorm`` over axis 0."""
  return hf_rms_norm(xt, params["scale"][:, None], epsilon=cfg.rms_norm_eps,
                     offset=cfg.norm_offset, dtype=dtype_from_name(cfg.dtype), axis=0)


def _attention(cfg: LlmConfig, params, xt, cos_t, sin_t, mask, kv, write_index, bs):
  """``llm._Attention`` on [E, N] (``layers.grouped_attention`` over the cache layout)."""
  dtype = dtype_from_name(cfg.dtype)
  b, s = bs
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = rope.rotate(_dense(params["q_proj"], xt, dtype).reshape(h, d, -1), cos_t, sin_t, axis=1)
  k = rope.rotate(_dense(params["k_proj"], xt, dtype).reshape(hkv, d, -1), cos_t, sin_t, axis=1)
  v = _dense(params["v_proj"], xt, dtype).reshape(hkv, d, b, s)
  k = jnp.transpose(k.reshape(hkv, d, b, s), (2, 0, 1, 3))      # [B, Hkv, D, S]
  v = jnp.transpose(v, (2, 0, 3, 1))                            # [B, Hkv, S, D]
  if kv is not None:
    zero = jnp.int32(0)
    k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (zero, zero, zero, write_index))
    v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (zero, zero, write_index, zero))
    kv = (k, v)
  q = jnp.transpose(q.reshape(hkv, h // hkv, d, b, s), (3, 0, 1, 4, 2))  # [B, Hkv, G, S, D]
  out = grouped_attention(q, k, v, mask, dtype=dtype)                # [B, Hkv, G, S, D]
  out = jnp.transpose(out, (1, 2, 4, 0, 3)).reshape(h * d, b * s)  # [H*D, N]
  return _dense(params["o_proj"], out, dtype), kv


def _mlp(cfg: LlmConfig, params, xt):
  """``llm._GatedMlp`` on [E, N]."""
  dtype = dtype_from_name(cfg.dtype)
  act = ACTIVATIONS[cfg.mlp_activation]
  hidden = act(_dense(params["gate_proj"], xt, dtype)) * _dense(params["up_proj"], xt, dtype)
  return _dense(params["down_proj"], hidden, dtype)
