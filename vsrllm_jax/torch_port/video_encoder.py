"""Our compact AV-HuBERT-shaped encoder (``models/encoders/video_encoder.py``) in PyTorch.

The module tree mirrors the flax one (``stem_conv``, ``stem_bn``, ``stem_act``,
``stage{s}_block{i}`` with ``conv1/bn1/act1/conv2/bn2/downsample/
downsample_bn/act2``, ``frontend_proj``, ``transformer.layers.{i}``,
``final_norm``), so the ``torch_layout`` state dict of the encoder's params,
together with that of its ``batch_stats`` (``mean``/``var`` ->
``running_mean``/``running_var``), loads with ``strict=True``. The encoder is
frozen wherever we use it, so batch norm here always uses its running
statistics (the state dict then has no ``num_batches_tracked``). Convolutions
run channels-first, as torch's do; the weights arrive as OIHW / OIDHW.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vsrllm_jax.torch_port import layers, shapes

# AV-HuBERT's grayscale normalisation (after /255): models/encoders/video_encoder.py's values.
PIXEL_MEAN = 0.421
PIXEL_STD = 0.165


def check_video(video: torch.Tensor, video_mask: torch.Tensor, who: str):
  """video [B, T, H, W] or [B, T, H, W, 1], mask [B, T] -> (video [B, T, H, W], mask bool)."""
  if video.ndim == 5 and video.shape[-1] == 1:
    video = video[..., 0]
  if video.ndim != 4:
    raise ValueError(f"{who}: video must be [B, T, H, W] or [B, T, H, W, 1] grayscale frames "
                     f"(uint8, or float in 0..255); got shape {tuple(video.shape)}")
  if tuple(video_mask.shape) != tuple(video.shape[:2]):
    raise ValueError(f"{who}: video_mask must be [B, T] = {tuple(video.shape[:2])} (True = real "
                     f"frame); got {tuple(video_mask.shape)}")
  return video, video_mask.bool()


@dataclasses.dataclass(frozen=True)
class VideoEncoderShape:
  """The fields of ``models.video_encoder.VideoEncoderConfig`` that shape the network."""
  stem_channels: int = 64
  resnet_channels: Sequence[int] = (64, 128, 256, 512)
  resnet_blocks: Sequence[int] = (2, 2, 2, 2)
  hidden_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  stem_kernel: Sequence[int] = (5, 7, 7)     # StemConv's default: not a config field there

  @classmethod
  def of(cls, config: Any) -> "VideoEncoderShape":
    """From a ``VideoEncoderConfig`` (any object with these attributes) or a mapping (e.g.
    the encoder's config.json); ``stem_kernel`` may be absent, other fields may not."""
    return shapes.read_fields(cls, config, "torch_port.video_encoder",
                              "models.video_encoder.VideoEncoderConfig", optional=("stem_kernel",))


class PReLU(nn.Module):
  """Per-channel PReLU with our param name ``negative_slope`` [C]; channels on dim 1."""

  def __init__(self, channels: int):
    super().__init__()
    self.negative_slope = nn.Parameter(torch.full((channels,), 0.25))

  def forward(self, x):
    return F.prelu(x, self.negative_slope.to(x.dtype))


class BatchNorm(nn.Module):
  """flax ``nn.BatchNorm`` with running averages (eps 1e-5): ``weight`` (flax's scale),
  ``bias``, buffers ``running_mean`` / ``running_var``; channels on dim 1."""

  def __init__(self, channels: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    self.register_buffer("running_mean", torch.zeros(channels))
    self.register_buffer("running_var", torch.ones(channels))

  def forward(self, x):
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                        training=False, eps=self.eps)


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs) on frames [N, C, H, W]."""

  def __init__(self, in_channels: int, channels: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
    self.bn1 = BatchNorm(channels)
    self.act1 = PReLU(channels)
    self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    self.bn2 = BatchNorm(channels)
    self.downsample = self.downsample_bn = None
    if stride != 1 or in_channels != channels:
      self.downsample = nn.Conv2d(in_channels, channels, 1, stride, bias=False)
      self.downsample_bn = BatchNorm(channels)
    self.act2 = PReLU(channels)

  def forward(self, x):
    y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
    if self.downsample is not None:
      x = self.downsample_bn(self.downsample(x))
    return self.act2(x + y)


class VideoEncoder(nn.Module):
  """video [B, T, H, W(, 1)] (uint8, or float in 0..255) + video_mask [B, T] (True = real)
  -> features [B, T, D], zero at padded frames."""

  def __init__(self, config: VideoEncoderShape | Any = VideoEncoderShape()):
    super().__init__()
    c = config if isinstance(config, VideoEncoderShape) else VideoEncoderShape.of(config)
    self.config = c
    kt, kh, kw = c.stem_kernel
    self.stem_conv = nn.Conv3d(1, c.stem_channels, (kt, kh, kw), (1, 2, 2),
                               (kt // 2, kh // 2, kw // 2), bias=False)
    self.stem_bn = BatchNorm(c.stem_channels)
    self.stem_act = PReLU(c.stem_channels)
    in_channels = c.stem_channels
    self.block_names = []
    for stage, (channels, blocks) in enumerate(zip(c.resnet_channels, c.resnet_blocks)):
      for i in range(blocks):
        name = f"stage{stage}_block{i}"
        setattr(self, name, BasicBlock(in_channels, channels, 2 if stage > 0 and i == 0 else 1))
        self.block_names.append(name)
        in_channels = channels
    self.frontend_proj = layers.Dense(in_channels, c.hidden_dim)
    self.transformer = layers.TransformerStack(c.num_layers, c.hidden_dim, c.num_heads,
                                               c.hidden_dim // c.num_heads, c.mlp_dim)
    self.final_norm = layers.LayerNorm(c.hidden_dim)

  @classmethod
  def from_config(cls, config: Any) -> "VideoEncoder":
    return cls(VideoEncoderShape.of(config)).eval()

  def forward(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    video, keep = check_video(video, video_mask, "torch_port.video_encoder.VideoEncoder")
    b, t = video.shape[:2]
    x = (video.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    x = x.masked_fill(~keep[:, :, None, None], 0.0).to(self.stem_conv.weight.dtype)
    # 3-D stem, the only layer that mixes neighbouring frames: [B, 1, T, H, W] -> [B, C, T, ...].
    x = self.stem_act(self.stem_bn(self.stem_conv(x[:, None])))
    x = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = x.transpose(1, 2).flatten(0, 1)                               # [B*T, C, H, W]
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = self.frontend_proj(x.mean(dim=(2, 3)).view(b, t, -1))          # [B, T, D]
    x = self.final_norm(self.transformer(x, keep))
    return x.masked_fill(~keep[..., None], 0.0)
