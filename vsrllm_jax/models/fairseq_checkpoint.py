"""fairseq AV-HuBERT checkpoints (.pt) <-> ``AvHubertEncoder`` variables, read safely.

A fairseq checkpoint is a torch pickle: {'model': state dict, 'cfg': omegaconf
DictConfig (or 'args': argparse.Namespace), optimizer state, ...}, and
unpickling runs whatever callables the file names. ``read_checkpoint`` uses an
allow-list: tensor rebuilders, containers and plain types are real; config
classes (omegaconf, fairseq, AV-HuBERT / VSP-LLM user modules, argparse,
typing, enum) become inert records, turned into plain data; any other global
(``os.system``, ``builtins.eval``, ``subprocess.*``, ...) is refused, naming
the file, before anything runs. Pretrained checkpoints hold the model at the
top level, fine-tuned ones under 'encoder.w2v_model.' (CTC: 'w2v_encoder.
w2v_model.'); the prefix is detected. The key map lives beside the model
(``avhubert.fairseq_key_map``).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copy
import dataclasses
import functools
import importlib
import logging
import os
import pathlib
import pickle
import tempfile
import types
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from vsrllm_jax.models import avhubert
from vsrllm_jax.models.avhubert import AvHubertConfig, init_variables
from vsrllm_jax.models.video_encoder import PIXEL_MEAN, PIXEL_STD

PREFIXES = ("", "encoder.w2v_model.", "w2v_encoder.w2v_model.")
# Modules whose classes only describe configuration: they load as inert records.
CONFIG_MODULES = ("omegaconf", "fairseq", "avhubert", "hubert", "hubert_pretraining",
                  "hubert_asr", "vsp_llm", "src", "argparse", "typing", "enum", "pathlib",
                  "__main__")
_BUILTIN_TYPES = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                  "int", "float", "bool", "complex", "object", "Ellipsis")
_REAL_GLOBALS = {("collections", "OrderedDict"), ("collections", "defaultdict"), ("torch", "Size"),
                 *(("torch._utils", f"_rebuild_{n}") for n in (
                     "tensor", "tensor_v2", "parameter", "parameter_with_state")),
                 ("numpy", "dtype"), ("numpy", "ndarray"), ("numpy._core.multiarray", "scalar"),
                 ("numpy._core.multiarray", "_reconstruct")}
_NUMPY_RENAMES = {"numpy.core.multiarray": "numpy._core.multiarray"}


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle names a callable that is not on the allow-list."""


@dataclasses.dataclass
class FairseqExtras:
  """What a checkpoint holds besides the encoder, so that an export round-trips: ``tensors``
  by full key (unused pretraining heads, num_batches_tracked, the rest of a fine-tuned
  model) and ``cfg`` as plain data."""
  prefix: str = ""
  tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  cfg: Any = None


class _Inert:
  """Stands in for a config class: records constructor args and pickled state, runs nothing."""
  qualified_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, {}
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):            # SETITEMS on a record of a dict subclass
    self.items[key] = value

  def __repr__(self):
    return f"<inert {self.qualified_name}>"


@functools.cache
def _inert_type(module: str, name: str) -> type:
  return type(name, (_Inert,), {"qualified_name": f"{module}.{name}"})


def _require(ok: bool, what: str) -> None:
  if not ok:
    raise UnsafeCheckpointError(f"{what} is not allowed")


def _safe_reconstructor(cls, base, state):      # copyreg._reconstructor: protocol 0/1 objects
  _require(isinstance(cls, type) and issubclass(cls, _Inert), f"_reconstructor on {cls!r}")
  return cls(base, state)


def _safe_getitem(obj, key):                    # typing generics: getitem(Tuple, (float, ...))
  _require(isinstance(obj, _Inert) or isinstance(obj, type) and issubclass(obj, _Inert),
           f"operator.getitem on {obj!r}")
  return _inert_type(obj.qualified_name, "__getitem__")(key)


def _safe_type(*args):                          # type(None): how NoneType is pickled
  _require(args == (None,), f"builtins.type{args!r}")
  return type(None)


