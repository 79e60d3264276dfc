"""Damaged samples in LRS3-like trees (``data.synthetic.lrs3_layout``), the ways the
builder must survive: ``break_sample`` damages one sample in one of the ways of
``BROKEN_KINDS``, and ``SKIP_KIND_OF`` says which skip kind the builder should
count it as.
"""
from __future__ import annotations

import os

import numpy as np

from vsrllm_jax.data.synthetic.lrs3_layout import write_lines

# How a sample can be broken -> the skip kind the lrs3 builder counts it under.
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
    write_lines(tree[key], lines)
