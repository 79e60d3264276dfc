"""LRS3-like trees for tests and benchmarks: real mp4 files plus VSP-LLM manifests.

``write_lrs3_like_tree`` writes what it is given; ``break_sample`` then damages
one sample in one of the ways the builder must survive (``BROKEN_KINDS``), and
``SKIP_KIND_OF`` says which skip kind the builder should count it as.
``synthetic_clips`` makes LRS3-shaped clips (96x96, 2-3 s) from the synthetic
lip renderer, so no real data is needed.
"""
from __future__ import annotations

import os

import numpy as np

from vsrllm_jax.data import synthetic_lips
from vsrllm_jax.data import tasks
from vsrllm_jax.data import video_io
from vsrllm_jax.data.synthetic_spec import SyntheticLipsSpec

# How a sample can be broken -> the skip kind lrs3_manifest counts it under.
SKIP_KIND_OF = {
    "missing_file": "missing_file",
    "not_a_video": "not_a_video",
    "corrupt_video": "corrupt_video",       # bytes inside the stream overwritten
    "truncated_video": "corrupt_video",     # file cut in half
    "frame_count_mismatch": "frame_count_mismatch",
    "cluster_counts_mismatch": "cluster_counts_mismatch",
    "empty_transcript": "empty_transcript",
}
BROKEN_KINDS = tuple(SKIP_KIND_OF)
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
  _write_lines(files["tsv"], tsv)
  _write_lines(files["wrd"], wrd)
  if any_counts:
    _write_lines(files["cluster_counts"], counts_lines)
  elif os.path.exists(files["cluster_counts"]):
    os.remove(files["cluster_counts"])
  return {**files, "videos": videos, "rows": rows}


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))


def _read_lines(path):
  with open(path, encoding="utf-8") as f:
    return f.read().split("\n")[:-1]


def break_sample(tree: dict, index: int, kind: str) -> None:
  """Damages clip ``index`` of a tree from ``write_lrs3_like_tree`` in way ``kind``."""
  if kind not in SKIP_KIND_OF:
    raise ValueError(f"unknown broken-sample kind {kind!r}; valid: {BROKEN_KINDS}")
  video = tree["videos"][index]
  if kind == "missing_file":
    os.remove(video)
  elif kind == "not_a_video":
    with open(video, "w", encoding="utf-8") as f:
      f.write("this is a transcript, not a video\n" * 20)
  elif kind == "truncated_video":
    with open(video, "rb") as f:
      data = f.read()
    with open(video, "wb") as f:
      f.write(data[:len(data) // 2])
  elif kind == "corrupt_video":
    with open(video, "rb") as f:
      data = bytearray(f.read())
    start = data.find(b"mdat") + 64  # inside the coded frames
    noise = np.random.default_rng(index).integers(0, 256, max(64, len(data) // 4), np.uint8)
    data[start:start + len(noise)] = noise.tobytes()[:max(0, len(data) - start)]
    with open(video, "wb") as f:
      f.write(bytes(data))
  elif kind in ("frame_count_mismatch", "cluster_counts_mismatch", "empty_transcript"):
    key = {"frame_count_mismatch": "tsv", "cluster_counts_mismatch": "cluster_counts",
           "empty_transcript": "wrd"}[kind]
    if key == "cluster_counts" and not os.path.exists(tree[key]):
      raise ValueError("cluster_counts_mismatch needs a tree written with cluster counts")
    lines = _read_lines(tree[key])
    row = index + 1 if key == "tsv" else index  # the tsv starts with the root line
    if key == "tsv":
      cols = lines[row].split("\t")
      cols[3] = str(int(cols[3]) + 1)
      lines[row] = "\t".join(cols)
    elif key == "cluster_counts":
      lines[row] = lines[row] + " 1"
    else:
      lines[row] = ""
    _write_lines(tree[key], lines)


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
