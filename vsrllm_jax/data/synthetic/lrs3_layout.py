"""Synthetic clips written in the layout of LRS3 as VSP-LLM prepares it: mp4 mouth crops
plus ``{split}.tsv``, ``.wrd`` and ``.cluster_counts`` manifests.

A small tree from ``synthetic_clips`` and ``write_lrs3_like_tree`` takes the
real-data path (``data.name='lrs3'``) end to end with no LRS3 at hand: the
tests and ``benchmarks/input_pipeline.py`` read such trees.
"""
from __future__ import annotations

import os

import numpy as np

from vsrllm_jax.data import tasks, video_io
from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.data.synthetic.spec import SyntheticLipsSpec

AUDIO_SAMPLES_PER_FRAME = 640  # 16 kHz audio at 25 fps


def _frames(frames) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
    raise ValueError(f"clip frames must be uint8 [T, H, W(, C)], got {frames.dtype} "
                     f"{frames.shape}")
  return frames


def write_lrs3_like_tree(root, clips, split: str = "train", *, crf: int = 0,
                         fps: int = 25) -> dict:
  """Writes ``root/{split}.tsv|.wrd|.cluster_counts`` and one mp4 per clip.

  clips: (manifest id, frames uint8 [T, H, W] or [T, H, W, 1|3], text,
  cluster counts or None). Videos go to ``root/video/{split}/{i:05d}.mp4``,
  listed relative to the root line (the absolute root, like real manifests).
  ``.cluster_counts`` is written when any clip has counts; a clip with None
  then gets all ones. Returns {"tsv", "wrd", "cluster_counts", "videos",
  "rows"} (paths; rows are the clips' (id, video path, T)).
  """
  root = os.path.abspath(os.fspath(root))
  video_dir = os.path.join(root, "video", split)
  os.makedirs(video_dir, exist_ok=True)
  tsv, wrd, counts_lines, videos, rows = [root], [], [], [], []
  any_counts = any(c[3] is not None for c in clips)
  for i, (manifest_id, frames, text, counts) in enumerate(clips):
    frames = _frames(frames)
    rel = os.path.join("video", split, f"{i:05d}.mp4")
    path = os.path.join(root, rel)
    video_io.write_video(path, frames, fps=fps, crf=crf)
    length = int(frames.shape[0])
    tsv.append("\t".join([manifest_id, rel, rel[:-4] + ".wav", str(length),
                          str(length * AUDIO_SAMPLES_PER_FRAME)]))
    wrd.append(text)
    counts = [1] * length if counts is None else [int(c) for c in counts]
    counts_lines.append(" ".join(map(str, counts)))
    videos.append(path)
    rows.append((manifest_id, path, length))
  files = {"tsv": os.path.join(root, f"{split}.tsv"), "wrd": os.path.join(root, f"{split}.wrd"),
           "cluster_counts": os.path.join(root, f"{split}.cluster_counts")}
  write_lines(files["tsv"], tsv)
  write_lines(files["wrd"], wrd)
  if any_counts:
    write_lines(files["cluster_counts"], counts_lines)
  elif os.path.exists(files["cluster_counts"]):
    os.remove(files["cluster_counts"])
  return {**files, "videos": videos, "rows": rows}


def write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def synthetic_clips(num: int, *, split: str = "train", image_size: int = 96,
                    max_frames: int = 75, seed: int = 0, task_names=("vsr",),
                    with_counts: bool = True) -> list:
  """``num`` clips as ``write_lrs3_like_tree`` takes them, rendered by synthetic_lips.

  Default viseme timing gives 58-75 frames (2.3-3 s at 25 fps); tasks cycle
  through ``task_names`` (ids ``lrs3/<pair>/<split>/<index>``). Cluster counts
  are random runs of 1-3 frames summing to T.
  """
  spec = SyntheticLipsSpec(image_size=image_size, max_frames=max_frames, viseme_frames=(2, 4),
                           generation_seed=seed, train_clips=num)
  rng = np.random.default_rng(seed)
  clips = []
  for i in range(num):
    clip = synthetic_lips.generate_clip(spec, "train", i)
    frames = clip["video"][..., 0]
    src, tgt = tasks.language_pair(task_names[i % len(task_names)])
    counts = None
    if with_counts:
      runs = rng.integers(1, 4, size=len(frames))
      ends = np.minimum(np.cumsum(runs), len(frames))
      counts = np.diff(np.concatenate([[0], np.unique(ends)])).tolist()
    clips.append((f"lrs3/{src}-{tgt}/{split}/{i:05d}", frames, clip["text"], counts))
  return clips
