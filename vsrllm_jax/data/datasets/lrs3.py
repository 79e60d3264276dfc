"""tfds builder ``lrs3_manifest``: LRS3 mouth crops listed by AV-HuBERT / VSP-LLM manifests.

Reads ``{stem}.tsv`` / ``.wrd`` / ``.cluster_counts`` from a manual_dir
(``lrs3_files``) and the mp4 files they name, and writes array_record
(read through ``tfds.data_sources`` without TensorFlow). Records:
  id              unique clip id (``lrs3_files.record_id``)
  task            ``vsr`` or ``vst_{es,fr,it,pt}`` (``tasks.task_from_id``)
  video           uint8 [T, S, S, 1] grayscale frames   (storage="frames")
  video_mp4       uint8 [N] the clip's mp4 file bytes    (storage="mp4", default)
  num_frames      int32 T
  text            transcript or translation
  cluster_counts  int32 [K], sum T (all ones when the manifest has none)
``decode_record`` turns either storage into ``video`` [T, S, S, 1].

Storage: mp4 by default, chosen by ``benchmarks/input_pipeline.py`` (synthetic
96x96 clips of 2-3 s, h264 crf 23): read + decode + AV-HuBERT train
preprocessing runs at ~120 clips per CPU-second from mp4 against ~555 from
decoded frames, but frames take ~10x the disk (321 KB vs 31 KB per clip, even
after array_record's compression; LRS3's 433 h would be ~190 GB vs ~19 GB).
One core's ~120 clips/s is more than a training step consumes per host, and
grain workers scale it; "frames" remains for small sets read many times.
A prepared copy reads without the manual_dir: ``tfds.builder_from_directory``.

Every sample is decoded and checked at build time. A bad one is skipped,
logged with its file, and counted by kind (``SKIP_KINDS``, first failing
check in that order); the counts and the skipped samples are written to
``bad_samples-<split>.json`` next to the data (``read_bad_samples``). More
than ``max_bad_fraction`` of a split's rows bad is an error. The builder
config name is ``<storage>_s<size>_<fingerprint>`` over the manifest files and
the options that change the records, so a changed manifest never reuses stale
files.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from vsrllm_jax.data.datasets.base import LocalBuilder
from vsrllm_jax.data.datasets import lrs3_files
from vsrllm_jax.data import tasks
from vsrllm_jax.data import video_io
from vsrllm_jax.data.synthetic.synthetic_lips import default_data_dir

_log = logging.getLogger(__name__)

EMPTY_TRANSCRIPT = "empty_transcript"
WRONG_FRAME_SIZE = "wrong_frame_size"
FRAME_COUNT_MISMATCH = "frame_count_mismatch"
CLUSTER_COUNTS_MISMATCH = "cluster_counts_mismatch"
SKIP_KINDS = (EMPTY_TRANSCRIPT, video_io.MISSING, video_io.NOT_A_VIDEO, video_io.CORRUPT,
              WRONG_FRAME_SIZE, FRAME_COUNT_MISMATCH, CLUSTER_COUNTS_MISMATCH)
STORAGES = ("mp4", "frames")
DEFAULT_SPLITS = (("train", "train"), ("validation", "valid"), ("test", "test"))
_FORMAT_VERSION = 1  # bump when the records change for unchanged options


class TooManyBadSamplesError(ValueError):
  """More than max_bad_fraction of a split's samples failed validation."""


@dataclasses.dataclass(frozen=True)
class Lrs3ManifestOptions:
  """What to build from where.

  manual_dir: folder holding ``{stem}.tsv``, ``.wrd`` and ``.cluster_counts``.
  splits: (tfds split name, file stem) pairs; every stem's tsv/wrd must exist.
  storage: "mp4" (encoded bytes, decoded on read) or "frames" (decoded uint8).
  image_size: expected frame height and width (LRS3 mouth crops: 96).
  max_bad_fraction: building fails once more than this fraction of a split's
    rows is bad (not in the fingerprint: it does not change the records).
  require_cluster_counts: a split without ``.cluster_counts`` is an error
    (else its records get all-ones counts, i.e. no deduplication).
  build_threads: decoding threads while building (not in the fingerprint).
  """
  manual_dir: str
  splits: tuple[tuple[str, str], ...] = DEFAULT_SPLITS
  storage: str = "mp4"
  image_size: int = 96
  max_bad_fraction: float = 0.01
  require_cluster_counts: bool = False
  build_threads: int = 4

  def __post_init__(self):
    object.__setattr__(self, "manual_dir", os.path.abspath(os.fspath(self.manual_dir)))
    object.__setattr__(self, "splits", tuple((str(a), str(b)) for a, b in self.splits))
    if self.storage not in STORAGES:
      raise ValueError(f"Lrs3ManifestOptions.storage={self.storage!r}; valid: {STORAGES}")
    if not 0.0 <= self.max_bad_fraction <= 1.0:
      raise ValueError("Lrs3ManifestOptions.max_bad_fraction must be in [0, 1], got "
                       f"{self.max_bad_fraction}")
    if self.image_size < 1 or self.build_threads < 1 or not self.splits:
      raise ValueError(f"Lrs3ManifestOptions: image_size={self.image_size}, build_threads="
                       f"{self.build_threads} must be >= 1 and splits non-empty")
    if not os.path.isdir(self.manual_dir):
      raise FileNotFoundError(f"Lrs3ManifestOptions.manual_dir={self.manual_dir!r} is not a "
                              "directory")

  def fingerprint(self) -> str:
    extra = json.dumps({"splits": self.splits, "storage": self.storage,
                        "image_size": self.image_size, "format": _FORMAT_VERSION,
                        "require_cluster_counts": self.require_cluster_counts})
    return lrs3_files.fingerprint(self.manual_dir, [s for _, s in self.splits], extra)


