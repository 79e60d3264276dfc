"""Length buckets: a few static frame counts, so training compiles a bounded number of times.

Clips of real data (LRS3: 1 to ~6 s) vary in length. Padding every clip to the
longest wastes most of the compute; padding each batch to its own longest
clip recompiles the step for every new length. Buckets sit in between: a clip
of ``n`` frames is padded to the smallest bucket ``>= n`` and every global
batch holds clips of one bucket only, so the train step compiles at most once
per bucket.

``BucketBatchSampler`` is a grain sampler over an endless stream: epoch ``e``
shuffles the records with ``(seed, e)``, groups them by bucket (keeping the
shuffled order), cuts each group into full global batches (the remainder of
each group waits for a later epoch's shuffle) and shuffles the batches. The
stream is the concatenation of those global batches; grain's
``ShardByJaxProcess`` hands stream positions ``p, p + P, ...`` to process
``p``, so each process reads its own ``G / P`` records of every global batch
and all processes agree on the batch's bucket. It is a pure function of
(lengths, buckets, batch, seed), so a restored iterator continues exactly.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import sys
from typing import Sequence

import grain.python as grain
import numpy as np

_log = logging.getLogger(__name__)


def resolve_buckets(buckets: Sequence[int], max_frames: int) -> tuple[int, ...]:
  """Sorted bucket sizes ending at ``max_frames`` (``()`` -> one bucket: ``max_frames``)."""
  out = sorted({int(b) for b in buckets} | {int(max_frames)})
  if out[0] < 1 or out[-1] != int(max_frames):
    raise ValueError(f"data.frame_buckets={tuple(buckets)} must be positive frame counts no "
                     f"larger than data.max_frames={max_frames}")
  return tuple(out)


def bucket_of(num_frames: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds ``num_frames`` (-1 when none does)."""
  i = bisect.bisect_left(buckets, int(num_frames))
  return buckets[i] if i < len(buckets) else -1


class BucketBatchSampler:
  """Endless stream of record keys whose consecutive global batches share a bucket."""

  def __init__(self, lengths: Sequence[int], buckets: Sequence[int], global_batch_size: int,
               seed: int):
    self._lengths = np.asarray(lengths, np.int64)
    self._buckets = tuple(int(b) for b in buckets)
    self._batch = int(global_batch_size)
    self._seed = int(seed)
    sizes = np.asarray([bucket_of(n, self._buckets) for n in self._lengths], np.int64)
    too_long = int(np.sum(sizes < 0))
    if too_long:
      _log.warning("%d of %d records are longer than the largest bucket (%d frames) and are "
                   "left out of training", too_long, len(sizes), self._buckets[-1])
    self._bucket_index = np.asarray([self._buckets.index(s) if s > 0 else -1 for s in sizes])
    usable = np.bincount(self._bucket_index[self._bucket_index >= 0],
                         minlength=len(self._buckets))
    if not np.any(usable >= self._batch):
      raise ValueError(f"no length bucket holds a full global batch of {self._batch} records "
                       f"(records per bucket {dict(zip(self._buckets, usable.tolist()))}); "
                       "lower batch_size or merge data.frame_buckets")
    digest = hashlib.sha256(self._lengths.tobytes()).hexdigest()[:12]
    self._repr = (f"BucketBatchSampler(n={len(self._lengths)}, lengths={digest}, "
                  f"buckets={self._buckets}, batch={self._batch}, seed={self._seed})")

  def __repr__(self) -> str:  # grain compares it with a restored state's
    return self._repr

  def __len__(self) -> int:
    return sys.maxsize

  @functools.lru_cache(maxsize=2)
  def epoch_plan(self, epoch: int) -> np.ndarray:
    """Record keys of epoch ``epoch``'s global batches, [num_batches, global_batch]."""
    rng = np.random.default_rng([self._seed, int(epoch)])
    order = rng.permutation(len(self._lengths))
    batches = []
    for b in range(len(self._buckets)):
      members = order[self._bucket_index[order] == b]
      full = len(members) // self._batch * self._batch
      batches.extend(members[:full].reshape(-1, self._batch))
    plan = np.stack(batches)
    return plan[rng.permutation(len(plan))]

  def batches_per_epoch(self) -> int:
    return len(self.epoch_plan(0))  # the same for every epoch: a function of bucket counts

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0:
      raise IndexError(index)
    per_epoch = self.batches_per_epoch() * self._batch
    epoch, pos = divmod(int(index), per_epoch)
    key = int(self.epoch_plan(epoch).reshape(-1)[pos])
    rng = np.random.Generator(np.random.Philox(key=[self._seed, int(index)]))  # augmentation
    return grain.RecordMetadata(index=index, record_key=key, rng=rng)