def _safe_encode(text, encoding="utf-8", errors="strict"):   # protocol-2 bytes: str.encode
  _require(isinstance(text, str), "_codecs.encode on a non-str")
  return text.encode(encoding, errors)


_SAFE_STANDINS = {("copyreg", "_reconstructor"): _safe_reconstructor,
                  ("_operator", "getitem"): _safe_getitem, ("operator", "getitem"): _safe_getitem,
                  ("builtins", "type"): _safe_type, ("_codecs", "encode"): _safe_encode,
                  ("codecs", "encode"): _safe_encode}


class RestrictedUnpickler(pickle.Unpickler):
  """``pickle.Unpickler`` whose ``find_class`` only hands out allow-listed globals."""

  def find_class(self, module, name):
    if (module, name) in _compat_pickle.NAME_MAPPING:            # protocol-2 py2 names
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    module = _NUMPY_RENAMES.get(module, module)
    if module == "builtins" and name in _BUILTIN_TYPES:
      return getattr(builtins, name)
    if (module, name) in _SAFE_STANDINS:
      return _SAFE_STANDINS[module, name]
    if (module, name) in _REAL_GLOBALS:
      return getattr(importlib.import_module(module), name)
    if module == "torch":
      import torch  # pylint: disable=g-import-not-at-top
      if isinstance(vars(torch).get(name), torch.dtype):
        return vars(torch)[name]
    if module.split(".")[0] in CONFIG_MODULES and (module != "argparse" or name == "Namespace"):
      return _inert_type(module, name)
    raise UnsafeCheckpointError(
        f"refusing to load global '{module}.{name}': not on the allow-list of "
        f"{__name__} (tensors, containers and config records only)")


# What torch.load needs of a pickle module: Unpickler (subclassed there) and load.
_PICKLE_MODULE = types.ModuleType("vsrllm_jax_restricted_pickle")
_PICKLE_MODULE.Unpickler = RestrictedUnpickler
_PICKLE_MODULE.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()


