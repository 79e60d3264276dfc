"""Video-encoder checkpoints: ``config.json`` + ``model.safetensors`` in one directory.

The project's own pretrained encoder (``vsrllm_jax/tools/pretrain_encoder.py``)
is stored this way, and any encoder checkpoint loads through ``load_encoder``.
Tensors are float32 under flat keys ``params/<module>/.../<name>`` and
``batch_stats/<module>/.../<name>``; a load is checked key by key and shape by
shape against a fresh ``jax.eval_shape`` init of the config, so a checkpoint
that does not fit its config fails with a message that says where.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from vsrllm_jax.models.video_encoder import VideoEncoder, VideoEncoderConfig

FORMAT = "vsrllm_jax.avhubert_small.v1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
COLLECTIONS = ("params", "batch_stats")


def flatten(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/a/b': float32 array}."""
  out = {}

  def walk(prefix, node):
    if isinstance(node, Mapping):
      for key in sorted(node):
        walk(f"{prefix}/{key}" if prefix else str(key), node[key])
    else:
      out[prefix] = np.asarray(node, np.float32)

  for collection in COLLECTIONS:
    if collection not in variables:
      raise ValueError(f"encoder variables lack collection {collection!r}; got "
                       f"{sorted(variables)}")
    walk(collection, nn.meta.unbox(variables[collection]))
  return out


def unflatten(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of ``flatten``: nested plain dicts of numpy arrays."""
  out: dict[str, Any] = {}
  for key in sorted(tensors):
    *path, leaf = key.split("/")
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = tensors[key]
  return out


def expected_shapes(config: VideoEncoderConfig) -> dict[str, tuple[int, ...]]:
  """Flat key -> shape of a fresh init (no compute: ``jax.eval_shape``)."""
  model = VideoEncoder(config)
  video = jax.ShapeDtypeStruct((1, 1, 16, 16, 1), jnp.uint8)   # shapes do not depend on T, H, W
  mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
  abstract = jax.eval_shape(model.init, jax.random.key(0), video, mask)
  abstract = nn.meta.unbox(abstract)
  shapes = {}
  for collection in COLLECTIONS:
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract.get(collection, {})):
      key = "/".join([collection] + [p.key for p in path])
      shapes[key] = tuple(leaf.shape)
  return shapes


def config_to_json(config: VideoEncoderConfig) -> dict[str, Any]:
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()}
  return {"format": FORMAT, **fields}


def config_from_json(blob: Mapping[str, Any], source: str) -> VideoEncoderConfig:
  if blob.get("format") != FORMAT:
    raise ValueError(f"{source}: field 'format' = {blob.get('format')!r}, expected {FORMAT!r}")
  known = {f.name for f in dataclasses.fields(VideoEncoderConfig)}
  unknown = sorted(set(blob) - known - {"format"})
  if unknown:
    raise ValueError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in blob.items() if k in known}
  return VideoEncoderConfig(**kwargs)


def check_variables(config: VideoEncoderConfig, tensors: Mapping[str, np.ndarray],
                    source: str) -> None:
  """Raises ValueError naming missing / unexpected keys and shape mismatches."""
  want = expected_shapes(config)
  missing = sorted(set(want) - set(tensors))
  unexpected = sorted(set(tensors) - set(want))
  wrong = [f"{k}: {tuple(tensors[k].shape)} != expected {want[k]}"
           for k in sorted(set(want) & set(tensors)) if tuple(tensors[k].shape) != want[k]]
  if missing or unexpected or wrong:
    raise ValueError(f"{source} does not match its config: missing keys {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}, wrong shapes {wrong[:8]}")


def save_encoder(directory, config: VideoEncoderConfig, variables: Mapping[str, Any]) -> None:
  """Writes ``directory/{config.json, model.safetensors}`` atomically.

  Files go to a temporary sibling directory that is renamed into place, so a
  crash never leaves a half-written checkpoint under ``directory``; an
  existing ``directory`` is replaced.
  """
  directory = pathlib.Path(directory)
  tensors = flatten(variables)
  check_variables(config, tensors, "save_encoder variables")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    # mkdtemp makes the directory private; a checkpoint is shared like any output.
    os.chmod(tmp, 0o777 & ~umask)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
      os.chmod(tmp / f, 0o666 & ~umask)
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _require(path: pathlib.Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected an encoder checkpoint directory with "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE} (see vsrllm_jax.models.encoder_io)")


def read_config(directory) -> VideoEncoderConfig:
  """The encoder shape stored in ``directory/config.json`` (weights are not read)."""
  cfg_file = pathlib.Path(directory) / CONFIG_FILE
  _require(cfg_file)
  try:
    blob = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
  return config_from_json(blob, str(cfg_file))


def load_encoder(directory) -> tuple[VideoEncoderConfig, dict[str, Any]]:
  """(config, {'params': ..., 'batch_stats': ...}) of plain dicts of float32 numpy arrays."""
  directory = pathlib.Path(directory)
  weights_file = directory / WEIGHTS_FILE
  _require(directory / CONFIG_FILE)
  _require(weights_file)
  config = read_config(directory)
  tensors = load_file(str(weights_file))
  bad_dtype = sorted(k for k, v in tensors.items() if v.dtype != np.float32)
  if bad_dtype:
    raise ValueError(f"{weights_file}: tensors {bad_dtype[:8]} are not float32")
  check_variables(config, tensors, str(weights_file))
  variables = unflatten(tensors)
  return config, {c: variables.get(c, {}) for c in COLLECTIONS}
