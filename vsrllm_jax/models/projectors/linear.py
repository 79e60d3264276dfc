"""``linear``: one Dense per frame (sequence-preserving)."""
from __future__ import annotations

import flax.linen as nn

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


@register("linear")
class LinearProjector(Projector):
  sequence_preserving = True

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    tokens = layers.Dense(self.output_dim, ("features", "embed"), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="proj")(features)  # [B, T, E]
    return ProjectorOutput(tokens=tokens, mask=features_mask.astype(bool), aux_losses={},
                           embeddings={})
