"""grain input pipeline: synthetic_lips records -> fixed-shape host batches.

A batch is a dict of numpy arrays (B = per-process batch):
  video            uint8 [B, frames, H, W, 1], zero after the real frames;
                   frames = data.max_frames, or a length bucket (``bucketing``)
  video_mask       bool  [B, frames]
  instruction_ids  int32 [B, max_instruction_tokens]: BOS + instruction (data.
                   instruction, or the record's task's when that is ''), pad after
                   (no BOS for families without one; the chat template's user
                   turn + assistant header when data.chat_template)
  instruction_mask bool  [B, max_instruction_tokens]
  label_ids        int32 [B, max_label_tokens]: transcript + EOS (the template's
                   end-of-turn token when data.chat_template), pad after
  label_mask       bool  [B, max_label_tokens]
  example_mask     bool  [B]: False for filler rows (end of an eval split, or
                   a corrupt eval record); fillers keep the instruction, have
                   no video and no label tokens
  id, text, task   object [B] of Python str ('' for fillers; task '' when the
                   records have none, e.g. synthetic_lips)
  cluster_counts   int32 [B, frames]: run lengths for VSP-LLM deduplication,
                   0 after (only when data.use_cluster_counts)
  ctc_labels       int32 [B, data.ctc_max_chars]: the transcript's characters
                   (models/ctc.py alphabet, blank 0 after), only when
                   data.ctc_max_chars > 0
  ctc_label_mask   bool  [B, data.ctc_max_chars]
From a source of cached encoder features (``feature_cache``), ``video`` and
``video_mask`` are replaced by ``features`` float32 [B, max_frames, D] and
``features_mask``.
Training reads through grain (deterministic, checkpointable iterator state);
evaluation is a plain iterator over the split in record order. A corrupt
record is skipped, counted (``examples.skipped_record_count()``) and logged.
"""
from __future__ import annotations

import grain.python as grain
import jax
import numpy as np

from vsrllm_jax.data import bucketing, examples, sources

# The records of a split come from ``sources`` (data.name picks the data set).
data_source = sources.data_source
split_size = sources.split_size


class _SafeSource(grain.RandomAccessDataSource):
  """Wraps a source so a read/decode error yields (index, examples.Corrupt), not a crash."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __repr__(self):  # grain checks the source of a restored state by its repr
    return f"_SafeSource({self._source!r})"

  def __getitem__(self, index):
    try:
      record = self._source[index]
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt record
      record = examples.Corrupt(f"read failed: {e!r}")
    return index, record


class _EncodeTransform(grain.RandomMapTransform):
  """(index, record) -> example; with ``lengths``, padded to the planned bucket.

  With buckets a corrupt record becomes a filler of its bucket (the batch's
  other rows are already planned), instead of being dropped. The sampler's
  per-record rng drives augmentation, so a resumed run sees the same crops.
  """

  def __init__(self, encoder: examples.ExampleEncoder, lengths=None):
    self._encoder = encoder
    self._lengths = lengths

  def random_map(self, element, rng):
    index, record = element
    if self._lengths is None:
      return self._encoder(index, record, rng=rng)
    frames = bucketing.bucket_of(int(self._lengths[index]), self._encoder.buckets)
    example = self._encoder(index, record, frames, rng)
    return self._encoder.filler(frames) if example is None else example


class _DropCorrupt(grain.FilterTransform):
  def filter(self, element) -> bool:
    return element is not None


def _per_process_batch(global_batch_size: int) -> int:
  processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % processes:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                     f"the number of processes ({processes})")
  return global_batch_size // processes


def make_train_loader(data_cfg, tokenizer, *, global_batch_size: int, seed: int,
                      source=None) -> grain.DataLoader:
  """Endless shuffled training batches of this process's shard.

  ``iter(loader)`` is checkpointable (``get_state``/``set_state``, or orbax's
  ``grain.PyGrainCheckpointSave/Restore``). ``source`` replaces the prepared
  train split (any random-access source of records; for tests). With several
  length buckets (``data.frame_buckets``) and a source that knows its
  records' ``lengths``, every global batch comes from one bucket
  (``bucketing.BucketBatchSampler``); otherwise clips pad to ``max_frames``.
  """
  source = data_source(data_cfg, "train") if source is None else source
  encoder = examples.ExampleEncoder(data_cfg, tokenizer, getattr(source, "feature_dim", None))
  lengths = getattr(source, "lengths", None)
  per_process = _per_process_batch(global_batch_size)
  shard = grain.ShardByJaxProcess(drop_remainder=True)
  safe = _SafeSource(source)
  if lengths is not None and len(encoder.buckets) > 1:
    sampler = bucketing.BucketBatchSampler(lengths, encoder.buckets, global_batch_size, seed)
    operations = [_EncodeTransform(encoder, lengths),
                  grain.Batch(per_process, drop_remainder=True)]
  else:
    sampler = grain.IndexSampler(num_records=len(safe), shard_options=shard, shuffle=True,
                                 num_epochs=None, seed=int(seed))
    operations = [_EncodeTransform(encoder),
                  _DropCorrupt(),  # before batching, so batches stay full
                  grain.Batch(per_process, drop_remainder=True)]
  return grain.DataLoader(data_source=safe, sampler=sampler, operations=operations,
                          worker_count=int(data_cfg.worker_count), shard_options=shard)


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def eval_batches(data_cfg, tokenizer, split: str, *, global_batch_size: int,
                 max_batches: int = -1, source=None):
  """Yields this process's rows of each global batch of ``split``, in record order.

  Global batch b holds records [b*G, (b+1)*G); process p gets its contiguous
  slice of B = G / process_count rows, so every process yields the same
  number of batches. Rows past the end of the split, and corrupt records,
  become fillers (``example_mask`` False). ``max_batches`` < 0: the whole split.
  Frames pad to the bucket of the global batch's longest clip (from the
  source's ``lengths``, so all processes agree; else ``max_frames``).
  """
  source = data_source(data_cfg, split) if source is None else source
  encoder = examples.ExampleEncoder(data_cfg, tokenizer, getattr(source, "feature_dim", None))
  lengths = getattr(source, "lengths", None)
  source = _SafeSource(source)
  per_process = _per_process_batch(global_batch_size)
  num_records = len(source)
  num_batches = -(-num_records // global_batch_size)
  if max_batches >= 0:
    num_batches = min(num_batches, max_batches)
  offset = jax.process_index() * per_process
  for b in range(num_batches):
    frames = encoder.max_frames
    if lengths is not None:
      longest = int(np.max(lengths[b * global_batch_size:(b + 1) * global_batch_size]))
      frames = max(bucketing.bucket_of(longest, encoder.buckets), 0) or encoder.max_frames
    rows = []
    for index in range(b * global_batch_size + offset,
                       b * global_batch_size + offset + per_process):
      example = None
      if index < num_records:
        example = encoder(*source[index], frames)
      rows.append(encoder.filler(frames) if example is None else example)
    yield _stack(rows)
