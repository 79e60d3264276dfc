"""The safetensors container, single file or sharded with an index: headers parsed once,
row ranges read on demand with plain reads (an mmap's touched pages would count as a
second copy of the checkpoint in host memory); written atomically.

Readers share one interface with ``InMemory`` (a name -> array mapping), which is
what ``tensor_map`` plans against: ``in``, ``names()``, ``shape(name)``,
``dtype(name)``, ``rows(name, start, stop)``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class InMemory:
  """A name -> array mapping behind the reader interface."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._tensors = tensors

  def __contains__(self, name):
    return name in self._tensors

  def names(self):
    return self._tensors.keys()

  def shape(self, name):
    return np.shape(self._tensors[name])

  def dtype(self, name):
    return np.asarray(self._tensors[name]).dtype

  def rows(self, name, start, stop):
    return np.asarray(self._tensors[name])[start:stop]


class SafetensorsFiles:
  """The tensors of .safetensors files."""

  def __init__(self, files):
    self._index = {}  # name -> (file, byte offset, shape, numpy dtype)
    for f in files:
      with open(f, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= size - 8:
          raise ValueError(f"{f}: not a safetensors file (header length {n}, file size {size})")
        header = json.loads(fh.read(n))
      for name, meta in header.items():
        if name == "__metadata__":
          continue
        if meta["dtype"] not in DTYPES:
          raise ValueError(f"{f}: tensor {name!r} has dtype {meta['dtype']!r}; supported: "
                           f"{sorted(DTYPES)}")
        dtype, shape = np.dtype(DTYPES[meta["dtype"]]), tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
          raise ValueError(f"{f}: tensor {name!r} (shape {shape}, {meta['dtype']}) has "
                           f"data_offsets {meta['data_offsets']} that do not fit (corrupt or "
                           "truncated file)")
        self._index[name] = (f, 8 + n + begin, shape, dtype)

  def __contains__(self, name):
    return name in self._index

  def names(self):
    return self._index.keys()

  def shape(self, name):
    return self._index[name][2]

  def dtype(self, name):
    return self._index[name][3]

  def rows(self, name, start, stop) -> np.ndarray:
    """Rows [start, stop) along the first axis, read into a fresh array (no mmap)."""
    f, offset, shape, dtype = self._index[name]
    if not shape:                                   # a scalar: its one value
      start, stop, shape = 0, 1, (1,)
    out = np.empty((stop - start,) + shape[1:], dtype)
    buf = out.reshape(-1).view(np.uint8)
    with open(f, "rb", buffering=0) as fh:
      fh.seek(offset + start * math.prod(shape[1:]) * dtype.itemsize)
      done = 0
      while done < buf.size:  # one read() returns at most ~2 GiB on Linux
        got = fh.readinto(buf[done:])
        if not got:
          raise ValueError(f"{f}: unexpected end of file reading tensor {name!r}")
        done += got
    return out

  def read(self, name) -> np.ndarray:
    """The whole tensor."""
    shape = self.shape(name)
    return self.rows(name, 0, shape[0]).reshape(shape) if shape else \
        self.rows(name, 0, 1).reshape(())


def open_file(path) -> SafetensorsFiles:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected a safetensors file")
  return SafetensorsFiles([path])


def open_dir(path) -> SafetensorsFiles:
  """``model.safetensors``, or the shards listed by ``model.safetensors.index.json``."""
  path = pathlib.Path(path)
  single, index = path / SINGLE, path / INDEX
  if single.is_file():
    return SafetensorsFiles([single])
  if not index.is_file():
    raise FileNotFoundError(f"neither {single} nor {index} found: expected a Hugging Face "
                            "safetensors checkpoint directory")
  files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"{f} not found (listed in {index})")
  return SafetensorsFiles(files)


def read_all(path) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file."""
  files = open_file(path)
  return {name: files.read(name) for name in files.names()}


def write(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
          ) -> None:
  """Writes one safetensors file atomically (a temporary sibling renamed into place),
  readable by others like any output (``mkstemp`` files are private)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  os.close(fd)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata=dict(metadata or {"format": "pt"}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
