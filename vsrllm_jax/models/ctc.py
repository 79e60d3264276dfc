"""A CTC auxiliary head over characters, on encoder features or projector tokens.

Why: a frame-level CTC loss on the transcript's characters gives the visual
side a direct alignment signal that the LLM's cross-entropy only gives
through the frozen LLM.

Vocabulary (``VOCAB_SIZE`` = 39): id 0 is the CTC blank, then
``ALPHABET`` = lowercase ``a``-``z`` (ids 1-26), apostrophe (27), space (28)
and digits ``0``-``9`` (29-38). ``encode_text`` lowercases its input; any
other character is an error that names it.

CTC needs at least as many frames as label characters plus the number of
adjacent repeats; an infeasible row costs about 1e5 (optax's ``log_epsilon``),
so keep ``data.ctc_max_chars`` well under the (deduplicated) frame count.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vsrllm_jax.models import layers

BLANK_ID = 0
ALPHABET = "abcdefghijklmnopqrstuvwxyz' 0123456789"
VOCAB_SIZE = len(ALPHABET) + 1
_CHAR_TO_ID = {c: i + 1 for i, c in enumerate(ALPHABET)}
SOURCES = ("encoder", "projector")


def encode_text(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Transcripts -> (labels int32 [B, max_len], label_paddings float32 [B, max_len]).

  Padding (paddings 1) holds ``BLANK_ID``. Raises ``ValueError`` naming the
  character outside ``ALPHABET``, or the text longer than ``max_len``
  (``data.ctc_max_chars``).
  """
  labels = np.full((len(texts), max_len), BLANK_ID, np.int32)
  paddings = np.ones((len(texts), max_len), np.float32)
  for row, text in enumerate(texts):
    text = text.lower()
    bad = sorted({c for c in text if c not in _CHAR_TO_ID})
    if bad:
      raise ValueError(f"transcript {text!r} has character(s) {bad} outside the CTC alphabet "
                       f"{ALPHABET!r} (vsrllm_jax/models/ctc.py)")
    if len(text) > max_len:
      raise ValueError(f"transcript {text!r} has {len(text)} characters > "
                       f"data.ctc_max_chars={max_len}; raise data.ctc_max_chars")
    labels[row, :len(text)] = [_CHAR_TO_ID[c] for c in text]
    paddings[row, :len(text)] = 0
  return labels, paddings


def decode_labels(labels: np.ndarray, label_mask: np.ndarray) -> list[str]:
  """Inverse of ``encode_text`` (lowercased text): labels [B, N], mask [B, N] True = real."""
  return ["".join(ALPHABET[i - 1] for i, m in zip(row, keep) if m)
          for row, keep in zip(np.asarray(labels), np.asarray(label_mask).astype(bool))]


class CtcHead(nn.Module):
  """features [B, T, D] -> character logits [B, T, VOCAB_SIZE] (one Dense)."""
  vocab_size: int = VOCAB_SIZE
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layers.Dense(self.vocab_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out")(x)


def ctc_loss(logits: jax.Array, logit_mask: jax.Array, labels: jax.Array, label_mask: jax.Array,
             example_mask: jax.Array | None = None) -> jax.Array:
  """Mean over the batch of (CTC negative log-likelihood / label length).

  logits [B, T, K] (fp32 inside), logit_mask [B, T] and label_mask [B, N]
  True on real entries (real entries first), labels [B, N] int with blank 0.
  Dividing by the label length (at least 1) keeps long transcripts from
  dominating, as with a per-character cross-entropy. ``example_mask`` [B]
  drops filler rows from the mean.
  """
  per_example = optax.ctc_loss(
      logits.astype(jnp.float32), 1.0 - logit_mask.astype(jnp.float32), labels.astype(jnp.int32),
      1.0 - label_mask.astype(jnp.float32), blank_id=BLANK_ID)
  length = jnp.maximum(jnp.sum(label_mask.astype(jnp.float32), axis=1), 1.0)
  per_example = per_example / length
  if example_mask is None:
    return jnp.mean(per_example)
  valid = example_mask.astype(jnp.float32)
  return jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def check_config(ctc_config) -> tuple[bool, str]:
  """(enabled, source) from the ``ctc`` config section, validated."""
  if not ctc_config:
    return False, "encoder"
  cfg = dict(ctc_config)
  unknown = sorted(set(cfg) - {"enabled", "source"})
  if unknown:
    raise ValueError(f"config.ctc has unknown key(s) {unknown}; valid keys: ['enabled', 'source']")
  source = cfg.get("source", "encoder")
  if source not in SOURCES:
    raise ValueError(f"config.ctc.source={source!r}; expected one of {list(SOURCES)}")
  return bool(cfg.get("enabled", False)), source
