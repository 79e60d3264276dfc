"""``pevl_adapter``: in_proj, residual bottleneck adapters, out_proj; ours is
models/projectors/adapters.py (the text-aware variant is in text_aware.py)."""
from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


class BottleneckAdapter(nn.Module):
  """x + up(GELU(FiLM(down(LN(x))))); the FiLM Denses (``cond_scale``, ``cond_shift``)
  exist when built with ``condition_dim`` and then a condition [B, C] / [B, T, C] is required."""

  def __init__(self, width: int, bottleneck_dim: int, condition_dim: int | None = None):
    super().__init__()
    self.norm = layers.LayerNorm(width)
    self.down = layers.Dense(width, bottleneck_dim)
    self.condition_dim = condition_dim
    if condition_dim is not None:
      self.cond_scale = layers.Dense(condition_dim, bottleneck_dim)
      self.cond_shift = layers.Dense(condition_dim, bottleneck_dim)
    self.up = layers.Dense(bottleneck_dim, width)

  def forward(self, x, condition=None):
    h = self.down(self.norm(x))
    if (condition is None) != (self.condition_dim is None):
      raise ValueError(f"BottleneckAdapter built with condition_dim={self.condition_dim} needs a "
                       "condition exactly when condition_dim is set")
    if condition is not None:
      if condition.ndim == 2:
        condition = condition[:, None, :]
      if condition.ndim != 3 or condition.shape[0] != x.shape[0]:
        raise ValueError(f"BottleneckAdapter condition must be [B, C] or [B, T, C] with "
                         f"B = {x.shape[0]}; got {tuple(condition.shape)}")
      h = h * (1 + self.cond_scale(condition)) + self.cond_shift(condition)
    return x + self.up(F.gelu(h, approximate="none"))


@register("pevl_adapter")
class PevlAdapterProjector(Projector):
  """``in_proj``, ``adapter{i}``, ``out_norm``, ``out_proj``; one token per frame."""
  sequence_preserving = True

  def __init__(self, output_dim: int, input_dim: int, *, hidden_dim: int | None = None,
               num_adapters: int = 2, bottleneck_dim: int | None = None):
    super().__init__()
    self.build_trunk(output_dim, input_dim, hidden_dim, num_adapters, bottleneck_dim)

  def build_trunk(self, output_dim, input_dim, hidden_dim, num_adapters, bottleneck_dim,
                  condition_dim=None):
    """The submodules (a text-aware subclass passes ``condition_dim``)."""
    if num_adapters < 0:
      raise ValueError(f"projector pevl_adapter needs num_adapters >= 0, got {num_adapters}")
    width = hidden_dim or output_dim
    bottleneck = bottleneck_dim or max(width // 4, 1)
    self.num_adapters = num_adapters
    self.in_proj = layers.Dense(input_dim, width)
    for i in range(num_adapters):
      self.add_module(f"adapter{i}", BottleneckAdapter(width, bottleneck, condition_dim))
    self.out_norm = layers.LayerNorm(width)
    self.out_proj = layers.Dense(width, output_dim)

  def trunk(self, features, condition=None):
    """in_proj and the adapters, out_norm -> [B, T, W]."""
    x = self.in_proj(features)
    for i in range(self.num_adapters):
      x = getattr(self, f"adapter{i}")(x, condition)
    return self.out_norm(x)

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    return ProjectorOutput(self.out_proj(self.trunk(features)), mask.bool())
