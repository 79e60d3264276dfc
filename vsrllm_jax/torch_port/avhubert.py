"""fairseq's AV-HuBERT video encoder in PyTorch, with the checkpoint's own state-dict keys.

The PyTorch twin of ``vsrllm_jax.models.avhubert.AvHubertEncoder``: the same
computation (``AVHubertModel.extract_finetune``, video only, eval mode) built
module for module as facebookresearch/av_hubert and fairseq's wav2vec2
``TransformerEncoder`` build it, so that ``state_dict()`` has exactly the keys
``fairseq_avhubert.save`` writes (video encoder only, plus each
batch norm's ``num_batches_tracked``) and ``load_state_dict(..., strict=True)``
takes such a file's ``'model'``. A full pretrained or fine-tuned checkpoint
goes through ``encoder_state_dict`` first (prefix and unused heads dropped).

Inputs as our encoder takes them: video [B, T, H, W] or [B, T, H, W, 1]
(uint8, or float in 0..255), normalised inside with AV-HuBERT's pixel mean and
std, and ``video_mask`` [B, T] (True = real frame; fairseq's padding mask is
its negation). Padded frames are zeroed before every time-mixing op and are
zero in the output, so a clip's features do not depend on the padding after
it. Batch norm follows ``train()`` / ``eval()`` as in fairseq: call ``eval()``
for inference (``from_config`` returns the module in eval mode).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vsrllm_jax.torch_port import shapes
from vsrllm_jax.torch_port.video_encoder import (PIXEL_MEAN, PIXEL_STD, VideoEncoderShape,
                                                  check_video)

# Where fine-tuned models keep the encoder (VSP-LLM / AV-HuBERT seq2seq, CTC).
PREFIXES = ("", "encoder.w2v_model.", "w2v_encoder.w2v_model.")
# Pretraining heads, the audio front end: in AVHubertModel, unused by the video encoder.
_UNUSED = re.compile(r"^(mask_emb|label_embs_concat|final_proj\.(weight|bias)|target_glu\..+|"
                     r"feature_extractor_audio\.proj\.(weight|bias))$")


@dataclasses.dataclass(frozen=True)
class AvHubertShape(VideoEncoderShape):
  """The fields of ``models.avhubert.AvHubertConfig`` that shape the network (Base's values):
  the trunk's, as the compact encoder's, plus the positional conv, LN order and fusion."""
  conv_pos: int = 128
  conv_pos_groups: int = 16
  layer_norm_first: bool = True
  modality_fuse: str = "concat"

  @classmethod
  def of(cls, config: Any) -> "AvHubertShape":
    """From an ``AvHubertConfig`` (any object with these attributes) or a mapping of them
    (extra keys such as ``remat_policy`` are ignored; missing ones are an error)."""
    shape = shapes.read_fields(cls, config, "torch_port.avhubert",
                               "models.avhubert.AvHubertConfig")
    if shape.modality_fuse not in ("concat", "add"):
      raise ValueError(f"torch_port.avhubert: modality_fuse={shape.modality_fuse!r} is not "
                       "one of ('concat', 'add')")
    return shape


# ----------------------------------------------------------------- ResEncoder (resnet.py)

class BasicBlock(nn.Module):
  """ResNet basic block with PReLU (``relu_type='prelu'``): two 3x3 convs, 1x1 downsample."""

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu1 = nn.PReLU(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu2 = nn.PReLU(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):                                      # [N, C, H, W]
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    residual = x if self.downsample is None else self.downsample(x)
    return self.relu2(out + residual)


class ResNetTrunk(nn.Module):
  """``trunk``: stages ``layer1..layerN`` (stride 2 from the second), then a spatial mean."""

  def __init__(self, inplanes: int, channels: Sequence[int], blocks: Sequence[int]):
    super().__init__()
    self.num_stages = len(channels)
    for s, (planes, n) in enumerate(zip(channels, blocks)):
      stage = [BasicBlock(inplanes, planes, 1 if s == 0 else 2)]
      stage += [BasicBlock(planes, planes) for _ in range(1, n)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*stage))
      inplanes = planes

  def forward(self, x):                                      # [N, C, H, W] -> [N, C']
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return x.mean(dim=(2, 3))                                # AdaptiveAvgPool2d(1)


class ResEncoder(nn.Module):
  """``resnet``: 3-D conv stem (the only frame-mixing op) + per-frame ResNet."""

  def __init__(self, c: AvHubertShape):
    super().__init__()
    kt, kh, kw = c.stem_kernel
    self.frontend3D = nn.Sequential(  # pylint: disable=invalid-name
        nn.Conv3d(1, c.stem_channels, (kt, kh, kw), (1, 2, 2), (kt // 2, kh // 2, kw // 2),
                  bias=False),
        nn.BatchNorm3d(c.stem_channels), nn.PReLU(c.stem_channels),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
    self.trunk = ResNetTrunk(c.stem_channels, c.resnet_channels, c.resnet_blocks)

  def forward(self, x):                                      # [B, 1, T, H, W] -> [B, T, C]
    x = self.frontend3D(x)
    b, ch, t, h, w = x.shape
    x = x.transpose(1, 2).reshape(b * t, ch, h, w)
    return self.trunk(x).view(b, t, -1)


class VideoFeatureExtractor(nn.Module):
  """``feature_extractor_video`` (fairseq's SubModel): ResEncoder then ``proj``."""

  def __init__(self, c: AvHubertShape):
    super().__init__()
    self.resnet = ResEncoder(c)
    self.proj = nn.Linear(c.resnet_channels[-1], c.hidden_dim)

  def forward(self, x):                                      # [B, 1, T, H, W] -> [B, T, D]
    return self.proj(self.resnet(x))


# ----------------------------------------------------------------- wav2vec2 TransformerEncoder

class WeightNormConv1d(nn.Module):
  """Conv1d under ``weight_norm(dim=2)``, stored as fairseq stores it: ``weight_g`` [1, 1, K],
  ``weight_v`` [D, D/groups, K], ``bias``; weight = g * v / ||v|| (norm over all but K).
  Written out instead of ``nn.utils.weight_norm`` (deprecated; its successor renames keys)."""

  def __init__(self, dim: int, kernel_size: int, groups: int):
    super().__init__()
    self.padding, self.groups = kernel_size // 2, groups
    self.bias = nn.Parameter(torch.zeros(dim))
    self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
    self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel_size) * 0.02)

  def forward(self, x):                                      # [B, D, T] -> [B, D, T (+1)]
    norm = torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)
    weight = self.weight_g * self.weight_v / norm
    return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
  """Drops the extra last step an even kernel with padding K // 2 produces."""

  def __init__(self, kernel_size: int):
    super().__init__()
    self.remove = 1 - kernel_size % 2

  def forward(self, x):
    return x[:, :, :-self.remove] if self.remove else x


