"""CLIP / SigLIP vision towers from local Hugging Face checkpoint directories.

Reads ``config.json`` (+ ``preprocessor_config.json`` when present) and
``model.safetensors`` (or the shards of ``model.safetensors.index.json``) of a
``CLIPVisionModel``, ``CLIPModel``, ``SiglipVisionModel`` or ``SiglipModel``
directory, through the same reader and key-map mechanism as the LLM (``tensor_map``):
plain reads, one param at a time, and with a mesh each device's slice read
and placed on its own. The vision tensors are found by their patch
embedding: ``embeddings.patch_embedding.weight`` under whatever prefix the
file uses (none for transformers 5's ``CLIPVisionModel``, ``vision_model.``
for the two-tower models and older files, ``model.vision_tower.vision_model.``
or similar inside a VLM). Keys outside that prefix (text tower, projections,
logit scale) are ignored; inside it, the only tolerated extras are the
position-id buffer, SigLIP's pooling head, an unused post-layernorm and the
layers past ``feature_layer``. Anything else missing or unexpected raises.

``save_vision_tower`` is the inverse (the export, ``vsrllm_jax.convert``): our
params back in the HF layout, completed from the source directory with what
the tower never loaded, as a ``CLIPVisionModel`` / ``SiglipVisionModel``
directory that transformers loads with no missing or unexpected keys and that
this loader reads back bit-identically.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax import sharding as sharding_lib
from vsrllm_jax.formats import safetensors_io, tensor_map
from vsrllm_jax.formats.hf_llm import default_param_dtype
from vsrllm_jax.formats.tensor_map import CONV, FLATTEN, Rule, linear
from vsrllm_jax.models.layers import dtype_from_name
from vsrllm_jax.models.encoders.vision_tower import VisionTower, VisionTowerConfig

PATCH_KEY = "embeddings.patch_embedding.weight"
_PREPROCESSOR = "preprocessor_config.json"
# What an export's keys start with: transformers' own prefix for these classes
# before version 5, which version 5 also reads.
EXPORT_PREFIX = "vision_model."
_ARCHITECTURES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}
# The config.json fields that VisionTowerConfig takes from the HF config.
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps")




def key_map(config: VisionTowerConfig) -> list[Rule]:
  """Our tower param paths <-> vision tensor names (without the file's prefix)."""
  rules = [Rule(("embeddings", "patch_embedding", "kernel"), PATCH_KEY, CONV),
           Rule(("embeddings", "patch_embedding", "bias"), "embeddings.patch_embedding.bias"),
           Rule(("embeddings", "class_embedding"), "embeddings.class_embedding"),
           Rule(("embeddings", "position_embedding"), "embeddings.position_embedding.weight"),
           Rule(("pre_layernorm", "scale"), "pre_layrnorm.weight"),     # sic: HF's spelling
           Rule(("pre_layernorm", "bias"), "pre_layrnorm.bias"),
           Rule(("post_layernorm", "scale"), "post_layernorm.weight"),
           Rule(("post_layernorm", "bias"), "post_layernorm.bias")]
  layer = lambda ours, theirs, how=tensor_map.SAME: Rule(("layers",) + ours,
                                                         f"encoder.layers.{{i}}.{theirs}", how)
  for norm in ("layer_norm1", "layer_norm2"):
    rules += [layer((norm, "scale"), f"{norm}.weight"), layer((norm, "bias"), f"{norm}.bias")]
  for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
    rules += [layer(("self_attn", ours, "kernel"), f"self_attn.{hf}.weight", linear(1)),
              layer(("self_attn", ours, "bias"), f"self_attn.{hf}.bias", FLATTEN)]
  rules += [layer(("self_attn", "out", "kernel"), "self_attn.out_proj.weight", linear(2)),
            layer(("self_attn", "out", "bias"), "self_attn.out_proj.bias")]
  for fc in ("fc1", "fc2"):
    rules += [layer((fc, "kernel"), f"mlp.{fc}.weight", linear()),
              layer((fc, "bias"), f"mlp.{fc}.bias")]
  del config
  return rules


class _VisionTensors:
  """The vision tensors of a checkpoint with its prefix stripped (the reader interface)."""

  def __init__(self, files, prefix: str):
    self._files, self.prefix = files, prefix

  def __contains__(self, name):
    return self.prefix + name in self._files

  def names(self):
    n = len(self.prefix)
    return [k[n:] for k in self._files.names() if k.startswith(self.prefix)]

  def shape(self, name):
    return tuple(self._files.shape(self.prefix + name))

  def dtype(self, name):
    return self._files.dtype(self.prefix + name)

  def rows(self, name, start, stop):
    return self._files.rows(self.prefix + name, start, stop)


def find_prefix(names, source: str) -> str:
  """The key prefix of the (single) vision tower: the text before its patch embedding."""
  found = sorted(k[:-len(PATCH_KEY)] for k in names
                 if k == PATCH_KEY or k.endswith("." + PATCH_KEY))
  if len(found) != 1:
    raise ValueError(f"{source}: expected exactly one vision tower, i.e. one tensor named "
                     f"'[<prefix>]{PATCH_KEY}'; found {len(found)}: "
                     f"{[p + PATCH_KEY for p in found][:5]}")
  return found[0]


def _plan(config: VisionTowerConfig, tensors: _VisionTensors, source: str):
  shapes = flax.traverse_util.flatten_dict(param_shapes(config))
  return tensor_map.plan(key_map(config), shapes, tensors, source,
                         tolerated=lambda name: _tolerated(name, config))


def _tolerated(name: str, config: VisionTowerConfig) -> bool:
  """Vision keys that are known but not loaded (see the module docstring)."""
  if name == "embeddings.position_ids" or name.startswith("head."):
    return True
  if name.startswith("post_layernorm.") and not config.post_layernorm:
    return True
  parts = name.split(".")
  if name.startswith("encoder.layers.") and len(parts) > 2 and parts[2].isdigit():
    return config.layers_used <= int(parts[2]) < config.num_hidden_layers
  return False


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    blob = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(blob, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(blob).__name__}")
  return blob


def read_config(path, **overrides) -> VisionTowerConfig:
  """The tower's config from ``path/config.json`` (+ ``preprocessor_config.json``).

  ``overrides``: any ``VisionTowerConfig`` field (``feature_layer``,
  ``drop_cls``, ``post_layernorm``, ``dtype``, ...). Weights are not read.
  """
  path = pathlib.Path(path)
  cfg_file, pre_file = path / "config.json", path / _PREPROCESSOR
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face CLIP/SigLIP "
                            "checkpoint directory")
  pre = _read_json(pre_file) if pre_file.is_file() else None
  return VisionTowerConfig.from_hf_config(_read_json(cfg_file), source=str(cfg_file),
                                          preprocessor=pre, preprocessor_source=str(pre_file),
                                          **overrides)


