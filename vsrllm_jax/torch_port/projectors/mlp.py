"""``mlp``: Dense-GELU-Dense per frame, depth configurable; ours is models/projectors/mlp.py."""
from __future__ import annotations

import torch.nn.functional as F

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


@register("mlp")
class MlpProjector(Projector):
  """Dense layers ``dense0`` ... ``dense{depth-1}``, exact GELU between them."""
  sequence_preserving = True

  def __init__(self, output_dim: int, input_dim: int, *, hidden_dim: int | None = None,
               depth: int = 2):
    super().__init__()
    if depth < 1:
      raise ValueError(f"projector.depth must be >= 1, got {depth}")
    hidden = hidden_dim or output_dim
    self.depth = depth
    widths = [input_dim] + [hidden] * (depth - 1) + [output_dim]
    for i in range(depth):
      self.add_module(f"dense{i}", layers.Dense(widths[i], widths[i + 1]))

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    x = features                                                     # [B, T, D]
    for i in range(self.depth - 1):
      x = F.gelu(getattr(self, f"dense{i}")(x), approximate="none")
    tokens = getattr(self, f"dense{self.depth - 1}")(x)                 # [B, T, E]
    return ProjectorOutput(tokens, mask.bool())