class SelfAttention(nn.Module):
  """fairseq ``MultiheadAttention`` as self-attention with a key padding mask."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

  def forward(self, x, keep):                                # [B, T, D], [B, T] True = real
    b, t, d = x.shape
    split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                         split(self.v_proj(x)), attn_mask=keep[:, None, None, :])
    return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
  """``TransformerSentenceEncoderLayer``: post-LN, or pre-LN with ``layer_norm_first``."""

  def __init__(self, c: AvHubertShape):
    super().__init__()
    self.layer_norm_first = c.layer_norm_first
    self.self_attn = SelfAttention(c.hidden_dim, c.num_heads)
    self.self_attn_layer_norm = nn.LayerNorm(c.hidden_dim)
    self.fc1 = nn.Linear(c.hidden_dim, c.mlp_dim)
    self.fc2 = nn.Linear(c.mlp_dim, c.hidden_dim)
    self.final_layer_norm = nn.LayerNorm(c.hidden_dim)

  def forward(self, x, keep):
    ffn = lambda y: self.fc2(F.gelu(self.fc1(y)))
    if self.layer_norm_first:
      x = x + self.self_attn(self.self_attn_layer_norm(x), keep)
      return x + ffn(self.final_layer_norm(x))
    x = self.self_attn_layer_norm(x + self.self_attn(x, keep))
    return self.final_layer_norm(x + ffn(x))


class TransformerEncoder(nn.Module):
  """``encoder``: x + GELU(SamePad(pos_conv(x))), the layers, ``layer_norm`` before (post-LN
  layers) or after (pre-LN layers)."""

  def __init__(self, c: AvHubertShape):
    super().__init__()
    self.pos_conv = nn.Sequential(WeightNormConv1d(c.hidden_dim, c.conv_pos, c.conv_pos_groups),
                                  SamePad(c.conv_pos), nn.GELU())
    self.layers = nn.ModuleList([EncoderLayer(c) for _ in range(c.num_layers)])
    self.layer_norm = nn.LayerNorm(c.hidden_dim)
    self.layer_norm_first = c.layer_norm_first

  def forward(self, x, keep):                                # [B, T, D], [B, T]
    x = x.masked_fill(~keep[..., None], 0.0)
    x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    if not self.layer_norm_first:
      x = self.layer_norm(x)
    for layer in self.layers:
      x = layer(x, keep)
    return self.layer_norm(x) if self.layer_norm_first else x


# ----------------------------------------------------------------- the encoder

class AvHubertEncoder(nn.Module):
  """video [B, T, H, W(, 1)] + video_mask [B, T] -> features [B, T, D], zero at padding.

  Attribute names are AVHubertModel's, so the state dict is the fairseq one.
  """

  def __init__(self, config: AvHubertShape | Any = AvHubertShape()):
    super().__init__()
    c = config if isinstance(config, AvHubertShape) else AvHubertShape.of(config)
    self.config = c
    fused = 2 * c.hidden_dim if c.modality_fuse == "concat" else c.hidden_dim
    self.feature_extractor_video = VideoFeatureExtractor(c)
    self.post_extract_proj = nn.Linear(fused, c.hidden_dim) if fused != c.hidden_dim else None
    self.layer_norm = nn.LayerNorm(fused)
    self.encoder = TransformerEncoder(c)

  @classmethod
  def from_config(cls, config: Any) -> "AvHubertEncoder":
    """From an ``AvHubertConfig`` or a mapping of its fields; in eval mode."""
    return cls(AvHubertShape.of(config)).eval()

  def forward(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    video, keep = check_video(video, video_mask, "torch_port.avhubert.AvHubertEncoder")
    dtype = self.layer_norm.weight.dtype
    x = (video.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    x = x.masked_fill(~keep[:, :, None, None], 0.0).to(dtype)
    video_feats = self.feature_extractor_video(x[:, None])  # [B, T, D]
    if self.config.modality_fuse == "concat":               # audio (zeros) first
      feats = torch.cat([torch.zeros_like(video_feats), video_feats], dim=-1)
    else:
      feats = video_feats
    feats = self.layer_norm(feats)
    if self.post_extract_proj is not None:
      feats = self.post_extract_proj(feats)
    return self.encoder(feats, keep).masked_fill(~keep[..., None], 0.0)


def encoder_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A whole AVHubertModel state dict (pretrained, or fine-tuned under one of ``PREFIXES``) ->
  the entries ``AvHubertEncoder`` loads strictly: prefix removed, unused heads dropped."""
  marker = "feature_extractor_video.proj.weight"
  found = [p for p in PREFIXES if p + marker in state_dict]
  if not found:
    raise ValueError(f"torch_port.avhubert: no AV-HuBERT video encoder in the state dict: "
                     f"expected key {marker!r} under one of the prefixes {list(PREFIXES)}")
  prefix = found[0]
  return {k[len(prefix):]: v for k, v in state_dict.items()
          if k.startswith(prefix) and not _UNUSED.search(k[len(prefix):])}