def param_shapes(config: VisionTowerConfig, boxed: bool = False):
  """The tower's param shapes (with logical axis names if ``boxed``), allocating nothing."""
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.uint8)
  shapes = jax.eval_shape(VisionTower(config).init, jax.random.PRNGKey(0), image)["params"]
  return shapes if boxed else nn.meta.unbox(shapes)


def from_pretrained_vision(path, dtype: str = "float32", param_dtype: str | None = None,
                           mesh: jax.sharding.Mesh | None = None, rules=None, **overrides):
  """(VisionTowerConfig, params) from a local CLIP/SigLIP checkpoint directory.

  Apply with ``VisionTower(config).apply({'params': params}, images)``.
  ``param_dtype=None``: bfloat16 on accelerators, else the stored dtype.
  Without ``mesh`` params are host numpy arrays; with ``mesh`` and ``rules``
  (logical axis -> mesh axes, as ``sharding.rules(config)``) they are
  ``jax.Array``s in their ``NamedSharding``. ``overrides`` as ``read_config``.
  """
  path = pathlib.Path(path)
  if mesh is not None and rules is None:
    raise ValueError("from_pretrained_vision: mesh given without rules (logical axis -> mesh "
                     "axes, e.g. sharding.PRESETS)")
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} not found: expected a Hugging Face "
                            "CLIP/SigLIP checkpoint directory")
  files = safetensors_io.open_dir(path)
  tensors = _VisionTensors(files, find_prefix(files.names(), str(path)))
  if param_dtype is None:
    param_dtype = default_param_dtype(str(tensors.dtype(PATCH_KEY)))
  config = read_config(path, dtype=dtype, param_dtype=param_dtype, **overrides)
  specs = _plan(config, tensors, str(path))
  shardings = None
  if mesh is not None:
    shardings = flax.traverse_util.flatten_dict(
        sharding_lib.logical_shardings(param_shapes(config, boxed=True), mesh, rules))
  return config, tensor_map.read_params(specs, tensors, dtype_from_name(config.param_dtype),
                                        shardings)