def to_plain(obj: Any) -> Any:
  """Inert config records (DictConfig, nodes, Namespace, enums) -> dicts, lists, scalars."""
  if isinstance(obj, _Inert):
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
      state = {**(state[0] or {}), **state[1]}                  # (dict, slots) state
    if isinstance(state, dict) and "_content" in state:         # DictConfig / ListConfig
      return to_plain(state["_content"])
    if isinstance(state, dict) and "_val" in state:             # omegaconf value nodes
      return to_plain(state["_val"])
    if obj.qualified_name == "argparse.Namespace" and isinstance(state, dict):
      return {k: to_plain(v) for k, v in state.items()}
    if len(obj.args) == 1 and state is None:                   # enum member: Enum(value)
      return to_plain(obj.args[0])
    return repr(obj)
  if isinstance(obj, Mapping):
    return {k: to_plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def read_checkpoint(path) -> dict[str, Any]:
  """A .pt unpickled with the allow-list: {'model': {key: np.ndarray}, 'cfg': 'cfg' or 'args'}."""
  import torch  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected a fairseq AV-HuBERT checkpoint (.pt)")
  try:
    state = torch.load(str(path), map_location="cpu", pickle_module=_PICKLE_MODULE,
                       weights_only=False, mmap=zipfile.is_zipfile(path))
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f"{path}: {e}; the file was not loaded") from None
  except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
    raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
  if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
    raise ValueError(f"{path}: expected a fairseq checkpoint, a dict with a 'model' state "
                     f"dict; got {type(state).__name__} with keys "
                     f"{sorted(state) if isinstance(state, Mapping) else '-'}")
  model = {}
  for key, value in state["model"].items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: model entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    model[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  cfg = state.get("cfg") if state.get("cfg") is not None else state.get("args")
  return {"model": model, "cfg": to_plain(cfg)}


def detect_prefix(keys, source: str) -> str:
  """'' (pretrained) or the fine-tuned model's prefix in front of the AV-HuBERT keys."""
  marker = "feature_extractor_video.proj.weight"
  found = [p for p in PREFIXES if p + marker in keys]
  if not found:
    near = sorted(k for k in keys if k.endswith(marker))
    raise ValueError(f"{source}: no AV-HuBERT video encoder found: expected key "
                     f"{marker!r} under one of the prefixes {list(PREFIXES)}; "
                     f"found {near or 'none'} (first keys: {sorted(keys)[:5]})")
  return found[0]


def _model_cfg(cfg: Any) -> dict | None:
  """The AV-HuBERT model's fields in a plain cfg: a fine-tuned model's w2v_args first
  (VSP-LLM's own 'model' has an encoder_embed_dim too), then 'model', then flat args."""
  for path in (("model", "w2v_args", "model"), ("model",), ("w2v_args", "model"),
               ("w2v_args",), ()):
    node = cfg
    for part in path:
      node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and "encoder_embed_dim" in node:
      return node
  return None


def _cfg_value(section, key, kind):
  """section[key] if it is a ``kind`` (an int that is not a bool), else None."""
  value = section.get(key) if section else None
  return None if kind is int and isinstance(value, bool) or not isinstance(value, kind) else value


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def to_variables(config: AvHubertConfig, tensors: Mapping[str, np.ndarray], source: str,
                 fresh: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """State dict (keys without prefix) -> {'params', 'batch_stats'} of float32 numpy arrays,
  shapes checked against ``jax.eval_shape``; keys absent from ``tensors`` come from ``fresh``."""
  want = nn.meta.unbox(init_variables(config, abstract=True))
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  stacked: dict[tuple, list] = collections.defaultdict(lambda: [None] * config.num_layers)
  wrong = []
  for row in avhubert.fairseq_key_map(config):
    shape = _get(want[row.collection], row.path).shape
    expected = tuple(shape[1:] if row.layer is not None else shape)
    if row.key in tensors:
      value = avhubert.to_flax_layout(np.asarray(tensors[row.key], np.float32), row.kind, config)
      if tuple(value.shape) != expected:
        wrong.append(f"{row.key}: {tuple(tensors[row.key].shape)} does not give {expected}")
        continue
    else:
      value = np.asarray(_get(fresh[row.collection], row.path), np.float32)
      value = value[row.layer] if row.layer is not None else value
    if row.layer is not None:
      stacked[(row.collection,) + row.path][row.layer] = value
    else:
      _set(out, (row.collection,) + row.path, value)
  if wrong:
    raise ValueError(f"{source}: tensors of the wrong shape for {config}: {wrong[:8]}")
  for path, values in stacked.items():
    _set(out, path, np.stack(values))
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def from_variables(config: AvHubertConfig, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} -> fairseq state dict (keys without prefix), float32."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.meta.unbox(dict(variables)))
  out = {}
  for row in avhubert.fairseq_key_map(config):
    value = _get(host[row.collection], row.path)
    value = (value[row.layer] if row.layer is not None else value).astype(np.float32)
    out[row.key] = avhubert.to_fairseq_layout(value, row.kind, config)
  return out


def batch_norm_prefixes(config: AvHubertConfig) -> list[str]:
  """fairseq module names of the batch norms (each has a num_batches_tracked)."""
  return [row.key[:-len(".running_mean")] for row in avhubert.fairseq_key_map(config)
          if row.key.endswith(".running_mean")]


def load_avhubert(path, *, layer_norm_first: bool | None = None, strict: bool = True,
                  return_extra: bool = False):
  """(AvHubertConfig, {'params', 'batch_stats'}) of a fairseq AV-HuBERT checkpoint.

  Shapes come from the state dict; heads and ``layer_norm_first`` from the cfg
  (else D // 64 heads and the config's default); the argument overrides the cfg.
  Missing or unexpected encoder keys raise when ``strict``, else are logged and
  missing ones keep a fresh init. ``return_extra`` adds a ``FairseqExtras``,
  what ``save_avhubert`` needs to write the same file back.
  """
  source = str(path)
  state = read_checkpoint(path)
  tensors, cfg = state["model"], state["cfg"]
  prefix = detect_prefix(tensors, source)
  local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  section = _model_cfg(cfg)
  heads = _cfg_value(section, "encoder_attention_heads", int)
  if layer_norm_first is None:
    layer_norm_first = _cfg_value(section, "layer_norm_first", bool)
  config = avhubert.config_from_state_dict(local, source, num_heads=heads,
                                           layer_norm_first=layer_norm_first)
  expected = {row.key for row in avhubert.fairseq_key_map(config)}
  missing = sorted(expected - set(local))
  unused = {k for k in local if avhubert.is_known_unused(k)}
  unexpected = sorted(set(local) - expected - unused)
  if missing or unexpected:
    message = (f"{source} does not match an AV-HuBERT video encoder of {config}: "
               f"missing keys {missing}, unexpected keys {unexpected}")
    if strict:
      raise ValueError(message)
    logging.warning("%s (strict=False: missing ones keep a fresh init)", message)
  fresh = nn.meta.unbox(init_variables(config)) if missing else None
  variables = to_variables(config, local, source, fresh=fresh)
  if not return_extra:
    return config, variables
  consumed = {prefix + k for k in expected & set(local)}
  kept = {k: v for k, v in tensors.items() if k not in consumed}
  return config, variables, FairseqExtras(prefix=prefix, tensors=kept, cfg=cfg)


def _config_section(c: AvHubertConfig) -> dict[str, Any]:
  return dict(encoder_layers=c.num_layers, encoder_embed_dim=c.hidden_dim,
              encoder_ffn_embed_dim=c.mlp_dim, encoder_attention_heads=c.num_heads,
              conv_pos=c.conv_pos, conv_pos_groups=c.conv_pos_groups,
              layer_norm_first=c.layer_norm_first, modality_fuse=c.modality_fuse)


def _export_cfg(config: AvHubertConfig, cfg: Any) -> dict[str, Any]:
  """The checkpoint's plain cfg with the model section set from ``config`` (or a fresh one)."""
  if isinstance(cfg, Mapping) and _model_cfg(cfg) is not None:
    cfg = copy.deepcopy(dict(cfg))
    _model_cfg(cfg).update(_config_section(config))
    return cfg
  return {"model": {"_name": "av_hubert", **_config_section(config), "label_rate": 25,
                    "resnet_relu_type": "prelu", "sub_encoder_layers": 0, "audio_feat_dim": 104},
          "task": {"_name": "av_hubert_pretraining", "input_modality": "image", "labels": ["km"],
                   "normalize": True, "sample_rate": 25, "label_rate": 25, "image_crop_size": 88,
                   "image_mean": PIXEL_MEAN, "image_std": PIXEL_STD, "stack_order_audio": 4}}


def save_avhubert(path, config: AvHubertConfig, variables: Mapping[str, Any],
                  extra: FairseqExtras | Mapping[str, Any] | None = None) -> None:
  """Writes ``variables`` as a fairseq checkpoint ({'model': state dict, 'cfg': plain dict}).

  AVHubertModel's keys (with ``extra.prefix``) and torch layouts in float32,
  ``num_batches_tracked`` per batch norm, and ``extra``'s tensors under their
  own keys. Without ``extra`` the file holds the video encoder only, which
  fairseq loads with ``strict=False`` (as its fine-tuning does). Atomic write.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if extra is None:
    extra = FairseqExtras()
  elif not isinstance(extra, FairseqExtras):
    extra = FairseqExtras(tensors=dict(extra))
  state_dict = collections.OrderedDict()
  for key, array in from_variables(config, variables).items():
    state_dict[extra.prefix + key] = torch.from_numpy(np.require(array, np.float32, "CW"))
  for key in batch_norm_prefixes(config):
    state_dict[f"{extra.prefix}{key}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
  for key, value in extra.tensors.items():
    value = np.asarray(value)
    state_dict[key] = torch.from_numpy(np.require(value, value.dtype, "CW"))
  blob = {"args": None, "cfg": _export_cfg(config, extra.cfg), "model": state_dict,
          "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none",
                                 "lr_scheduler_state": {}, "num_updates": 0}],
          "extra_state": {"train_iterator": {"epoch": 1}}, "task_state": {}}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  try:
    torch.save(blob, tmp)
    os.chmod(tmp, 0o666 & ~umask)      # mkstemp's file is private; a checkpoint is not
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
