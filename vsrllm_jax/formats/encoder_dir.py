"""Encoder directories: ``config.json`` + ``model.safetensors``, for any encoder kind.

The embedded default encoder is stored this way, and so is any encoder kind that
has no format of its own (its export and import, ``models.encoders``). The
config names the kind and holds its config's fields; tensors are float32 under
flat keys ``params/<module>/.../<name>`` and ``batch_stats/...``. A load is
checked key by key and shape by shape against the shapes the kind expects, so a
checkpoint that does not fit its config fails with a message that says where.
Directories written before kinds were named (``FORMAT_V1``) hold the compact
encoder's fields at the top level.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vsrllm_jax.formats import safetensors_io

FORMAT = "vsrllm_jax.encoder.v2"
FORMAT_V1 = "vsrllm_jax.avhubert_small.v1"     # the compact encoder, before kinds
V1_KIND = "compact"
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
    walk(collection, nn.meta.unbox(dict(variables).get(collection) or {}))
  return out


def unflatten(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of ``flatten``: {'params', 'batch_stats'} of nested dicts of numpy arrays."""
  out: dict[str, Any] = {c: {} for c in COLLECTIONS}
  for key in sorted(tensors):
    *path, leaf = key.split("/")
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = tensors[key]
  return out


def check(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple], source: str) -> None:
  """Raises ValueError naming missing / unexpected keys and shape mismatches."""
  missing = sorted(set(shapes) - set(tensors))
  unexpected = sorted(set(tensors) - set(shapes))
  wrong = [f"{k}: {tuple(np.shape(tensors[k]))} != expected {tuple(shapes[k])}"
           for k in sorted(set(shapes) & set(tensors))
           if tuple(np.shape(tensors[k])) != tuple(shapes[k])]
  if missing or unexpected or wrong:
    raise ValueError(f"{source} does not match its config: missing keys {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                     f"{' ...' if len(unexpected) > 8 else ''}, wrong shapes {wrong[:8]}")


def _require(path: pathlib.Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected an encoder directory with "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE} (vsrllm_jax.formats.encoder_dir)")


def read_config(directory) -> tuple[str, dict[str, Any]]:
  """(kind name, its config's fields as JSON) from ``directory/config.json``; no weight
  is read."""
  cfg_file = pathlib.Path(directory) / CONFIG_FILE
  _require(cfg_file)
  try:
    blob = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
  if blob.get("format") == FORMAT_V1:
    return V1_KIND, {k: v for k, v in blob.items() if k != "format"}
  if blob.get("format") != FORMAT or "kind" not in blob:
    raise ValueError(f"{cfg_file}: field 'format' = {blob.get('format')!r}, expected {FORMAT!r} "
                     f"(with 'kind') or {FORMAT_V1!r}")
  return blob["kind"], dict(blob.get("config") or {})


def load(directory, shapes: Mapping[str, tuple]) -> dict[str, Any]:
  """{'params', 'batch_stats'} (nested dicts of float32 numpy) of ``directory``, checked
  against ``shapes`` (flat key -> shape, as ``flatten`` names them)."""
  weights_file = pathlib.Path(directory) / WEIGHTS_FILE
  _require(weights_file)
  tensors = safetensors_io.read_all(weights_file)
  bad_dtype = sorted(k for k, v in tensors.items() if v.dtype != np.float32)
  if bad_dtype:
    raise ValueError(f"{weights_file}: tensors {bad_dtype[:8]} are not float32")
  check(tensors, shapes, str(weights_file))
  return unflatten(tensors)


def save(directory, kind: str, config_json: Mapping[str, Any], variables: Mapping[str, Any],
         shapes: Mapping[str, tuple]) -> None:
  """Writes ``directory/{config.json, model.safetensors}`` atomically.

  Files go to a temporary sibling directory that is renamed into place, so a
  crash never leaves a half-written checkpoint under ``directory``; an
  existing ``directory`` is replaced.
  """
  directory = pathlib.Path(directory)
  tensors = flatten(variables)
  check(tensors, shapes, "the encoder variables to save")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    blob = {"format": FORMAT, "kind": kind, "config": dict(config_json)}
    (tmp / CONFIG_FILE).write_text(json.dumps(blob, indent=2) + "\n")
    safetensors_io.write(tmp / WEIGHTS_FILE, tensors, metadata={"format": FORMAT, "kind": kind})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp's directory is private; a checkpoint is not
    (tmp / CONFIG_FILE).chmod(0o666 & ~umask)
    if directory.exists():
      old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
