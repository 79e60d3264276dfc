"""The training objective: LM cross-entropy, and the weighted total of named losses.

Every loss has a name; ``config.loss_weights`` must give exactly one weight per
produced name. A loss without a weight, or a weight naming no loss, is an
error: silently dropped auxiliary losses were a bug of the PyTorch original.
The auxiliary losses themselves come from the model (``models.contrastive``,
projector heads, CTC).
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


def label_weights(batch) -> jax.Array:
  """Label tokens that count in the loss: ``label_mask`` less the rows that
  ``example_mask`` marks as filler. bool [B, Ll]."""
  mask = batch["label_mask"].astype(bool)
  if "example_mask" in batch:
    mask = mask & batch["example_mask"][:, None].astype(bool)
  return mask


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
