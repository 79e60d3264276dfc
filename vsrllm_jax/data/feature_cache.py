"""Frozen-encoder features, computed once per (encoder, data, preprocessing).

With a frozen encoder, every epoch recomputes the same features; caching them
makes projector training a matter of seconds per epoch on a CPU. Features are
computed with eval-style preprocessing (no augmentation), one copy per clip.

The cache key is a hash of everything whose change must invalidate it:
the encoder's parameter and batch-norm values (so a retrained or differently
loaded encoder never reuses stale features), its architecture, the data set
spec fingerprint (which includes the generator version), the split, the
preprocessing constants and this module's format version. Features are
stored ragged (each clip's real frames only, no padding to the longest) and
streamed to disk, so a large real data set never sits in memory. Entries are
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

CACHE_FORMAT_VERSION = 2  # 2: ragged features.bin + offsets, extra fields


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
  """Records ``{id, text, features [n, D] float32, num_frames, ...}`` from a cache entry.

  ``lengths`` (frames per record) lets the sampler bucket clips without
  reading them. Records carry whatever extra fields ``compute`` gave (e.g.
  ``task``, ``cluster_counts``).
  """

  def __init__(self, directory: str):
    self._dir = directory
    with open(os.path.join(directory, "records.json")) as f:
      meta = json.load(f)
    self._ids, self._texts = meta["ids"], meta["texts"]
    self._tasks = meta.get("tasks")
    self._counts = meta.get("cluster_counts")
    self.feature_dim = int(meta["feature_dim"])
    self._offsets = np.load(os.path.join(directory, "offsets.npy"))         # [N + 1]
    self.lengths = np.diff(self._offsets).astype(np.int32)                   # [N]
    total = int(self._offsets[-1])
    self._features = np.memmap(os.path.join(directory, "features.bin"), np.float32, mode="r",
                               shape=(total, self.feature_dim))             # [sum n, D]

  def __len__(self) -> int:
    return len(self._ids)

  def __repr__(self) -> str:  # grain checks the source of a restored state by its repr
    return f"CachedFeatureSource({os.path.basename(self._dir)})"

  def __getitem__(self, index: int) -> dict:
    lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
    record = dict(id=self._ids[index], text=self._texts[index], num_frames=np.int32(hi - lo),
                  features=np.array(self._features[lo:hi], np.float32))
    if self._tasks is not None:
      record["task"] = self._tasks[index]
    if self._counts is not None:
      record["cluster_counts"] = np.asarray(self._counts[index], np.int32)
    return record


def build_or_load(directory: str, compute: Callable[[], Iterable[dict]]) -> CachedFeatureSource:
  """Returns the cache entry at ``directory``, computing it first if absent.

  ``compute()`` yields one dict per clip, in record order: ``id``, ``text``,
  ``features`` [n, D] (the clip's real frames) and optionally ``task`` and
  ``cluster_counts``. Only process 0 writes; others wait for the entry.
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
  """Streams features to ``features.bin`` (ragged, no padding), then renames atomically."""
  meta = dict(ids=[], texts=[], tasks=[], cluster_counts=[])
  offsets, dim = [0], None
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
  try:
    with open(os.path.join(tmp, "features.bin"), "wb") as out:
      for record in compute():
        feats = np.ascontiguousarray(record["features"], np.float32)   # [n, D]
        if dim is None:
          dim = feats.shape[-1]
        if feats.ndim != 2 or feats.shape[-1] != dim:
          raise ValueError(f"clip {record['id']!r}: features {feats.shape}, expected (n, {dim})")
        out.write(feats.tobytes())
        offsets.append(offsets[-1] + feats.shape[0])
        meta["ids"].append(str(record["id"]))
        meta["texts"].append(str(record["text"]))
        meta["tasks"].append(record.get("task"))
        counts = record.get("cluster_counts")
        meta["cluster_counts"].append(None if counts is None else np.asarray(counts).tolist())
    if dim is None:
      raise ValueError(f"no clips to cache for {directory}")
    for key in ("tasks", "cluster_counts"):
      if all(v is None for v in meta[key]):
        del meta[key]
    np.save(os.path.join(tmp, "offsets.npy"), np.asarray(offsets, np.int64))
    with open(os.path.join(tmp, "records.json"), "w") as f:
      json.dump(dict(meta, feature_dim=int(dim)), f)
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
