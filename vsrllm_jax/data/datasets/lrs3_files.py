"""Parsing of AV-HuBERT / VSP-LLM manifests: ``{split}.tsv``, ``.wrd``, ``.cluster_counts``.

``{split}.tsv``: the first line is the root directory (a relative root is
taken relative to the manifest's own directory); then one tab-separated row
per clip: ``id  video_path  audio_path  n_video_frames  n_audio_samples``,
paths relative to the root or absolute. ``{split}.wrd``: one transcript (or
translation) per row, same order. ``{split}.cluster_counts``: one row of
space-separated positive run lengths per clip (VSP-LLM's deduplication).

A file that does not have this shape (missing, wrong column count, rows out
of step between the files, duplicate ids) is an error naming the file and
line: those are not bad samples but a wrong manifest, and skipping rows of it
would silently misalign transcripts with videos.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

from vsrllm_jax.data import tasks


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  line: int                   # line number in the tsv (the root is line 1)
  manifest_id: str            # the tsv's first column, e.g. lrs3/en-fr or lrs3/en-en/<clip>
  record_id: str              # unique per split (see record_id)
  video_path: str             # absolute
  num_frames: int             # n_video_frames as the tsv says
  text: str                   # stripped .wrd line ('' if empty)
  cluster_counts: tuple[int, ...] | None  # None: no .cluster_counts file


def split_files(manual_dir, stem: str) -> dict[str, str]:
  """Paths of the three manifest files of split ``stem`` (e.g. train, valid, test)."""
  base = os.path.join(os.fspath(manual_dir), stem)
  return {"tsv": base + ".tsv", "wrd": base + ".wrd", "cluster_counts": base + ".cluster_counts"}


def _lines(path: str) -> list[str]:
  """Lines without their terminator; one trailing newline does not make an extra line."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line.rstrip("\r") for line in lines]


def record_id(manifest_id: str, video_path: str) -> str:
  """The manifest id, made unique when it names only the language pair.

  VSP-LLM's released manifests use ``lrs3/en-fr`` for every row; such ids
  (ending in the pair) get the video's last three path components without
  extension appended (LRS3's ``<split>/<speaker video>/<clip>``).
  """
  if tasks.is_language_pair(manifest_id.rstrip("/").rsplit("/", 1)[-1]):
    parts = os.path.splitext(os.path.normpath(video_path))[0].split(os.sep)
    return manifest_id.rstrip("/") + "/" + "/".join(p for p in parts[-3:] if p)
  return manifest_id


def _parse_counts(line: str, path: str, number: int) -> tuple[int, ...]:
  try:
    counts = tuple(int(x) for x in line.split())
  except ValueError:
    counts = (0,)
  if any(c <= 0 for c in counts):
    raise ValueError(f"{path}:{number}: expected space-separated positive integers (run "
                     f"lengths of a clip's frames), got {line[:80]!r}")
  return counts


def read_split(manual_dir, stem: str, *, require_cluster_counts: bool = False
               ) -> list[ManifestRow]:
  """The rows of split ``stem`` with their transcripts and cluster counts."""
  files = split_files(manual_dir, stem)
  for key in ("tsv", "wrd") + (("cluster_counts",) if require_cluster_counts else ()):
    if not os.path.isfile(files[key]):
      raise FileNotFoundError(f"manifest file {files[key]} not found (manual_dir="
                              f"{os.fspath(manual_dir)!r}, split file stem {stem!r})")
  tsv = _lines(files["tsv"])
  if not tsv or not tsv[0].strip():
    raise ValueError(f"{files['tsv']}:1: expected the root directory on the first line")
  root = os.path.join(os.path.dirname(os.path.abspath(files["tsv"])), tsv[0].strip())
  rows = tsv[1:]
  texts = _lines(files["wrd"])
  if len(texts) != len(rows):
    raise ValueError(f"{files['wrd']} has {len(texts)} lines but {files['tsv']} has "
                     f"{len(rows)} rows after the root line; they must match one to one")
  counts = None
  if os.path.isfile(files["cluster_counts"]):
    counts = _lines(files["cluster_counts"])
    if len(counts) != len(rows):
      raise ValueError(f"{files['cluster_counts']} has {len(counts)} lines but "
                       f"{files['tsv']} has {len(rows)} rows; they must match one to one")
  out, seen = [], {}
  for i, row in enumerate(rows):
    number = i + 2
    cols = row.split("\t")
    if len(cols) != 5:
      raise ValueError(f"{files['tsv']}:{number}: expected 5 tab-separated columns (id, "
                       f"video_path, audio_path, n_video_frames, n_audio_samples), got "
                       f"{len(cols)}: {row[:120]!r}")
    try:
      num_frames = int(cols[3])
    except ValueError:
      raise ValueError(f"{files['tsv']}:{number}: n_video_frames {cols[3]!r} is not an "
                       "integer") from None
    video = os.path.normpath(os.path.join(root, cols[1]))
    rid = record_id(cols[0], video)
    if rid in seen:
      raise ValueError(f"{files['tsv']}: lines {seen[rid]} and {number} have the same id "
                       f"{rid!r}")
    seen[rid] = number
    out.append(ManifestRow(
        line=number, manifest_id=cols[0], record_id=rid, video_path=video,
        num_frames=num_frames, text=texts[i].strip(),
        cluster_counts=(None if counts is None
                        else _parse_counts(counts[i], files["cluster_counts"], i + 1))))
  return out


def fingerprint(manual_dir, stems, extra: str = "") -> str:
  """Short hash of the manifest files of ``stems`` (names and contents) and ``extra``.

  The videos themselves are not hashed (that would read the whole data set);
  replacing videos under unchanged manifests needs a new manifest or a rebuild.
  """
  h = hashlib.sha256(extra.encode())
  for stem in stems:
    for key, path in sorted(split_files(manual_dir, stem).items()):
      h.update(f"\0{stem}.{key}\0".encode())
      if os.path.isfile(path):
        with open(path, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
      else:
        h.update(b"<absent>")
  return h.hexdigest()[:12]
