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
same dtypes; the family tests hold the two to the same logits and tokens. Two
more savings, both exact: keys' and values' projections are one stacked matrix,
and a prompt's last layer runs queries and MLP only where logits are wanted
(``run_layers``' ``keep``).
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
  ``[out, in]`` matrix and each bias a vector; norm scales as they are. Keys' and
  values' projections are stacked into one ``kv_proj`` (keys' rows first): in a
  one-token step, q and k/v then run as two equal matmuls side by side, one per
  thread (measured: 151 -> 118 us per layer, against q beside v, then k)."""
  out = {name: dict(sub) for name, sub in layer.items()}
  for (block, proj), n_in in _IN_AXES.items():
    p = dict(layer[block][proj])
    kernel = p["kernel"]
    p["kernel"] = jnp.reshape(kernel, (math.prod(kernel.shape[:n_in]), -1)).T
    if "bias" in p:
      p["bias"] = jnp.reshape(p["bias"], (-1,))
    out[block][proj] = p
  attn = out["self_attn"]
  k, v = attn.pop("k_proj"), attn.pop("v_proj")
  attn["kv_proj"] = {name: jnp.concatenate([k[name], v[name]], axis=0) for name in k}
  return out


def run_layers(cfg: LlmConfig, layer_params, x, kv, cos, sin, masks, write_index, keep=None):
  """The layers on ``decoding_layout`` params: x [B, S, E] -> (x [B, S, E], kv).

  ``kv``: None, or per-layer key buffers [B, Hkv, D, Smax] and value buffers
  [B, Hkv, Smax, D] (``init_cache(per_layer=True)``), written at ``write_index``.
  ``masks`` and ``cos``/``sin`` [B, S, D] are ``LlamaModel.__call__``'s.
  ``keep`` [B, P] (positions; None: all): only these rows of the output are
  wanted (a prompt's logit positions). The last layer then runs its queries,
  attention output and MLP on them alone, and x comes back [B, P, E]; its keys
  and values still cover every position. Each position's output depends on the
  others only through keys and values, so the kept rows are the same; this
  saves ~1/L of a prompt's matmul work (11% for an 8-layer model).
  """
  if len(layer_params) != cfg.num_layers:
    raise ValueError(f"layer_params has {len(layer_params)} layers; the config has "
                     f"{cfg.num_layers}")
  if kv is not None and not isinstance(kv[0], (tuple, list)):
    raise ValueError("with layer_params the cache must be per layer: "
                     "init_cache(..., per_layer=True)")
  b, s, e = x.shape
  xt = x.reshape(b * s, e).T                                    # [E, N]
  rot = (cos.reshape(b * s, -1).T, sin.reshape(b * s, -1).T)   # [D, N] each
  mask, rel, _ = masks
  if keep is not None:   # the kept rows as columns of [E, N]
    keep = jnp.asarray(keep, jnp.int32)                                        # [B, P]
    keep_cols = (jnp.arange(b, dtype=jnp.int32)[:, None] * s + keep).reshape(-1)  # [B * P]
  keys, values = [], []
  for i, (params, window) in enumerate(zip(layer_params, cfg.layer_windows())):
    layer_mask = mask if rel is None or window == NO_WINDOW else \
        mask & (rel < window)[:, None]
    layer_kv = None if kv is None else (kv[0][i], kv[1][i])
    cols = None
    if keep is not None and i == cfg.num_layers - 1:
      cols = keep_cols
      layer_mask = jnp.take_along_axis(layer_mask, keep[:, None, :, None], axis=2)  # [B,1,P,Sk]
    h, layer_kv = _attention(cfg, params["self_attn"], _norm(cfg, params["input_layernorm"], xt),
                             rot, layer_mask, layer_kv, write_index, (b, s), cols)
    xt = (xt if cols is None else xt[:, cols]) + h
    xt = xt + _mlp(cfg, params["mlp"], _norm(cfg, params["post_attention_layernorm"], xt))
    if layer_kv is not None:
      keys.append(layer_kv[0])
      values.append(layer_kv[1])
  x = xt.T.reshape(b, -1, e)
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


def _attention(cfg: LlmConfig, params, xt, rot, mask, kv, write_index, bs, cols=None):
  """``llm._Attention`` on [E, N] (``layers.grouped_attention`` over the cache layout).

  rot: (cos, sin) [D, N]. ``cols`` (None: all): the columns that get queries, and
  so output columns; mask [B, 1, P, Sk] then holds their rows.
  """
  dtype = dtype_from_name(cfg.dtype)
  b, s = bs
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  cos_t, sin_t = rot
  xq, cos_q, sin_q = (xt, cos_t, sin_t) if cols is None else \
      (xt[:, cols], cos_t[:, cols], sin_t[:, cols])
  q = rope.rotate(_dense(params["q_proj"], xq, dtype).reshape(h, d, -1), cos_q, sin_q, axis=1)
  kv_new = _dense(params["kv_proj"], xt, dtype)                   # [2 * Hkv * D, N]
  k = rope.rotate(kv_new[:hkv * d].reshape(hkv, d, -1), cos_t, sin_t, axis=1)
  v = kv_new[hkv * d:].reshape(hkv, d, b, s)
  k = jnp.transpose(k.reshape(hkv, d, b, s), (2, 0, 1, 3))      # [B, Hkv, D, S]
  v = jnp.transpose(v, (2, 0, 3, 1))                            # [B, Hkv, S, D]
  if kv is not None:
    zero = jnp.int32(0)
    k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (zero, zero, zero, write_index))
    v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (zero, zero, write_index, zero))
    kv = (k, v)
  q = jnp.transpose(q.reshape(hkv, h // hkv, d, b, -1), (3, 0, 1, 4, 2))  # [B, Hkv, G, P, D]
  out = grouped_attention(q, k, v, mask, dtype=dtype)                 # [B, Hkv, G, P, D]
  out = jnp.transpose(out, (1, 2, 4, 0, 3)).reshape(h * d, -1)       # [H*D, B*P]
  return _dense(params["o_proj"], out, dtype), kv


def _mlp(cfg: LlmConfig, params, xt):
  """``llm._GatedMlp`` on [E, N]."""
  dtype = dtype_from_name(cfg.dtype)
  act = ACTIVATIONS[cfg.mlp_activation]
  hidden = act(_dense(params["gate_proj"], xt, dtype)) * _dense(params["up_proj"], xt, dtype)
  return _dense(params["down_proj"], hidden, dtype)
