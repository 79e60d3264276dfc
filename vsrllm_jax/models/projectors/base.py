"""What every projector returns, and the fields every projector shares."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ProjectorOutput:
  """tokens [B, N, E] and mask [B, N] go to the LLM.

  aux_losses: named scalars; each name needs a weight in ``config.loss_weights``.
  embeddings: pooled vectors (e.g. [B, E]) for losses computed outside the
  projector, such as visual-text alignment against label text.
  """
  tokens: jax.Array
  mask: jax.Array
  aux_losses: dict[str, jax.Array]
  embeddings: dict[str, jax.Array]


class Projector(nn.Module):
  """Base class: the fields the composed model sets for every projector.

  Subclasses add their own fields (with defaults); ``build`` fills them from
  the ``projector`` config section. ``sequence_preserving`` projectors keep one
  token per frame (N = T), so VSP-LLM deduplication may average their runs.

  Call: ``module(features [B,T,D], features_mask [B,T], *, text=None [B,L,E],
  text_mask=None [B,L], train) -> ProjectorOutput``.
  """
  output_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  sequence_preserving = False   # class-level: not a config field
  text_aware = False
