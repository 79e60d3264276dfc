"""The text-aware torch projectors: ours (models/projectors/text_aware.py) that are ported.

They take the instruction embeddings (``text`` [B, L, E], ``text_mask``
[B, L]; the frozen LLM table, instruction only) and a missing text is an
error naming the projector. Padded text tokens are masked out of the mean.

- text_pevl_adapter: LayerNorm(masked mean of the text) (``text_norm``) is
  the FiLM condition of every bottleneck adapter.
"""
from __future__ import annotations

import torch
from torch import nn

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors import register
from vsrllm_jax.torch_port.projectors.adapters import PevlAdapterProjector
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


def require_text(name: str, text, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
  """Raises unless both are given with matching shapes; returns (text, bool mask)."""
  if text is None or text_mask is None:
    raise ValueError(f"projector {name!r} is text-aware: it needs text [B, L, E] and text_mask "
                     f"[B, L] (the instruction embeddings), got text={type(text).__name__}, "
                     f"text_mask={type(text_mask).__name__}")
  if text.ndim != 3 or tuple(text_mask.shape) != tuple(text.shape[:2]):
    raise ValueError(f"projector {name!r}: text must be [B, L, E] and text_mask [B, L]; got "
                     f"{tuple(text.shape)} and {tuple(text_mask.shape)}")
  return text, text_mask.bool()


def text_summary(norm: nn.Module, text, text_mask) -> torch.Tensor:
  """``norm`` (a LayerNorm) of the masked mean of the text over its real tokens: [B, E]."""
  return norm(layers.masked_mean(text.to(norm.weight.dtype), text_mask))


@register("text_pevl_adapter")
class TextPevlAdapterProjector(PevlAdapterProjector):
  """pevl_adapter whose adapters are FiLM-conditioned on the text summary."""
  text_aware = True

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               hidden_dim: int | None = None, num_adapters: int = 2,
               bottleneck_dim: int | None = None):
    Projector.__init__(self)   # pylint: disable=non-parent-init-called
    text_dim = text_dim or output_dim
    self.text_norm = layers.LayerNorm(text_dim)
    self.build_trunk(output_dim, input_dim, hidden_dim, num_adapters, bottleneck_dim,
                     condition_dim=text_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    text, text_mask = require_text("text_pevl_adapter", text, text_mask)
    x = self.trunk(features, condition=text_summary(self.text_norm, text, text_mask))
    return ProjectorOutput(self.out_proj(x), mask.bool())
