"""Torch pickles (.pt), read through an allow-list and written atomically.

A torch checkpoint is a pickle, and unpickling runs whatever callables the file
names. ``RestrictedUnpickler`` hands out only tensor rebuilders, containers and
plain types; config classes (omegaconf, fairseq, AV-HuBERT / VSP-LLM user
modules, argparse, typing, enum) become inert records, turned into plain data
(``to_plain``); any other global (``os.system``, ``builtins.eval``,
``subprocess.*``, ...) is refused, naming the file, before anything runs.

``read_header`` reads a zip-format checkpoint's pickle alone (``data.pkl``), not
its tensor storages: the config and every tensor's shape and dtype, for
building a model without reading its weights.
"""
from __future__ import annotations

import _compat_pickle
import builtins
import dataclasses
import functools
import importlib
import io
import os
import pathlib
import pickle
import tempfile
import types
import zipfile
from typing import Any, Mapping

import numpy as np

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
  _check_state(state, path)
  model = {}
  for key, value in state["model"].items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: model entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    model[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  cfg = state.get("cfg") if state.get("cfg") is not None else state.get("args")
  return {"model": model, "cfg": to_plain(cfg)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """A tensor of a checkpoint read by ``read_header``: its shape and dtype, no values."""
  shape: tuple[int, ...]
  dtype: str

  @property
  def ndim(self) -> int:
    return len(self.shape)


class _HeaderUnpickler(RestrictedUnpickler):
  """The allow-listed pickle of a zip checkpoint with storages left unread."""

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    return pid[1]        # the storage's dtype marker

  def find_class(self, module, name):
    if module == "torch._utils" and name.startswith("_rebuild_tensor"):
      return lambda storage, offset, size, *args: TensorInfo(tuple(size), str(storage))
    if module == "torch._utils" and name.startswith("_rebuild_parameter"):
      return lambda data, *args: data
    if module == "torch" and name.endswith("Storage"):
      return name.replace("Storage", "").lower() or "untyped"
    return super().find_class(module, name)


def read_header(path) -> dict[str, Any]:
  """A zip-format .pt's pickle without its tensors: {'model': {key: TensorInfo}, 'cfg':
  'cfg' or 'args' as plain data}. Reads the pickle entry only (kilobytes of a
  checkpoint of gigabytes); a legacy (non-zip) file is read whole."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected a torch checkpoint (.pt)")
  if not zipfile.is_zipfile(path):
    state = read_checkpoint(path)
    return {"model": {k: TensorInfo(v.shape, str(v.dtype)) for k, v in state["model"].items()},
            "cfg": state["cfg"]}
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the torch zip, found {pickles}")
    blob = archive.read(pickles[0])
  try:
    state = _HeaderUnpickler(io.BytesIO(blob)).load()
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f"{path}: {e}; the file was not loaded") from None
  _check_state(state, path)
  cfg = state.get("cfg") if state.get("cfg") is not None else state.get("args")
  return {"model": dict(state["model"]), "cfg": to_plain(cfg)}


def _check_state(state, path) -> None:
  if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
    raise ValueError(f"{path}: expected a fairseq checkpoint, a dict with a 'model' state "
                     f"dict; got {type(state).__name__} with keys "
                     f"{sorted(state) if isinstance(state, Mapping) else '-'}")


def write_checkpoint(path, blob: Mapping[str, Any]) -> None:
  """``torch.save(blob)`` atomically, readable by others like any output."""
  import torch  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  try:
    torch.save(dict(blob), tmp)
    os.chmod(tmp, 0o666 & ~umask)      # mkstemp's file is private; a checkpoint is not
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
