"""Contrastive losses the model produces: InfoNCE between paired vectors, and between
clip vectors and texts (the visual-text alignment of text-aware projectors)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def info_nce(a: jax.Array, b: jax.Array, temperature: float,
             valid: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE between paired rows of a [B, E] and b [B, E].

  Row i of ``a`` and row i of ``b`` are positives; every other row in the
  batch is a negative. Cosine similarity over ``temperature``. ``valid`` [B]
  drops filler rows both as anchors and as negatives.
  """
  sim = _l2_normalize(a) @ _l2_normalize(b).T / temperature       # [B, B]
  n = sim.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  pair_ok = valid[:, None] & valid[None, :]
  sim = jnp.where(pair_ok, sim, -1e9)
  diag = jnp.diagonal(sim)
  loss_ab = jax.nn.logsumexp(sim, axis=1) - diag
  loss_ba = jax.nn.logsumexp(sim, axis=0) - diag
  per_row = 0.5 * (loss_ab + loss_ba) * valid
  return jnp.sum(per_row) / jnp.maximum(jnp.sum(valid), 1)


def visual_text_info_nce(pooled: jax.Array, text_embeds: jax.Array, text_mask: jax.Array,
                         temperature: float, valid: jax.Array | None = None) -> jax.Array:
  """InfoNCE between clip vectors pooled [B, E] and the texts text_embeds [B, L, E].

  Each text is the mean of its real tokens (``text_mask`` [B, L]) under
  ``stop_gradient``: the frozen label embeddings are a target, never trained.
  Rows without a real text token, or with ``valid`` False, are dropped.
  """
  m = text_mask.astype(jnp.float32)
  text = jnp.sum(text_embeds.astype(jnp.float32) * m[..., None], axis=1) / jnp.maximum(
      jnp.sum(m, axis=1, keepdims=True), 1.0)
  rows = jnp.any(text_mask.astype(bool), axis=1)
  if valid is not None:
    rows = rows & valid.astype(bool)
  return info_nce(pooled, jax.lax.stop_gradient(text), temperature, rows)
