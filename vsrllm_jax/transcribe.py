r"""Transcribes mouth-cropped video files with a trained run.

  python -m vsrllm_jax.transcribe --workdir=/tmp/vsr_run clip1.mp4 [clip2.mp4 ...]
      [--task=vsr|vst_es|vst_fr|vst_it|vst_pt] [--cluster_counts=FILE] [--step=N]

Prints one line per video, ``path<TAB>transcript``. The clips go through the
run's own evaluation preprocessing (grayscale, centre crop to
``data.image_size``, padding to a length bucket) and its encoder, projector
and LLM, decoded with ``config.decode``; so for the clips of a split this
prints what ``decode`` writes for them. Clips must be mouth crops like the
training data (LRS3/AV-HuBERT: 96x96 mouth regions at 25 fps); anything
else is refused with what was expected. Cluster counts are optional: with
``--cluster_counts`` (one line of run lengths per video, VSP-LLM's format)
a run trained with deduplication deduplicates; without, each frame is its
own run.
"""
from __future__ import annotations

import logging
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags

from vsrllm_jax.data import pipeline, tasks, video_io
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.run import workdir as workdir_lib

_FPS_TOLERANCE = 0.5


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True, **fv)
  flags.DEFINE_enum("task", "vsr", sorted(tasks.TASKS),
                    "Task (instruction) when the run reads each clip's task.", **fv)
  flags.DEFINE_string("cluster_counts", None,
                      "File with one line of cluster run lengths per video, in the order of "
                      "the video arguments (VSP-LLM's format); unset: each frame is its own "
                      "run.", **fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by validation WER).",
                       **fv)


def expected_frame_size(data_cfg) -> int:
  """Side of the square frames the run's data held before cropping."""
  return int(data_cfg.source_image_size if data_cfg.name == "lrs3" else data_cfg.image_size)


def read_clip(path: str, data_cfg) -> np.ndarray:
  """Frames uint8 [T, S, S] of a mouth-cropped clip, or a ValueError saying what is expected."""
  size, max_frames = expected_frame_size(data_cfg), int(data_cfg.max_frames)
  expected = (f"transcribe expects mouth-cropped clips like the run's training data "
              f"({data_cfg.name}): {size}x{size} frames of the mouth region at 25 fps, at "
              f"most {max_frames} frames (data.max_frames)")
  info = video_io.probe_video(path)
  if (info.height, info.width) != (size, size):
    raise ValueError(f"{path}: {info.width}x{info.height} frames; {expected}. Crop the mouth "
                     "region first (e.g. AV-HuBERT's/VSP-LLM's landmark-based mouth ROI "
                     "preprocessing).")
  if info.fps and abs(info.fps - 25) > _FPS_TOLERANCE:
    raise ValueError(f"{path}: {info.fps:g} fps; {expected}. Resample it to 25 fps first.")
  frames = video_io.read_video(path)
  if frames.shape[0] > max_frames:
    raise ValueError(f"{path}: {frames.shape[0]} frames; {expected}. Split it into shorter "
                     "clips.")
  return frames


def _read_counts(path: str | None, n: int) -> list[list[int] | None]:
  if path is None:
    return [None] * n
  with open(path) as f:
    lines = [line.split() for line in f if line.strip()]
  if len(lines) != n:
    raise ValueError(f"--cluster_counts={path} has {len(lines)} lines for {n} videos")
  return [[int(c) for c in line] for line in lines]


class _Clips:
  """The videos as a random-access source of records (what ``eval_batches`` reads)."""

  def __init__(self, records):
    self._records = records
    self.lengths = np.asarray([r["num_frames"] for r in records], np.int32)

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


def transcribe(workdir: str, paths: list[str], *, task: str = "vsr",
               cluster_counts: str | None = None, step: int | None = None) -> list[str]:
  """Transcripts of the video files at ``paths``, in order."""
  config = ml_collections.ConfigDict(workdir_lib.load_config(workdir).to_dict())
  counts = _read_counts(cluster_counts, len(paths))
  with config.unlocked():
    config.data.cache_features = False        # the encoder runs on the clips themselves
    if config.data.get("use_cluster_counts") and cluster_counts is None:
      logging.warning("the run deduplicates with cluster counts; none given, so every frame "
                      "is its own run (pass --cluster_counts for VSP-LLM's behaviour)")
      config.data.use_cluster_counts = False
  records = []
  for path, runs in zip(paths, counts):
    frames = read_clip(path, config.data)
    record = dict(id=path, text="", video=frames[..., None], num_frames=frames.shape[0],
                  task=task)
    if runs is not None:
      record["cluster_counts"] = np.asarray(runs, np.int32)
    records.append(record)
  run = open_lib.open_run(workdir, step=step, config=config)
  rows = run.decode(pipeline.eval_batches(run.config.data, run.setup.tokenizer, "transcribe",
                                          global_batch_size=run.config.eval_batch_size,
                                          source=_Clips(records)))
  by_id = {row["id"]: row["hypothesis"] for row in rows}
  missing = [p for p in paths if p not in by_id]
  if missing:
    raise ValueError(f"could not transcribe {missing}: see the warnings above")
  return [by_id[p] for p in paths]


def main(argv):
  paths = argv[1:]   # the video files, after the flags (shell globs work: clips/*.mp4)
  if not paths:
    raise app.UsageError("give one or more video files: python -m vsrllm_jax.transcribe "
                         "--workdir=DIR clip.mp4 [more.mp4]")
  for path in paths:
    if not os.path.isfile(path):
      raise app.UsageError(f"{path} is not a file")
  f = flags.FLAGS
  texts = transcribe(f.workdir, paths, task=f.task, cluster_counts=f.cluster_counts,
                     step=f.step)
  for path, text in zip(paths, texts):
    sys.stdout.write(f"{path}\t{text}\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
