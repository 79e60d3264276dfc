"""Frozen-encoder features, computed once per (encoder, data, preprocessing).

With a frozen encoder, every epoch recomputes the same features; caching them
makes projector training a matter of seconds per epoch on a CPU. Features are
computed with eval-style preprocessing (no augmentation), one copy per clip.

The cache key is a hash of everything whose change must invalidate it:
the encoder's parameter and batch-norm values (so a retrained or differently
loaded encoder never reuses stale features), its architecture, the data set
spec fingerprint (which includes the generator version), the split, the
preprocessing constants and this module's format version. Entries are
written to a temporary directory and renamed, so a crash never leaves a
half-written cache that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

import grain.python as grain
import jax
import numpy as np

CACHE_FORMAT_VERSION = 1


def tree_digest(tree) -> str:
  """sha256 over the (path, dtype, shape, bytes) of every leaf of a host tree."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def cache_key(*, encoder_digest: str, encoder_config: dict, data_fingerprint: str, split: str,
              preprocessing: dict) -> str:
  payload = json.dumps(dict(encoder=encoder_digest, encoder_config=encoder_config,
                            data=data_fingerprint, split=split, preprocessing=preprocessing,
                            version=CACHE_FORMAT_VERSION), sort_keys=True, default=str)
  return hashlib.sha256(payload.encode()).hexdigest()[:20]


class CachedFeatureSource(grain.RandomAccessDataSource):
  """Records ``{id, text, features [n, D] float32, num_frames}`` from a cache entry."""

  def __init__(self, directory: str):
    self._dir = directory
    self._features = np.load(os.path.join(directory, "features.npy"), mmap_mode="r")
    self._num_frames = np.load(os.path.join(directory, "num_frames.npy"))
    with open(os.path.join(directory, "records.json")) as f:
      meta = json.load(f)
    self._ids, self._texts = meta["ids"], meta["texts"]
    self.feature_dim = int(self._features.shape[-1])

  def __len__(self) -> int:
    return len(self._ids)

  def __repr__(self) -> str:  # grain checks the source of a restored state by its repr
    return f"CachedFeatureSource({os.path.basename(self._dir)})"

  def __getitem__(self, index: int) -> dict:
    n = int(self._num_frames[index])
    return dict(id=self._ids[index], text=self._texts[index], num_frames=np.int32(n),
                features=np.array(self._features[index, :n], np.float32))


def build_or_load(directory: str, compute: Callable[[], Iterable[tuple[str, str, np.ndarray, int]]],
                  ) -> CachedFeatureSource:
  """Returns the cache entry at ``directory``, computing it first if absent.

  ``compute()`` yields ``(id, text, features [T, D], num_frames)`` per clip, in
  record order. Only process 0 writes; others wait for the entry to appear.
  """
  if not os.path.exists(os.path.join(directory, "records.json")):
    if jax.process_index() == 0:
      _write(directory, compute)
    else:
      for _ in compute():   # keep the collective computation in step with process 0
        pass
    _sync(f"feature_cache:{directory}")
  return CachedFeatureSource(directory)


def _write(directory: str, compute) -> None:
  ids, texts, feats, frames = [], [], [], []
  for clip_id, text, features, num_frames in compute():
    ids.append(clip_id)
    texts.append(text)
    feats.append(np.asarray(features, np.float32))
    frames.append(int(num_frames))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
  try:
    padded = np.zeros((len(feats), max(frames), feats[0].shape[-1]), np.float32)  # [N, T, D]
    for i, f in enumerate(feats):
      padded[i, :len(f)] = f
    np.save(os.path.join(tmp, "features.npy"), padded)
    np.save(os.path.join(tmp, "num_frames.npy"), np.asarray(frames, np.int32))
    with open(os.path.join(tmp, "records.json"), "w") as f:
      json.dump(dict(ids=ids, texts=texts), f)
    try:
      os.rename(tmp, directory)
    except OSError:      # another run finished the same entry first
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
