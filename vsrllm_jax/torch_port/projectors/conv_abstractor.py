"""``conv_abstractor``: the temporal C-Abstractor; ours is models/projectors/conv_abstractor.py.

Residual conv blocks, a masked average pool by ``stride``, more blocks, a
LayerNorm and Dense-GELU-Dense readout. As ours, padded frames are zeroed
before every convolution, and the convolution pads 'SAME' (XLA's split: the
extra frame of an even kernel goes after the sequence).
"""
from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


class TemporalConv(nn.Conv1d):
  """A 1-D 'SAME' convolution over time on [B, T, C] (weight OIW, as torch_layout writes)."""

  def __init__(self, in_channels: int, features: int, kernel_size: int):
    super().__init__(in_channels, features, kernel_size, padding=0)

  def forward(self, x):                                              # [B, T, C]
    total = self.kernel_size[0] - 1
    x = F.pad(x.transpose(1, 2).to(self.weight.dtype), (total // 2, total - total // 2))
    return F.conv1d(x, self.weight, self.bias).transpose(1, 2)       # [B, T, F]


class ConvBlock(nn.Module):
  """Pre-LN residual block: ``norm``, padded frames zeroed, ``conv``, GELU, ``out`` (Dense)."""

  def __init__(self, width: int, kernel_size: int):
    super().__init__()
    self.norm = layers.LayerNorm(width)
    self.conv = TemporalConv(width, width, kernel_size)
    self.out = layers.Dense(width, width)

  def forward(self, x, mask):
    h = self.norm(x) * mask[..., None].to(x.dtype)
    h = F.gelu(self.conv(h), approximate="none")
    return x + self.out(h)


@register("conv_abstractor")
class ConvAbstractorProjector(Projector):
  """``in_proj``, ``pre{i}``, pool, ``post{i}``, ``out_norm``, ``readout``."""

  def __init__(self, output_dim: int, input_dim: int, *, hidden_dim: int | None = None,
               depth: int = 2, kernel_size: int = 5, stride: int = 2):
    super().__init__()
    if depth < 0 or kernel_size < 1 or stride < 1:
      raise ValueError(f"projector conv_abstractor needs depth >= 0, kernel_size >= 1 and "
                       f"stride >= 1; got {depth}, {kernel_size}, {stride}")
    width = hidden_dim or output_dim
    self.depth, self.stride = depth, stride
    self.in_proj = layers.Dense(input_dim, width)
    for i in range(depth):
      self.add_module(f"pre{i}", ConvBlock(width, kernel_size))
      self.add_module(f"post{i}", ConvBlock(width, kernel_size))
    self.out_norm = layers.LayerNorm(width)
    self.readout = layers.Mlp(width, width, output_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    mask = mask.bool()
    x = self.in_proj(features)
    for i in range(self.depth):
      x = getattr(self, f"pre{i}")(x, mask)
    x, mask = layers.masked_temporal_pool(x, mask, self.stride)     # [B, T/stride, W]
    for i in range(self.depth):
      x = getattr(self, f"post{i}")(x, mask)
    tokens = self.readout(self.out_norm(x))
    return ProjectorOutput(tokens, mask)
