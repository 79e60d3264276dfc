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


def lm_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                     label_smoothing: float = 0.0) -> jax.Array:
  """Mean next-token cross-entropy over real label tokens.

  logits [B, L, V] (at the positions that predict each label token),
  targets [B, L] int, mask [B, L] (False on padding). Computed in fp32.
  ``label_smoothing`` = eps > 0: fairseq's ``label_smoothed_nll_loss`` per token,
  (1 - eps) * nll + eps / V * sum_v(-log p_v): eps spread evenly over all V
  entries (the target's included), i.e. cross-entropy against the target
  distribution (1 - eps) * onehot + eps / V (optax.smooth_labels).
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = logz - target_logit
  if label_smoothing:
    smooth = logz - jnp.mean(logits, axis=-1)            # sum_v(-log p_v) / V
    nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
  nll = nll * mask
  return jnp.sum(nll) / jnp.maximum(jnp.sum(mask), 1)


def label_smoothing(config) -> float:
  """``config.loss.label_smoothing`` (0 when absent), checked to lie in [0, 1)."""
  eps = float((config.get("loss") or {}).get("label_smoothing", 0.0) or 0.0)
  if not 0.0 <= eps < 1.0:
    raise ValueError(f"config.loss.label_smoothing={eps} must be in [0, 1)")
  return eps


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
