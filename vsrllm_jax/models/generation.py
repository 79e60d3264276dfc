"""Greedy decoding with an explicit KV cache, jit-friendly end to end.

The prompt arrives as embeddings (the composed model's
``[instruction][visual tokens]``), possibly padded anywhere; the cache is
sized once to ``P + max_new_tokens`` so that the loop has static shapes.
Call inside ``jax.jit`` with the model and the ints static, e.g.::

  gen = jax.jit(functools.partial(greedy_generate, model, max_new_tokens=12,
                                  eos_id=2, pad_id=0))
  tokens = gen(params, embeds, mask)
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vsrllm_jax.models.llm import LlamaModel, init_cache


def _eos_array(eos_id: int | Sequence[int]) -> jax.Array:
  ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
  return jnp.asarray(ids, jnp.int32)  # [K]


def greedy_generate(model: LlamaModel, params, inputs_embeds: jax.Array,
                    attention_mask: jax.Array, *, max_new_tokens: int,
                    eos_id: int | Sequence[int], pad_id: int) -> jax.Array:
  """Greedy continuation of embedded prompts -> tokens int32 [B, max_new_tokens].

  inputs_embeds [B, P, E]; attention_mask [B, P] (1 = real, padding anywhere).
  A row's tokens after its first EOS (``eos_id`` may be a list) are ``pad_id``;
  the loop stops early once every row has emitted EOS. ``params`` is the
  inner 'params' dict.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = inputs_embeds.shape[:2]
  mask = jnp.asarray(attention_mask).astype(bool)  # [B, P]
  eos = _eos_array(eos_id)
  variables = {"params": params}
  cache = init_cache(model.config, b, p + max_new_tokens)
  # Next-token logits come from each row's last real prompt position.
  last = jnp.max(jnp.where(mask, jnp.arange(p)[None], 0), axis=1)  # [B]
  logits, cache = model.apply(variables, inputs_embeds=inputs_embeds, attention_mask=mask,
                              cache=cache, logit_positions=last[:, None])

  def pick(logits, done):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    token = jnp.where(done, jnp.int32(pad_id), token)
    return token, done | jnp.isin(token, eos)

  token, done = pick(logits, jnp.zeros((b,), bool))
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, done, cache, token = state
    logits, cache = model.apply(variables, token[:, None], cache=cache)  # [B, 1, V]
    token, done = pick(logits, done)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (jnp.int32(0), i))
    return i + 1, tokens, done, cache, token

  state = (jnp.int32(1), tokens, done, cache, token)
  return jax.lax.while_loop(cond, body, state)[1]


def greedy_generate_from_ids(model: LlamaModel, params, input_ids: jax.Array,
                             attention_mask: jax.Array | None = None, *, max_new_tokens: int,
                             eos_id: int | Sequence[int], pad_id: int) -> jax.Array:
  """``greedy_generate`` for token-id prompts [B, P] (embedded with the model's table)."""
  embeds = model.apply({"params": params}, input_ids, method=LlamaModel.embed)  # [B, P, E]
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, bool)
  return greedy_generate(model, params, embeds, attention_mask, max_new_tokens=max_new_tokens,
                         eos_id=eos_id, pad_id=pad_id)
