"""Encoder kinds: one registry, each kind saying how to read, build, load and export itself.

``config.encoder.name`` names a kind (or an alias that several kinds share,
tried in order: ``avhubert`` is a fairseq .pt path, else the compact encoder).
A kind is an ``EncoderKind``; the defaults make a new kind work with no other
change: its shape from the config's keys (or an encoder directory), random
init or weights from an encoder directory (``formats.encoder_dir``), export to
and import from such a directory. A kind with a format of its own (fairseq
AV-HuBERT, Hugging Face vision towers) overrides what differs, and names the
``torch_port`` encoder that runs it in PyTorch (``torch_twin``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.formats import encoder_dir
from vsrllm_jax.registry import Registry

KINDS: Registry["EncoderKind"] = Registry("encoder kind")
_ALIASES: dict[str, list[str]] = {}


def _json_value(v):
  return [_json_value(x) for x in v] if isinstance(v, (tuple, list)) else v


class EncoderKind:
  """An encoder kind; subclasses set ``name`` and ``config_type`` and override what differs.

  The encoder module is called ``module(video uint8 [B, T, S, S, C], video_mask
  [B, T])`` and returns features [B, T, D], or (features [B, N, D], mask [B, N]).
  """
  name = ""
  config_type: type = type(None)
  torch_twin: str | None = None      # the torch_port encoder that runs its export

  # --- the shape -----------------------------------------------------------------

  def accepts(self, encoder_cfg) -> bool:
    """Whether this kind reads ``encoder_cfg`` (a name several kinds share)."""
    del encoder_cfg
    return True

  def read_config(self, encoder_cfg):
    """The encoder's config: from ``encoder.path``'s metadata (no weights read), else from
    the config's keys."""
    if encoder_cfg.get("path"):
      kind, blob = encoder_dir.read_config(encoder_cfg["path"])
      if kind != self.name:
        raise ValueError(f"config encoder.path={encoder_cfg['path']!r} holds a {kind!r} encoder; "
                         f"encoder.name={encoder_cfg['name']!r} reads {self.name!r}")
      return self.config_from_json(blob)
    fields = {f.name for f in dataclasses.fields(self.config_type)}
    return self.config_from_json({k: v for k, v in dict(encoder_cfg).items() if k in fields})

  def config_to_json(self, config) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in dataclasses.asdict(config).items()}

  def config_from_json(self, blob: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(self.config_type)}
    unknown = sorted(set(blob) - known)
    if unknown:
      raise ValueError(f"encoder kind {self.name!r}: unknown config fields {unknown}; known: "
                       f"{sorted(known)}")
    return self.config_type(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in blob.items()})

  def feature_dim(self, config) -> int:
    return config.hidden_dim

  # --- the module and its weights -----------------------------------------------

  def build(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    raise NotImplementedError(f"encoder kind {self.name!r} does not build a module")

  def sample_input(self, config) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """(video, video_mask) shapes that initialise the module (variable shapes do not
    depend on their length or size)."""
    del config
    return (jax.ShapeDtypeStruct((1, 1, 16, 16, 1), jnp.uint8),
            jax.ShapeDtypeStruct((1, 1), jnp.bool_))

  def variable_shapes(self, config) -> dict[str, tuple[int, ...]]:
    """Flat key ('params/a/b', 'batch_stats/...') -> shape, allocating nothing."""
    abstract = nn.meta.unbox(jax.eval_shape(self.build(config).init, jax.random.key(0),
                                            *self.sample_input(config)))
    shapes = {}
    for collection in encoder_dir.COLLECTIONS:
      for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.get(collection, {})):
        shapes["/".join([collection] + [p.key for p in path])] = tuple(leaf.shape)
    return shapes

  def save(self, directory: str, config, variables) -> None:
    """Writes an encoder directory (``formats.encoder_dir``) that ``load`` reads back."""
    encoder_dir.save(directory, self.name, self.config_to_json(config), variables,
                     self.variable_shapes(config))

  def load(self, encoder_cfg, config) -> dict[str, Any] | None:
    """``{'params', 'batch_stats'}`` host trees from ``encoder.path`` (None: no path)."""
    if not encoder_cfg.get("path"):
      return None
    return encoder_dir.load(encoder_cfg["path"], self.variable_shapes(config))

  # --- export and import ---------------------------------------------------------

  def export(self, out_dir: str, config, variables, encoder_cfg) -> dict[str, Any]:
    """Writes the encoder into the export ``out_dir``; returns where it is and its format
    (convert adds the kind, the config and the torch twin)."""
    del encoder_cfg
    self.save(os.path.join(out_dir, "encoder"), config, variables)
    return {"dir": "encoder", "format": encoder_dir.FORMAT}

  def import_export(self, export_dir: str, entry: Mapping[str, Any], encoder_cfg, workdir: str
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the encoder config keys that change, e.g. ``path``; the variables) of the encoder
    ``entry`` of an export, for a new run in ``workdir`` whose config is ``encoder_cfg``."""
    del encoder_cfg, workdir
    path = os.path.abspath(os.path.join(export_dir, entry.get("dir") or entry["file"]))
    config = self.read_config({"path": path, "name": self.name})
    return {"path": path, "name": self.name}, encoder_dir.load(path, self.variable_shapes(config))


def register(kind: EncoderKind, *, aliases: tuple[str, ...] = ()) -> EncoderKind:
  """Registers ``kind`` under its name and ``aliases`` (tried in registration order)."""
  KINDS.register(kind.name)(kind)
  for alias in aliases:
    _ALIASES.setdefault(alias, []).append(kind.name)
  return kind


def resolve(encoder_cfg) -> EncoderKind:
  """The kind that reads ``config.encoder``."""
  name = encoder_cfg["name"]
  candidates = _ALIASES.get(name, []) + ([name] if name in KINDS.names() else [])
  for candidate in candidates:
    kind = KINDS.get(candidate)
    if kind.accepts(encoder_cfg):
      return kind
  raise ValueError(f"config encoder.name={name!r} names no encoder kind that reads "
                   f"encoder.path={encoder_cfg.get('path')!r}; kinds: {KINDS.names()}, "
                   f"aliases: {sorted(_ALIASES)}")


def kind_of(config) -> EncoderKind:
  """The kind whose config ``config`` is."""
  for name in KINDS.names():
    kind = KINDS.get(name)
    if type(config) is kind.config_type:
      return kind
  raise ValueError(f"no encoder kind has the config type {type(config).__name__}")
