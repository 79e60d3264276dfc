"""VSP-LLM deduplication: average runs of frames given per-sample cluster counts.

Each sample has its own run lengths (the PyTorch original applied sample 0's
counts to the whole batch). Shapes stay static: the output keeps T slots, of
which the first ``num_runs`` are real.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def average_runs(tokens: jax.Array, mask: jax.Array, counts: jax.Array):
  """tokens [B, T, E], mask [B, T], counts [B, T] int (run lengths, 0-padded).

  Returns (tokens [B, T, E], mask [B, T]): slot k holds the mean of the real
  frames of run k. Frames beyond ``sum(counts)`` are ignored.
  """
  b, t, _ = tokens.shape
  counts = counts.astype(jnp.int32)
  ends = jnp.cumsum(counts, axis=1)                                   # [B, T]
  frame = jnp.arange(t)
  run_of_frame = jax.vmap(lambda e: jnp.searchsorted(e, frame, side="right"))(ends)  # [B, T]
  frame_ok = mask.astype(bool) & (frame[None] < ends[:, -1:])
  onehot = (run_of_frame[:, None, :] == jnp.arange(t)[None, :, None]) & frame_ok[:, None, :]
  weights = onehot.astype(jnp.float32)                                # [B, runs, frames]
  n = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("brt,bte->bre", weights / jnp.maximum(n, 1), tokens.astype(jnp.float32))
  return out.astype(tokens.dtype), n[..., 0] > 0
