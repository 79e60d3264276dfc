"""``linear``: one Dense per frame (sequence-preserving); ours is models/projectors/linear.py."""
from __future__ import annotations

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


@register("linear")
class LinearProjector(Projector):
  sequence_preserving = True

  def __init__(self, output_dim: int, input_dim: int):
    super().__init__()
    self.proj = layers.Dense(input_dim, output_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    return ProjectorOutput(self.proj(features), mask.bool())               # [B, T, E]
