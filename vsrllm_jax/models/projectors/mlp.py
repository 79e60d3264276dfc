"""``mlp``: Dense-GELU-Dense per frame (LLaVA-1.5 style), depth configurable."""
from __future__ import annotations

import flax.linen as nn

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


@register("mlp")
class MlpProjector(Projector):
  hidden_dim: int | None = None   # default: output_dim
  depth: int = 2                  # number of Dense layers (>= 1)
  sequence_preserving = True

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    if self.depth < 1:
      raise ValueError(f"projector.depth must be >= 1, got {self.depth}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = self.hidden_dim or self.output_dim
    x = features                                                     # [B, T, D]
    in_axis = "features"
    for i in range(self.depth - 1):
      x = nn.gelu(layers.Dense(hidden, (in_axis, "mlp"), name=f"dense{i}", **kw)(x),
                  approximate=False)
      in_axis = "mlp"
    tokens = layers.Dense(self.output_dim, (in_axis, "embed"), name=f"dense{self.depth - 1}",
                          **kw)(x)                                   # [B, T, E]
    return ProjectorOutput(tokens=tokens, mask=features_mask.astype(bool), aux_losses={},
                           embeddings={})