def to_hf_tensors(config: VisionTowerConfig, params) -> dict[str, np.ndarray]:
  """Our tower params -> HF vision tensors (names without prefix)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params)))
  want = flax.traverse_util.flatten_dict(param_shapes(config))
  wrong = sorted("/".join(k) for k in set(flat) ^ set(want))
  wrong += sorted(f"{'/'.join(k)}: {np.shape(flat[k])} != expected {want[k].shape}"
                  for k in set(flat) & set(want) if tuple(np.shape(flat[k])) != want[k].shape)
  if wrong:
    raise ValueError(f"vision tower params do not match their config (kind={config.kind!r}, "
                     f"{config.layers_used} layers used): {wrong[:10]}")
  return tensor_map.to_theirs(flax.traverse_util.unflatten_dict(flat), key_map(config),
                              strict=False)


def _vision_config(hf: dict[str, Any], config: VisionTowerConfig, dtype, has_head: bool):
  """The source's vision config as a bare vision model's config.json, our shape fields set."""
  vision = dict(hf.get("vision_config") or {}) if hf.get("model_type") in ("clip", "siglip") \
      else dict(hf)
  vision.update({f: getattr(config, f) for f in _SHAPE_FIELDS})
  vision.update(model_type=f"{config.kind}_vision_model",
                architectures=[_ARCHITECTURES[config.kind]],
                dtype=np.dtype(dtype).name, torch_dtype=np.dtype(dtype).name)
  if config.kind == "siglip":
    vision["vision_use_head"] = has_head
  vision.pop("_name_or_path", None)
  return vision


def save_vision_tower(path, config: VisionTowerConfig, params, source_dir) -> None:
  """Writes the tower as a HF vision-model directory (config.json, model.safetensors).

  ``source_dir``: the directory the tower was loaded from (``encoder.path``).
  It supplies what our params lack: layers past ``feature_layer``, an unused
  post-layernorm, SigLIP's pooling head (cast to our dtype), the rest of the
  vision config and ``preprocessor_config.json`` (copied when present). Our
  params must fit its tensors' shapes.
  """
  path, source = pathlib.Path(path), pathlib.Path(source_dir)
  cfg_file = source / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: exporting a vision tower needs the Hugging "
                            "Face directory it was loaded from")
  ours = to_hf_tensors(config, params)
  dtype = ours[PATCH_KEY].dtype
  files = safetensors_io.open_dir(source)
  src = _VisionTensors(files, find_prefix(files.names(), str(source)))
  wrong = [f"{k}: {v.shape} != {src.shape(k) if k in src else 'absent'}"
           for k, v in ours.items() if k not in src or src.shape(k) != v.shape]
  if wrong:
    raise ValueError(f"{source}: the tower's params do not fit this directory's tensors (is it "
                     f"the directory the run loaded?): {wrong[:10]}")
  extras = {}
  for name in src.names():
    if name not in ours and name != "embeddings.position_ids":   # a buffer, not a weight
      full = src.prefix + name
      extras[name] = files.read(full).astype(dtype)
  tensors = {**ours, **extras}
  missing = [f"encoder.layers.{i}" for i in range(config.num_hidden_layers)
             if f"encoder.layers.{i}.mlp.fc2.weight" not in tensors]
  missing += [k for k in ("post_layernorm.weight", "post_layernorm.bias") if k not in tensors]
  if missing:
    raise ValueError(f"{source}: cannot write a complete {_ARCHITECTURES[config.kind]}: "
                     f"neither the params nor this directory hold {missing}")
  hf = _vision_config(_read_json(cfg_file), config, dtype,
                      any(k.startswith("head.") for k in tensors))
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  safetensors_io.write(path / safetensors_io.SINGLE,
                       {EXPORT_PREFIX + k: tensors[k] for k in sorted(tensors)})
  if (source / _PREPROCESSOR).is_file():
    shutil.copyfile(source / _PREPROCESSOR, path / _PREPROCESSOR)
