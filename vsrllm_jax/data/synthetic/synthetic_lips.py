"""tfds builder ``synthetic_lips``: GRID sentences rendered as mouth videos.

Writes array_record so that grain reads it through ``tfds.data_sources``
without TensorFlow. Each clip is a pure function of (spec, split, index): its
rng comes from ``SeedSequence([seed, split, index])``, so generation order or
parallelism never changes the data. The builder config name carries the
spec's fingerprint, so a changed spec never reuses stale files.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from vsrllm_jax.data.datasets.base import LocalBuilder
from vsrllm_jax.data.synthetic import grid_grammar
from vsrllm_jax.data.synthetic import mouth_renderer
from vsrllm_jax.data.synthetic import visemes as visemes_lib
from vsrllm_jax.data.synthetic.spec import SPLITS, SyntheticLipsSpec

_SPLIT_CODE = {split: i for i, split in enumerate(SPLITS)}


def default_data_dir() -> str:
  """``$VSRLLM_DATA_DIR``, else ``~/.cache/vsrllm_jax/tensorflow_datasets``."""
  env = os.environ.get("VSRLLM_DATA_DIR")
  if env:
    return env
  return str(pathlib.Path.home() / ".cache" / "vsrllm_jax" / "tensorflow_datasets")


def clip_rng(spec: SyntheticLipsSpec, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(
      [spec.generation_seed, _SPLIT_CODE[split], int(index)]))


def fit_durations(durations: np.ndarray, minimum: np.ndarray, max_frames: int) -> np.ndarray:
  """Shrinks the longest segments (first on ties) by one frame until they fit.

  Deterministic; raises only if even the minimum durations do not fit.
  """
  d = np.array(durations, np.int64)
  if int(minimum.sum()) > max_frames:
    raise ValueError(f"timeline needs at least {int(minimum.sum())} frames > max_frames="
                     f"{max_frames}")
  excess = int(d.sum()) - max_frames
  while excess > 0:
    slack = np.where(d > minimum, d, -1)
    d[int(np.argmax(slack))] -= 1
    excess -= 1
  return d


def sample_timeline(spec: SyntheticLipsSpec, words, rng: np.random.Generator):
  """Visemes (with silences) and their durations in frames for one clip."""
  seq = [visemes_lib.SILENCE]
  lo, hi = spec.viseme_frames
  durations = [int(rng.integers(*spec.edge_silence_frames, endpoint=True))]
  for i, word in enumerate(words):
    if i:
      seq.append(visemes_lib.SILENCE)
      durations.append(int(rng.integers(*spec.word_gap_frames, endpoint=True)))
    for v in visemes_lib.word_to_visemes(word):
      seq.append(v)
      durations.append(int(rng.integers(lo, hi, endpoint=True)))
  seq.append(visemes_lib.SILENCE)
  durations.append(int(rng.integers(*spec.edge_silence_frames, endpoint=True)))
  minimum = np.asarray([0 if v == visemes_lib.SILENCE else 1 for v in seq], np.int64)
  return seq, fit_durations(np.asarray(durations), minimum, spec.max_frames)


def frame_viseme_ids(seq, durations) -> np.ndarray:
  """Per-frame labels int32 [sum(durations)]: the ``VISEMES`` index of the segment
  holding each frame (silence included), for frame-level encoder pretraining.

  Zero-length segments own no frame, matching ``mouth_renderer.shape_track``.
  """
  ids = np.asarray([visemes_lib.VISEME_INDEX[v] for v in seq], np.int32)
  return np.repeat(ids, np.asarray(durations, np.int64))


@functools.lru_cache(maxsize=256)
def _speaker_style(spec: SyntheticLipsSpec, speaker: int) -> mouth_renderer.SpeakerStyle:
  return mouth_renderer.sample_speaker_style(spec, speaker)


def generate_clip(spec: SyntheticLipsSpec, split: str, index: int) -> dict:
  """One example (the builder's feature dict) as numpy / Python values."""
  rng = clip_rng(spec, split, index)
  speakers = spec.speakers(split)
  speaker = int(speakers[int(rng.integers(len(speakers)))])
  words = grid_grammar.sample_sentence(rng)
  seq, durations = sample_timeline(spec, words, rng)
  shapes = mouth_renderer.shape_track(seq, durations)  # [T, P]
  video = mouth_renderer.render_frames(shapes, _speaker_style(spec, speaker), spec, rng)
  return {
      "id": f"{split}/s{speaker:02d}/{index:06d}",
      "video": video,  # [T, S, S, 1] uint8
      "num_frames": np.int32(video.shape[0]),
      "text": " ".join(words),
      "speaker": np.int32(speaker),
      "viseme_ids": frame_viseme_ids(seq, durations),  # [T] int32
  }


@dataclasses.dataclass(eq=False, repr=False)
class SyntheticLipsConfig(tfds.core.BuilderConfig):
  """Builder config carrying the spec; its name embeds the spec fingerprint."""
  spec: SyntheticLipsSpec = dataclasses.field(default_factory=SyntheticLipsSpec)

  def __repr__(self):  # tfds logs the config; the full spec is too long for that
    return f"SyntheticLipsConfig(name={self.name!r})"


def config_name(spec: SyntheticLipsSpec) -> str:
  return f"s{spec.image_size}_f{spec.max_frames}_{spec.fingerprint()}"


class SyntheticLips(LocalBuilder, skip_registration=True):
  """Synthetic lip-reading clips; construct with ``SyntheticLips(spec=...)``.

  Not registered with tfds (importing this module twice must not clash);
  read a prepared copy with ``prepare`` or ``tfds.builder_from_directory``.
  """
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Per-frame viseme labels (viseme_ids)."}

  def __init__(self, *, spec: SyntheticLipsSpec | None = None,
               config: SyntheticLipsConfig | None = None, **kwargs):
    # tfds unpickles a builder (e.g. inside a grain worker) as __init__(config=...).
    if config is None:
      spec = spec or SyntheticLipsSpec()
      config = SyntheticLipsConfig(name=config_name(spec), version=self.VERSION, spec=spec,
                                   description="see SyntheticLipsSpec")
    elif spec is not None and spec != config.spec:
      raise ValueError("SyntheticLips got both spec and a config with another spec")
    super().__init__(config=config, **kwargs)

  @property
  def spec(self) -> SyntheticLipsSpec:
    return self.builder_config.spec

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.spec.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="GRID-style sentences rendered as grayscale mouth-shape videos.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            # Raw bytes: the default int64 list is ~8x slower to write and larger.
            "video": tfds.features.Tensor(shape=(None, s, s, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "num_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
            "text": tfds.features.Text(),
            "speaker": tfds.features.Tensor(shape=(), dtype=np.int32),
            # Index into visemes.VISEMES of each frame's segment (silence included).
            "viseme_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                               encoding=tfds.features.Encoding.BYTES),
        }),
        supervised_keys=None,
        disable_shuffling=True,  # record i of a split is clip i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    for index in range(self.spec.num_clips(split)):
      yield index, generate_clip(self.spec, split, index)


def prepare(spec: SyntheticLipsSpec, data_dir: str | os.PathLike | None = None):
  """The builder for ``spec`` under ``data_dir``, generated on first use (no network)."""
  builder = SyntheticLips(spec=spec, data_dir=str(data_dir or default_data_dir()))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