def config_name(options: Lrs3ManifestOptions) -> str:
  return f"{options.storage}_s{options.image_size}_{options.fingerprint()}"


@dataclasses.dataclass(eq=False, repr=False)
class Lrs3ManifestConfig(tfds.core.BuilderConfig):
  options: Lrs3ManifestOptions | None = None

  def __repr__(self):
    return f"Lrs3ManifestConfig(name={self.name!r})"


class _BadSample(Exception):
  def __init__(self, kind: str, reason: str):
    super().__init__(reason)
    self.kind, self.reason = kind, reason


def _check_row(row: lrs3_files.ManifestRow, options: Lrs3ManifestOptions):
  """(video value for the record, T) or _BadSample; checks in SKIP_KINDS order."""
  if not row.text:
    raise _BadSample(EMPTY_TRANSCRIPT, "empty transcript in the .wrd file")
  try:
    data = video_io.read_file_bytes(row.video_path)
    frames = video_io.decode_video_bytes(data, row.video_path)
  except video_io.VideoError as e:
    raise _BadSample(e.kind, e.reason) from None
  size = options.image_size
  if frames.shape[1:] != (size, size):
    raise _BadSample(WRONG_FRAME_SIZE, f"frames are {frames.shape[1]}x{frames.shape[2]}, "
                     f"expected {size}x{size} (image_size)")
  length = frames.shape[0]
  if length != row.num_frames:
    raise _BadSample(FRAME_COUNT_MISMATCH, f"decoded {length} frames but the tsv says "
                     f"{row.num_frames}")
  if row.cluster_counts is not None and sum(row.cluster_counts) != length:
    raise _BadSample(CLUSTER_COUNTS_MISMATCH, f"cluster counts sum to "
                     f"{sum(row.cluster_counts)} but the video has {length} frames")
  if options.storage == "mp4":
    return np.frombuffer(data, np.uint8), length
  return frames[..., None], length


def _checked(row, options):
  try:
    return row, _check_row(row, options), None
  except _BadSample as e:
    return row, None, e


