"""AV-HuBERT's video encoder exactly as fairseq computes it (video only, eval mode).

``AvHubertEncoder`` reproduces ``AVHubertModel.extract_finetune`` of
facebookresearch/av_hubert (``avhubert/hubert.py``, ``avhubert/resnet.py``)
with ``source={'video': v, 'audio': None}``, no masking and the last layer's
output, so that the public checkpoints (``base_lrs3_iter5.pt``,
``large_vox_iter5.pt``, the fine-tuned ``*_433h.pt`` that VSP-LLM starts from)
give the features they were trained to give:

  ResEncoder (3-D conv stem + ResNet-18 per frame, PReLU) -> proj (512 -> D)
  -> concat([zeros (audio), video]) -> LayerNorm(2D) -> post_extract_proj (2D -> D)
  -> wav2vec2 TransformerEncoder: padded frames zeroed, x + GELU(SamePad(weight-normed
     grouped pos_conv(x))), LayerNorm before (post-LN layers) or after (pre-LN layers).

Padded frames are zero before every time-mixing op (as fairseq's collater and
encoder make them), and attention ignores them, so a clip's features do not
depend on how much padding follows it. ``formats.fairseq_avhubert`` says where
each fairseq state-dict tensor lives in this module's variables, and reads and
writes the .pt files.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.encoders.video_encoder import (PIXEL_MEAN, PIXEL_STD, BasicBlock, PReLU,
                                             StemConv, _batch_norm)

MODALITY_FUSE = ("concat", "add")


@dataclasses.dataclass(frozen=True)
class AvHubertConfig:
  """Shapes of an AV-HuBERT video encoder (fairseq's names in comments).

  ``layer_norm_first`` is True for every published AV-HuBERT checkpoint
  (``layer_norm_first: true`` in conf/pretrain/base_lrs3_iter5.yaml and
  large_vox_iter5.yaml); the loader takes it from a checkpoint's cfg when the
  cfg says.
  """
  stem_channels: int = 64                       # resnet.frontend_nout
  stem_kernel: Sequence[int] = (5, 7, 7)        # frontend3D Conv3d kernel (t, h, w)
  resnet_channels: Sequence[int] = (64, 128, 256, 512)
  resnet_blocks: Sequence[int] = (2, 2, 2, 2)
  hidden_dim: int = 768                         # encoder_embed_dim
  num_layers: int = 12                          # encoder_layers
  num_heads: int = 12                           # encoder_attention_heads
  mlp_dim: int = 3072                           # encoder_ffn_embed_dim
  conv_pos: int = 128                           # positional conv kernel
  conv_pos_groups: int = 16
  layer_norm_first: bool = True
  modality_fuse: str = "concat"                 # 'concat' (published) or 'add'
  remat_policy: str = "none"

  def __post_init__(self):
    for name in ("stem_kernel", "resnet_channels", "resnet_blocks"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    problems = []
    if len(self.stem_kernel) != 3:
      problems.append(f"stem_kernel={self.stem_kernel} must have 3 entries (t, h, w)")
    if len(self.resnet_channels) != len(self.resnet_blocks) or not self.resnet_channels:
      problems.append(f"resnet_channels={self.resnet_channels} and resnet_blocks="
                      f"{self.resnet_blocks} must be non-empty and of equal length")
    if self.hidden_dim % self.num_heads:
      problems.append(f"hidden_dim={self.hidden_dim} is not a multiple of num_heads="
                      f"{self.num_heads}")
    if self.hidden_dim % self.conv_pos_groups:
      problems.append(f"hidden_dim={self.hidden_dim} is not a multiple of conv_pos_groups="
                      f"{self.conv_pos_groups}")
    if self.modality_fuse not in MODALITY_FUSE:
      problems.append(f"modality_fuse={self.modality_fuse!r} is not one of {MODALITY_FUSE}")
    if problems:
      raise ValueError("AvHubertConfig: " + "; ".join(problems))

  @property
  def fused_dim(self) -> int:
    """Width of the fused audio-visual features (fairseq's ``self.embed``)."""
    return 2 * self.hidden_dim if self.modality_fuse == "concat" else self.hidden_dim

  @classmethod
  def base(cls, **overrides) -> "AvHubertConfig":
    """AV-HuBERT Base (base_lrs3_iter5.pt, base_vox_iter5.pt): 12 x 768, 12 heads."""
    return cls(**overrides)

  @classmethod
  def large(cls, **overrides) -> "AvHubertConfig":
    """AV-HuBERT Large (large_lrs3_iter5.pt, large_vox_iter5.pt): 24 x 1024, 16 heads."""
    return cls(**{**dict(hidden_dim=1024, num_layers=24, num_heads=16, mlp_dim=4096),
                  **overrides})


class PositionalConv(nn.Module):
  """wav2vec2's relative positional conv: GELU(SamePad(weight_norm(Conv1d))). [B,T,D]->[B,T,D].

  Kept in weight-norm form (``weight_g`` [K], ``weight_v`` [K, D/groups, D]) so
  that a checkpoint round-trips bit-exactly; weight = g * v / ||v|| with the
  norm over all but the kernel axis (torch ``weight_norm(dim=2)``). An even
  kernel gives T+1 outputs of which SamePad drops the last: here, one less
  pad on the right.
  """
  kernel_size: int
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, d = self.kernel_size, x.shape[-1]
    std = math.sqrt(4.0 / (k * d))
    v = self.param("weight_v", layers.with_axes(nn.initializers.normal(std),
                                                ("conv_w", "conv_in", "conv_out")),
                   (k, d // self.groups, d), self.param_dtype)
    norm_of = lambda w: jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(w, jnp.float32)), axis=(1, 2)))
    g = self.param("weight_g", layers.with_axes(lambda *_: norm_of(v).astype(self.param_dtype),
                                                ("conv_w",)), (k,), self.param_dtype)
    bias = self.param("bias", layers.with_axes(nn.initializers.zeros, ("conv_out",)), (d,),
                      self.param_dtype)
    scale = jnp.asarray(g, jnp.float32) / norm_of(v)
    kernel = (jnp.asarray(v, jnp.float32) * scale[:, None, None]).astype(self.dtype)
    pad = (k // 2, k // 2 - (1 - k % 2))
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, self.dtype), kernel, (1,), (pad,),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
    return nn.gelu(y + jnp.asarray(bias, self.dtype), approximate=False)


class AvHubertLayer(nn.Module):
  """fairseq TransformerSentenceEncoderLayer: post-LN, or pre-LN with ``layer_norm_first``.

  x [B, T, D], mask [B, T] (keys that may be attended) -> (x, None) for ``nn.scan``.
  """
  num_heads: int
  head_dim: int
  mlp_dim: int
  layer_norm_first: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = layers.MultiHeadAttention(self.num_heads, self.head_dim, name="self_attn", **kw)
    attn_norm = layers.LayerNorm(name="self_attn_layer_norm", **kw)
    mlp = layers.Mlp(self.mlp_dim, activation="gelu", name="mlp", **kw)   # fc1 -> wi, fc2 -> wo
    mlp_norm = layers.LayerNorm(name="final_layer_norm", **kw)
    if self.layer_norm_first:
      x = x + attn(attn_norm(x), mask)
      x = x + mlp(mlp_norm(x))
    else:
      x = attn_norm(x + attn(x, mask))
      x = mlp_norm(x + mlp(x))
    return x, None


def _check_inputs(video, video_mask):
  if video.ndim != 5 or video.shape[-1] != 1:
    raise ValueError(f"AvHubertEncoder: video must be [B, T, H, W, 1] grayscale frames; got "
                     f"shape {video.shape}")
  if tuple(video_mask.shape) != tuple(video.shape[:2]):
    raise ValueError(f"AvHubertEncoder: video_mask must be [B, T] = {video.shape[:2]}; got "
                     f"{video_mask.shape}")


class AvHubertEncoder(nn.Module):
  """video uint8 [B, T, H, W, 1] (88x88 mouth crops) + mask [B, T] -> features [B, T, D].

  ``train=True`` only switches batch norm to (masked) batch statistics, as in
  ``VideoEncoder``; dropout and masking of fine-tuning are not modelled.
  """
  config: AvHubertConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, video, video_mask, train: bool = False):
    cfg = self.config
    _check_inputs(video, video_mask)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = video.shape[:2]
    mask = video_mask.astype(bool)
    x = (video.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    x = jnp.where(mask[:, :, None, None, None], x, 0.0).astype(self.dtype)
    # ResEncoder.frontend3D: the only time-mixing op before the Transformer.
    x = StemConv(cfg.stem_channels, tuple(cfg.stem_kernel), name="stem_conv", **kw)(x)
    x = _batch_norm("stem_bn", **kw)(x, use_running_average=not train,
                                     mask=mask[:, :, None, None, None])
    x = PReLU(self.param_dtype, name="stem_act")(x)
    x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding=((0, 0), (1, 1), (1, 1)))
    # ResEncoder.trunk, per frame: [B*T, H, W, C].
    x = x.reshape((b * t,) + x.shape[2:])
    frame_mask = mask.reshape(b * t, 1, 1, 1)
    for stage, (channels, blocks) in enumerate(zip(cfg.resnet_channels, cfg.resnet_blocks)):
      for i in range(blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        x = BasicBlock(channels, stride, name=f"stage{stage}_block{i}", **kw)(x, frame_mask, train)
    x = jnp.mean(x, axis=(1, 2)).reshape(b, t, -1)                   # AdaptiveAvgPool2d(1)
    video_feats = layers.Dense(cfg.hidden_dim, ("conv_out", "embed"), name="video_proj",
                               **kw)(x)                                # [B, T, D]
    if cfg.modality_fuse == "concat":                                  # audio (zeros) first
      feats = jnp.concatenate([jnp.zeros_like(video_feats), video_feats], axis=-1)
    else:
      feats = video_feats
    feats = layers.LayerNorm(name="feature_norm", **kw)(feats)        # [B, T, fused_dim]
    if cfg.fused_dim != cfg.hidden_dim:
      feats = layers.Dense(cfg.hidden_dim, ("fused", "embed"), name="post_extract_proj",
                           **kw)(feats)
    # TransformerEncoder.extract_features.
    x = jnp.where(mask[..., None], feats, 0.0)
    x = x + PositionalConv(cfg.conv_pos, cfg.conv_pos_groups, name="pos_conv", **kw)(x)
    final_norm = layers.LayerNorm(name="encoder_norm", **kw)
    if not cfg.layer_norm_first:
      x = final_norm(x)
    stack = layers.scan_layers(AvHubertLayer, cfg.num_layers, num_broadcast=1,
                               remat_policy=cfg.remat_policy)
    x, _ = stack(cfg.num_heads, cfg.hidden_dim // cfg.num_heads, cfg.mlp_dim,
                 cfg.layer_norm_first, name="layers", **kw)(x, mask)
    if cfg.layer_norm_first:
      x = final_norm(x)
    return jnp.where(mask[..., None], x, 0.0)                          # [B, T, D]


def init_variables(config: AvHubertConfig, rng=None, *, abstract: bool = False):
  """Fresh (or, with ``abstract``, shape-only) variables of ``AvHubertEncoder(config)``."""
  model = AvHubertEncoder(config)
  video = jax.ShapeDtypeStruct((1, 1, 16, 16, 1), jnp.uint8)   # shapes do not depend on T, H, W
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  init = functools.partial(model.init, rng if rng is not None else jax.random.key(0))
  if abstract:
    return jax.eval_shape(init, video, mask)
  return jax.jit(init)(jnp.zeros(video.shape, video.dtype), jnp.zeros(mask.shape, mask.dtype))


def params_count(config: AvHubertConfig) -> int:
  """Parameters of the video-only encoder (batch-norm statistics not counted)."""
  abstract = nn.meta.unbox(init_variables(config, abstract=True))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
