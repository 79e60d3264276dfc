"""A video encoder of the AV-HuBERT shape: 3-D conv stem, per-frame ResNet, Transformer.

It is frozen in every default config (``config.optim.param_groups``): by
default (``train=False``) batch norm uses its running statistics (collection
``batch_stats``); the composed model calls it so even when it trains. Pretraining
(``vsrllm_jax/tools/pretrain_encoder.py``) calls it with ``train=True`` and
``mutable=['batch_stats']``: batch norm then normalises with, and updates its
running averages from, statistics over real frames only. Padded frames are
zeroed before the only time-mixing convolution, so in either mode a clip's
features do not depend on how much padding follows it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers

# AV-HuBERT's grayscale normalisation of mouth crops (after dividing by 255).
PIXEL_MEAN = 0.421
PIXEL_STD = 0.165


@dataclasses.dataclass(frozen=True)
class VideoEncoderConfig:
  stem_channels: int = 64
  resnet_channels: Sequence[int] = (64, 128, 256, 512)
  resnet_blocks: Sequence[int] = (2, 2, 2, 2)
  hidden_dim: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  remat_policy: str = "none"

  @classmethod
  def from_config_dict(cls, cfg) -> "VideoEncoderConfig":
    if cfg.name != "avhubert":
      raise ValueError(f"config encoder.name={cfg.name!r} is not known; valid: ['avhubert']")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
              for k, v in cfg.items() if k in fields}
    return cls(**kwargs)


def _conv_init(axes):
  return layers.with_axes(nn.initializers.kaiming_normal(), axes)


class PReLU(nn.Module):
  """Per-channel PReLU (AV-HuBERT's ResNet activation)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    slope = self.param("negative_slope", layers.with_axes(nn.initializers.constant(0.25),
                                                          ("conv_out",)),
                       (x.shape[-1],), self.param_dtype)
    return jnp.where(x >= 0, x, jnp.asarray(slope, x.dtype) * x)


class StemConv(nn.Module):
  """The 3-D stem convolution (kernel [kt, kh, kw, C_in, C_out], stride (1, 2, 2), 'same').

  Computed as a 2-D convolution whose input channels are the ``kt`` frames
  around each frame: the same sum of products as the 3-D convolution, but
  XLA:CPU runs it ~10x faster (its 3-D convolution with one input channel is
  slow). Parameter name and shape are those of ``nn.Conv``.
  """
  TORCH_LAYOUT = {"kernel": "conv"}   # torch_layout: [*k, in, out] -> [out, in, *k]
  features: int
  kernel_size: tuple[int, int, int] = (5, 7, 7)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):                                             # [B, T, H, W, C]
    b, t, h, w, c = x.shape
    kt, kh, kw = self.kernel_size
    kernel = self.param("kernel", _conv_init(("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")),
                        (kt, kh, kw, c, self.features), self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    xp = jnp.pad(x, ((0, 0), (kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)))
    frames = jnp.concatenate([xp[:, i:i + t] for i in range(kt)], axis=-1)   # [B, T, H, W, kt*C]
    kernel = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, self.features)
    y = jax.lax.conv_general_dilated(
        frames.reshape(b * t, h, w, kt * c), kernel, (2, 2),
        ((kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape((b, t) + y.shape[1:])                           # [B, T, H/2, W/2, F]


def _batch_norm(name, dtype, param_dtype):
  """BatchNorm whose mode (running averages or masked batch stats) is set per call."""
  return nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=param_dtype, name=name,
                      scale_init=layers.with_axes(nn.initializers.ones, ("conv_out",)),
                      bias_init=layers.with_axes(nn.initializers.zeros, ("conv_out",)))


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs) on frames [N, H, W, C]."""
  channels: int
  stride: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, frame_mask=None, train: bool = False):
    """x: [N, H, W, C]; frame_mask: [N, 1, 1, 1] bool, frames that count in train-mode
    batch statistics (None: all)."""
    conv = lambda c, k, s, name: nn.Conv(
        c, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name,
        kernel_init=_conv_init(("conv_h", "conv_w", "conv_in", "conv_out")))
    bn = lambda name: functools.partial(_batch_norm(name, self.dtype, self.param_dtype),
                                        use_running_average=not train, mask=frame_mask)
    y = PReLU(self.param_dtype, name="act1")(bn("bn1")(conv(self.channels, 3, self.stride, "conv1")(x)))
    y = bn("bn2")(conv(self.channels, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = bn("downsample_bn")(conv(self.channels, 1, self.stride, "downsample")(x))
    return PReLU(self.param_dtype, name="act2")(x + y)


class VideoEncoder(nn.Module):
  """video uint8 [B, T, H, W, 1] + mask [B, T] -> features [B, T, D]."""
  config: VideoEncoderConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video, video_mask, train: bool = False):
    """``train``: batch norm uses (and, if mutable, updates) masked batch statistics."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = video.shape[:2]
    mask = video_mask.astype(bool)
    x = (video.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    x = jnp.where(mask[:, :, None, None, None], x, 0.0).astype(self.dtype)
    # 3-D stem: the only layer that mixes neighbouring frames.
    x = StemConv(cfg.stem_channels, name="stem_conv", **kw)(x)
    stem_mask = mask[:, :, None, None, None]                        # [B, T, 1, 1, 1]
    x = _batch_norm("stem_bn", **kw)(x, use_running_average=not train, mask=stem_mask)
    x = PReLU(self.param_dtype, name="stem_act")(x)
    x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding=((0, 0), (1, 1), (1, 1)))
    # Per-frame ResNet trunk: [B*T, H, W, C].
    x = x.reshape((b * t,) + x.shape[2:])
    frame_mask = mask.reshape(b * t, 1, 1, 1)                        # [B*T, 1, 1, 1]
    for stage, (channels, blocks) in enumerate(zip(cfg.resnet_channels, cfg.resnet_blocks)):
      for i in range(blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = BasicBlock(channels, stride, name=f"stage{stage}_block{i}", **kw)(x, frame_mask, train)
    x = jnp.mean(x, axis=(1, 2)).reshape(b, t, -1)                  # [B, T, C]
    x = layers.Dense(cfg.hidden_dim, ("conv_out", "embed"), name="frontend_proj", **kw)(x)
    x = layers.TransformerStack(cfg.num_layers, cfg.num_heads, cfg.hidden_dim // cfg.num_heads,
                                cfg.mlp_dim, remat_policy=cfg.remat_policy, name="transformer",
                                **kw)(x, mask)
    x = layers.LayerNorm(name="final_norm", **kw)(x)
    return jnp.where(mask[..., None], x, 0.0)                        # [B, T, D]
