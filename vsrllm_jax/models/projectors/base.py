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
  embeddings: pooled vectors (e.g. [B, E]) for ``Projector.label_losses``.
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

  def label_losses(self, output: ProjectorOutput, label_embeds, label_mask
                   ) -> dict[str, jax.Array]:
    """Named losses between this projector's ``output`` and the label text: embeddings
    [B, L, E] (frozen LLM table) and bool mask [B, L] of the tokens that count.

    The composed model calls it after the projector whenever it has labels (the loss
    forward, not prediction), so that a loss may compare with the label while the
    label never becomes an input. None by default; a projector with such a loss
    overrides it.
    """
    del output, label_embeds, label_mask
    return {}