class Lrs3Manifest(LocalBuilder, skip_registration=True):
  """LRS3 clips from VSP-LLM manifests; construct with ``Lrs3Manifest(options=...)``."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def __init__(self, *, options: Lrs3ManifestOptions | None = None,
               config: Lrs3ManifestConfig | None = None, **kwargs):
    # tfds unpickles a builder (e.g. inside a grain worker) as __init__(config=...).
    if config is None:
      if options is None:
        raise ValueError("Lrs3Manifest needs options=Lrs3ManifestOptions(manual_dir=...)")
      config = Lrs3ManifestConfig(name=config_name(options), version=self.VERSION,
                                  options=options, description="see Lrs3ManifestOptions")
    elif options is not None and options != config.options:
      raise ValueError("Lrs3Manifest got both options and a config with other options")
    super().__init__(config=config, **kwargs)

  @property
  def options(self) -> Lrs3ManifestOptions:
    return self.builder_config.options

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.options.image_size
    raw = tfds.features.Encoding.BYTES  # the default int64 lists are ~8x slower and larger
    video = ({"video_mp4": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=raw)}
             if self.options.storage == "mp4" else
             {"video": tfds.features.Tensor(shape=(None, s, s, 1), dtype=np.uint8,
                                            encoding=raw)})
    return tfds.core.DatasetInfo(
        builder=self,
        description="LRS3 mouth crops with transcripts / translations (VSP-LLM manifests).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "task": tfds.features.Text(),
            **video,
            "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
            "text": tfds.features.Text(),
            "cluster_counts": tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                                   encoding=raw),
        }),
        supervised_keys=None,
        disable_shuffling=True,  # record i of a split is the i-th good manifest row
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # reads the manual_dir named in the options
    opts = self.options
    # Parse every manifest (and map every id to a task) before decoding anything.
    parsed = {}
    for split, stem in opts.splits:
      rows = lrs3_files.read_split(opts.manual_dir, stem,
                                       require_cluster_counts=opts.require_cluster_counts)
      tsv = lrs3_files.split_files(opts.manual_dir, stem)["tsv"]
      for row in rows:
        try:
          tasks.task_from_id(row.manifest_id)
        except ValueError as e:
          raise ValueError(f"{tsv}:{row.line}: {e}") from None
      parsed[split] = (stem, rows)
    return {split: self._generate_examples(split, stem, rows)
            for split, (stem, rows) in parsed.items()}

  def _generate_examples(self, split: str, stem: str, rows):
    opts = self.options
    allowed = int(opts.max_bad_fraction * len(rows))
    counts = {kind: 0 for kind in SKIP_KINDS}
    bad = []
    with concurrent.futures.ThreadPoolExecutor(opts.build_threads) as pool:
      for start in range(0, len(rows), 64):  # bounded look-ahead, order kept
        chunk = rows[start:start + 64]
        for row, checked, error in pool.map(_checked, chunk, [opts] * len(chunk)):
          if error is not None:
            counts[error.kind] += 1
            bad.append({"line": row.line, "id": row.record_id, "video": row.video_path,
                        "kind": error.kind, "reason": error.reason})
            _log.warning("lrs3_manifest %s: skipping %s (%s.tsv line %d, id %r): %s: %s",
                         split, row.video_path, stem, row.line, row.record_id, error.kind,
                         error.reason)
            if len(bad) > allowed:
              raise TooManyBadSamplesError(
                  f"split {split!r} ({stem}.tsv in {opts.manual_dir}): {len(bad)} of "
                  f"{len(rows)} samples are bad, more than max_bad_fraction="
                  f"{opts.max_bad_fraction} allows ({allowed}); so far by kind: "
                  f"{ {k: v for k, v in counts.items() if v} }; last: {row.video_path}: "
                  f"{error.reason}")
            continue
          video, length = checked
          key = "video_mp4" if opts.storage == "mp4" else "video"
          counts_of = row.cluster_counts or (1,) * length
          yield row.line, {
              "id": row.record_id,
              "task": tasks.task_from_id(row.manifest_id),
              key: video,
              "num_frames": np.int32(length),
              "text": row.text,
              "cluster_counts": np.asarray(counts_of, np.int32),
          }
    report = {"split": split, "stem": stem, "total": len(rows), "kept": len(rows) - len(bad),
              "skipped": counts, "samples": bad}
    path = os.path.join(os.fspath(self.data_dir), f"bad_samples-{split}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)


def read_bad_samples(builder_or_dir) -> dict[str, dict]:
  """{split: report} from the ``bad_samples-<split>.json`` files of a prepared build.

  A report holds ``total``, ``kept``, ``skipped`` ({kind: count} over
  ``SKIP_KINDS``) and ``samples`` (line, id, video, kind, reason of each).
  Accepts a builder or its data_dir (``.../lrs3_manifest/<config>/<version>``).
  """
  directory = os.fspath(getattr(builder_or_dir, "data_dir", builder_or_dir))
  names = sorted(n for n in os.listdir(directory)
                 if n.startswith("bad_samples-") and n.endswith(".json"))
  if not names:
    raise FileNotFoundError(f"no bad_samples-<split>.json in {directory}: not a prepared "
                            "lrs3_manifest build")
  out = {}
  for name in names:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      report = json.load(f)
    out[report["split"]] = report
  return out


def decode_record(record: dict) -> dict:
  """The record with ``video`` uint8 [T, S, S, 1], decoding ``video_mp4`` if that is stored."""
  if "video_mp4" not in record:
    return record
  out = {k: v for k, v in record.items() if k != "video_mp4"}
  name = record.get("id", "<record>")
  name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
  out["video"] = video_io.decode_video_bytes(record["video_mp4"], name)[..., None]
  return out


def prepare(options: Lrs3ManifestOptions, data_dir: str | os.PathLike | None = None):
  """The builder for ``options`` under ``data_dir``, built on first use (no network)."""
  builder = Lrs3Manifest(options=options, data_dir=str(data_dir or default_data_dir()))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
