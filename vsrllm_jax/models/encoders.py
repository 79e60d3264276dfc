"""``config.encoder`` -> the frozen encoder's config, module and pretrained weights.

  name='avhubert', path=DIR         our compact AV-HuBERT-shaped encoder
                                    (``video_encoder``; the embedded default):
                                    a directory with config.json + safetensors
  name='avhubert', path=FILE.pt     the public fairseq AV-HuBERT checkpoints
                                    (``avhubert``, read by ``fairseq_checkpoint``
                                    without unpickling arbitrary objects)
  name='avhubert', path=''          random init of ``video_encoder``'s shape
                                    from the config keys (tests, ablations)
  name='vision_tower', path=DIR     a CLIP / SigLIP vision tower from a Hugging
                                    Face directory (``vision_tower``), for images

The video encoders take ``(video uint8 [B, T, S, S, 1], video_mask [B, T])``
and return features [B, T, hidden_dim]. Images travel as one-frame RGB clips
(``video`` [B, 1, S, S, 3]); the tower returns ``(features [B, N, D], mask)``
over its N patch tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn

from vsrllm_jax.models.avhubert import AvHubertConfig, AvHubertEncoder
from vsrllm_jax.models.video_encoder import VideoEncoder, VideoEncoderConfig
from vsrllm_jax.models.vision_tower import VisionTower, VisionTowerConfig

EncoderConfig = VideoEncoderConfig | AvHubertConfig | VisionTowerConfig
NAMES = ("avhubert", "vision_tower")


class ImageEncoder(nn.Module):
  """One-frame RGB clips [B, 1, S, S, 3] -> the tower's (features [B, N, D], mask [B, N])."""
  config: VisionTowerConfig

  @nn.compact
  def __call__(self, video, video_mask, train: bool = False):
    return VisionTower(self.config, name="tower")(video[:, 0], video_mask[:, 0], train)


def feature_dim(config: EncoderConfig) -> int:
  return config.hidden_size if isinstance(config, VisionTowerConfig) else config.hidden_dim


def _tower_overrides(encoder_cfg) -> dict[str, Any]:
  return {k: encoder_cfg[k] for k in ("feature_layer", "drop_cls", "post_layernorm")
          if encoder_cfg.get(k) is not None}


def _is_fairseq(path: str) -> bool:
  return str(path).endswith(".pt")


@functools.lru_cache(maxsize=1)
def _read_fairseq(path: str, layer_norm_first):
  """(config, variables) of a fairseq checkpoint, read once per process."""
  from vsrllm_jax.models import fairseq_checkpoint  # pylint: disable=g-import-not-at-top
  return fairseq_checkpoint.load_avhubert(path, layer_norm_first=layer_norm_first)


def config_from(encoder_cfg) -> EncoderConfig:
  """The encoder's shape: from ``encoder.path`` when set, else the config keys."""
  if encoder_cfg.name not in NAMES:
    raise ValueError(f"config encoder.name={encoder_cfg.name!r} is not known; valid: "
                     f"{list(NAMES)}")
  path = encoder_cfg.path
  if encoder_cfg.name == "vision_tower":
    if not path:
      raise ValueError("config encoder.name='vision_tower' needs encoder.path: a local "
                       "CLIP or SigLIP checkpoint directory")
    from vsrllm_jax.models import vision_checkpoint  # pylint: disable=g-import-not-at-top
    return vision_checkpoint.read_config(path, **_tower_overrides(encoder_cfg))
  if path and _is_fairseq(path):
    config, _ = _read_fairseq(path, encoder_cfg.get("layer_norm_first"))
    remat = encoder_cfg.get("remat_policy")
    return dataclasses.replace(config, remat_policy=remat) if remat else config
  if path:
    from vsrllm_jax.models import encoder_io  # pylint: disable=g-import-not-at-top
    return encoder_io.read_config(path)
  return VideoEncoderConfig.from_config_dict(encoder_cfg)


def build(config: EncoderConfig, **kw):
  """The linen module for ``config`` (kw: dtype, param_dtype)."""
  if isinstance(config, AvHubertConfig):
    return AvHubertEncoder(config, **kw)
  if isinstance(config, VisionTowerConfig):
    return ImageEncoder(config)   # the tower's dtypes live in its config
  return VideoEncoder(config, **kw)


def load_pretrained(encoder_cfg) -> dict[str, Any] | None:
  """``{'params', 'batch_stats'}`` host trees from ``encoder.path`` (None: no path)."""
  path = encoder_cfg.path
  if not path:
    return None
  if encoder_cfg.name == "vision_tower":
    from vsrllm_jax.models import vision_checkpoint  # pylint: disable=g-import-not-at-top
    _, params = vision_checkpoint.from_pretrained_vision(path, **_tower_overrides(encoder_cfg))
    return {"params": {"tower": params}}
  if _is_fairseq(path):
    _, variables = _read_fairseq(path, encoder_cfg.get("layer_norm_first"))
    _read_fairseq.cache_clear()   # one copy in memory is enough once it is placed
    return variables
  from vsrllm_jax.models import encoder_io  # pylint: disable=g-import-not-at-top
  return encoder_io.load_encoder(path)[1]


def describe(config: EncoderConfig) -> dict[str, Any]:
  """Kind and fields, for feature-cache keys (two kinds never share an entry)."""
  return dict(dataclasses.asdict(config), encoder_class=type(config).__name__)
