"""``config.encoder`` -> the encoder's config, module and pretrained weights, through the
registry of encoder kinds (``registry``; the shipped kinds in ``kinds``).

Video encoders take ``(video uint8 [B, T, S, S, 1], video_mask [B, T])`` and return
features [B, T, D]. Images travel as one-frame RGB clips (``video`` [B, 1, S, S, 3]);
a tower returns ``(features [B, N, D], mask [B, N])`` over its N patch tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vsrllm_jax.formats import encoder_dir
from vsrllm_jax.models.encoders import kinds  # noqa: F401  (registers the shipped kinds)
from vsrllm_jax.models.encoders.registry import KINDS, EncoderKind, kind_of, register, resolve

EncoderConfig = Any   # the config dataclass of some kind


def config_from(encoder_cfg) -> EncoderConfig:
  """The encoder's shape: from ``encoder.path``'s metadata when set, else the config keys."""
  return resolve(encoder_cfg).read_config(encoder_cfg)


def build(config: EncoderConfig, **kw):
  """The linen module for ``config`` (kw: dtype, param_dtype)."""
  return kind_of(config).build(config, **kw)


def load_pretrained(encoder_cfg) -> dict[str, Any] | None:
  """``{'params', 'batch_stats'}`` host trees from ``encoder.path`` (None: no path)."""
  kind = resolve(encoder_cfg)
  if not encoder_cfg.get("path"):
    return None
  return kind.load(encoder_cfg, kind.read_config(encoder_cfg))


def directory_config(directory) -> EncoderConfig:
  """The config of the encoder directory ``directory`` (``formats.encoder_dir``, any kind);
  no weight is read."""
  kind_name, _ = encoder_dir.read_config(directory)
  return KINDS.get(kind_name).read_config({"name": kind_name, "path": str(directory)})


def load_directory(directory) -> tuple[EncoderConfig, dict[str, Any]]:
  """(config, {'params', 'batch_stats'}) of the encoder directory ``directory``."""
  config = directory_config(directory)
  kind = kind_of(config)
  return config, kind.load({"name": kind.name, "path": str(directory)}, config)


def feature_dim(config: EncoderConfig) -> int:
  return kind_of(config).feature_dim(config)


def describe(config: EncoderConfig) -> dict[str, Any]:
  """Kind and fields, for feature-cache keys (two kinds never share an entry)."""
  return dict(dataclasses.asdict(config), encoder_class=type(config).__name__)


__all__ = ["KINDS", "EncoderConfig", "EncoderKind", "build", "config_from", "describe",
           "directory_config", "feature_dim", "kind_of", "load_directory", "load_pretrained",
           "register", "resolve"]
