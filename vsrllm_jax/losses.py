"""Losses: LM cross-entropy, InfoNCE, and the weighted total.

Every loss has a name; ``config.loss_weights`` must give exactly one weight per
produced name. A loss without a weight, or a weight naming no loss, is an
error: silently dropped auxiliary losses were a bug of the PyTorch original.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def lm_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over real label tokens.

  logits [B, L, V] (at the positions that predict each label token),
  targets [B, L] int, mask [B, L] (False on padding). Computed in fp32.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (logz - target_logit) * mask
  return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


def token_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of real label tokens whose argmax is the target (teacher forcing)."""
  hit = (jnp.argmax(logits, axis=-1) == targets) * mask
  return jnp.sum(hit) / jnp.maximum(jnp.sum(mask), 1)


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


def check_loss_names(names, weights: Mapping[str, float]) -> None:
  """Raises unless ``names`` and the keys of ``weights`` are the same set."""
  names, keys = set(names), set(weights)
  if names - keys:
    raise ValueError(f"loss(es) {sorted(names - keys)} are produced but have no weight in "
                     f"config.loss_weights (which has {sorted(keys)}); add e.g. "
                     f"--config.loss_weights.{sorted(names - keys)[0]}=0.1")
  if keys - names:
    raise ValueError(f"config.loss_weights names {sorted(keys - names)}, which no part of the "
                     f"model produces; produced losses: {sorted(names)}")


def weighted_total(losses: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """sum_k weights[k] * losses[k], after checking the names match exactly."""
  check_loss_names(losses.keys(), weights)
  return sum(jnp.float32(weights[k]) * losses[k].astype(jnp.float32) for k in sorted(losses))
