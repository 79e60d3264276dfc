"""Records -> model examples: padded, tokenized, preprocessed; corrupt ones skipped and
counted.

A record is a dict from a source (``sources``, or the feature cache): ``id``,
``text``, ``video`` (or ``features``), optional ``task``, ``num_frames``,
``cluster_counts``. ``ExampleEncoder`` turns it into the fields ``pipeline``
documents, or None when the record is corrupt: it is then skipped, counted
(``skipped_record_count``) and logged with what was wrong.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from vsrllm_jax import data as data_lib
from vsrllm_jax.data import avhubert_preprocess, bucketing
from vsrllm_jax.data import tasks as tasks_lib
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.models import ctc

_log = logging.getLogger(__name__)

_skip_lock = threading.Lock()
_skipped = 0


def skipped_record_count() -> int:
  """Corrupt records skipped by this process since import (or the last reset).

  With ``worker_count > 0`` grain workers count in their own processes; their
  warnings still reach the log.
  """
  return _skipped


def reset_skipped_record_count() -> None:
  global _skipped
  with _skip_lock:
    _skipped = 0


def skip(index, record_id, reason) -> None:
  global _skipped
  with _skip_lock:
    _skipped += 1
  _log.warning("skipping corrupt record index=%s id=%r: %s", index, record_id, reason)




def _as_str(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
    return _as_str(value.item())
  return str(value)


class Corrupt:
  """Stands in for a record that could not be read or decoded."""

  def __init__(self, reason: str):
    self.reason = reason


class ExampleEncoder:
  """Record -> padded, tokenized example. None for a corrupt record."""

  def __init__(self, data_cfg, tokenizer, feature_dim: int | None = None):
    self.feature_dim = feature_dim   # None: records hold video; else cached features
    self.max_frames = int(data_cfg.max_frames)
    self.buckets = bucketing.resolve_buckets(data_cfg.get("frame_buckets", ()), self.max_frames)
    size = int(data_cfg.image_size)
    self.frame_shape = (size, size, data_lib.frame_channels(data_cfg))
    self.max_label = int(data_cfg.max_label_tokens)
    self.ctc_max_chars = int(data_cfg.get("ctc_max_chars", 0))   # 0: no CTC targets
    chat = bool(data_cfg.get("chat_template", False))
    self.special = tokenizer_lib.special_tokens(tokenizer, chat_template=chat)
    self.pad_id = self.special.pad_id
    self.tokenizer = tokenizer
    self.cluster_counts = bool(data_cfg.get("use_cluster_counts", False))
    self.time_mask_prob = float(data_cfg.get("time_mask_prob", 0.0))
    # data.instruction for every clip, or ('') each record's task's instruction.
    texts = ({None: data_cfg.instruction} if data_cfg.instruction
             else tasks_lib.instructions())
    max_instr = int(data_cfg.max_instruction_tokens)
    self.instructions = {}
    for task, text in texts.items():
      ids = tokenizer_lib.instruction_ids(tokenizer, text, self.special, chat_template=chat)
      if len(ids) > max_instr:
        raise ValueError(f"instruction {text!r} needs {len(ids)} tokens (BOS and chat template "
                         f"included) > data.max_instruction_tokens={max_instr}; raise "
                         "data.max_instruction_tokens or shorten data.instruction")
      self.instructions[task] = self._pad(ids, max_instr)
    self.default_task = next(iter(self.instructions))

  def _pad(self, ids, length):
    out = np.full((length,), self.pad_id, np.int32)  # [L]
    out[:len(ids)] = ids
    return out, np.arange(length) < len(ids)

  def _video(self, index, record_id, record, rng=None):
    """Validated video [T, S, S, 1] uint8, or None (counted) if malformed.

    Frames larger than ``data.image_size`` (LRS3's 96x96 mouth crops) are
    cropped to it as AV-HuBERT does: at the centre, or with ``rng`` (training
    without a feature cache) at a random offset with a random horizontal flip,
    then ``data.time_mask_prob`` of the frames masked in spans.
    """
    video = record.get("video") if isinstance(record, dict) else None
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8:
      skip(index, record_id, f"video is {type(video).__name__} "
            f"{getattr(video, 'dtype', '')}, expected a uint8 array")
      return None
    size = self.frame_shape[0]
    if (video.ndim != 4 or video.shape[-1] != self.frame_shape[-1]
        or video.shape[1] != video.shape[2] or video.shape[1] < size):
      skip(index, record_id, f"video shape {video.shape}, expected (T, *{self.frame_shape}) or "
            "larger square frames to crop from")
      return None
    if video.shape[1] > size:
      video = avhubert_preprocess.crop_and_flip(video[..., 0], rng, train=rng is not None,
                                                crop_size=size)[..., None]
      if rng is not None and self.time_mask_prob > 0:
        video, _ = avhubert_preprocess.time_mask(video, rng, mask_prob=self.time_mask_prob)
    if not 1 <= video.shape[0] <= self.max_frames:
      skip(index, record_id, f"{video.shape[0]} frames, expected 1..{self.max_frames} "
            "(data.max_frames)")
      return None
    num_frames = record.get("num_frames", video.shape[0])
    if int(num_frames) != video.shape[0]:
      skip(index, record_id, f"num_frames={num_frames} but the video has {video.shape[0]}")
      return None
    return video

  def __call__(self, index, record, frames: int | None = None, rng=None):
    """Example dict for ``record`` (read at ``index``), or None if corrupt.

    Video (or features) are padded to ``frames``, by default the smallest
    length bucket that holds the clip. ``rng``: training augmentation.
    """
    if isinstance(record, Corrupt):
      skip(index, None, record.reason)
      return None
    try:
      record_id, text = _as_str(record["id"]), _as_str(record["text"])
    except (KeyError, TypeError, UnicodeDecodeError) as e:
      skip(index, None, f"bad id/text: {e!r}")
      return None
    if self.feature_dim is None:
      video = self._video(index, record_id, record, rng)
    else:
      video = self._features(index, record_id, record)
    if video is None:
      return None
    frames = frames or bucketing.bucket_of(video.shape[0], self.buckets)
    if video.shape[0] > frames:
      skip(index, record_id, f"{video.shape[0]} frames do not fit its planned length bucket "
            f"({frames} frames): the record disagrees with the source's lengths")
      return None
    task = _as_str(record["task"]) if "task" in record else None
    instruction_key = None if None in self.instructions else task
    if instruction_key not in self.instructions:
      skip(index, record_id, f"task {task!r} has no instruction (data.instruction is empty, so "
            f"each record needs one of the tasks {sorted(self.instructions)})")
      return None
    counts = {}
    if self.cluster_counts:
      counts = self._counts(index, record_id, record, video.shape[0], frames)
      if counts is None:
        return None
    label = tokenizer_lib.label_ids(self.tokenizer, text, self.special)
    if len(label) > self.max_label:
      raise ValueError(f"record {record_id!r}: transcript {text!r} + EOS needs {len(label)} "
                       f"tokens > data.max_label_tokens={self.max_label}; raise "
                       "data.max_label_tokens")
    label_ids, label_mask = self._pad(label, self.max_label)
    padded = np.zeros((frames,) + video.shape[1:], video.dtype)  # [T_bucket, ...]
    padded[:video.shape[0]] = video
    instruction_ids, instruction_mask = self.instructions[instruction_key]
    return {
        **self._visual(padded, np.arange(frames) < video.shape[0]),
        "instruction_ids": instruction_ids.copy(),
        "instruction_mask": instruction_mask.copy(),
        "label_ids": label_ids,
        "label_mask": label_mask,
        "example_mask": np.bool_(True),
        "id": np.asarray(record_id, dtype=object),
        "text": np.asarray(text, dtype=object),
        "task": np.asarray(task or "", dtype=object),
        **counts,
        **self._ctc_targets(record_id, text),
    }

  def _counts(self, index, record_id, record, num_frames: int, frames: int):
    """{'cluster_counts': int32 [frames]} (run lengths, 0 after), or None (counted)."""
    counts = np.asarray(record.get("cluster_counts", []), np.int64).reshape(-1)
    if counts.size == 0 or np.any(counts < 1) or int(counts.sum()) != num_frames:
      skip(index, record_id, f"cluster counts {counts.tolist()[:8]}... must be positive and sum "
            f"to the clip's {num_frames} frames (data.use_cluster_counts)")
      return None
    out = np.zeros((frames,), np.int32)
    out[:counts.size] = counts
    return {"cluster_counts": out}

  def _ctc_targets(self, record_id, text):
    """Character targets of ``text`` for the CTC head; {} when data.ctc_max_chars is 0."""
    if not self.ctc_max_chars:
      return {}
    try:
      labels, paddings = ctc.encode_text([text], self.ctc_max_chars)
    except ValueError as e:
      raise ValueError(f"record {record_id!r}: {e}") from e
    return {"ctc_labels": labels[0], "ctc_label_mask": paddings[0] == 0}

  def _features(self, index, record_id, record):
    """Validated cached features [T, D] float32, or None (counted) if malformed."""
    feats = record.get("features")
    if (not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.shape[1] != self.feature_dim
        or not 1 <= feats.shape[0] <= self.max_frames):
      skip(index, record_id, f"cached features {getattr(feats, 'shape', feats)!r}, expected "
            f"(1..{self.max_frames}, {self.feature_dim})")
      return None
    return feats.astype(np.float32)

  def _visual(self, values, mask):
    if self.feature_dim is None:
      return {"video": values, "video_mask": mask}
    return {"features": values, "features_mask": mask}

  def filler(self, frames: int | None = None):
    """A row that keeps batch shapes static and counts for nothing."""
    frames = frames or self.max_frames
    if self.feature_dim is None:
      empty = np.zeros((frames,) + self.frame_shape, np.uint8)
    else:
      empty = np.zeros((frames, self.feature_dim), np.float32)
    instruction_ids, instruction_mask = self.instructions[self.default_task]
    counts = {"cluster_counts": np.zeros((frames,), np.int32)} if self.cluster_counts else {}
    return {
        **self._visual(empty, np.zeros((frames,), bool)),
        **counts,
        "instruction_ids": instruction_ids.copy(),
        "instruction_mask": instruction_mask.copy(),
        "label_ids": np.full((self.max_label,), self.pad_id, np.int32),
        "label_mask": np.zeros((self.max_label,), bool),
        "example_mask": np.bool_(False),
        "id": np.asarray("", dtype=object),
        "text": np.asarray("", dtype=object),
        "task": np.asarray("", dtype=object),
        **self._ctc_targets("", ""),
    }
