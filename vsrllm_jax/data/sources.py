"""``config.data.name`` -> the random-access records of a split, prepared on first use.

  synthetic_lips  generated GRID mouth videos (``synthetic.synthetic_lips``)
  lrs3            VSP-LLM / AV-HuBERT manifests with mp4 mouth crops
                  (``datasets.lrs3``, built from ``data.manifest_dir``)
  image_captions  a folder of images + captions.jsonl (``datasets.image_captions``,
                  built from ``data.manifest_dir``)

Every source yields dict records with ``id`` and ``text`` plus ``video``
uint8 [T, S, S, 1] (``image`` uint8 [S, S, 3] for images); LRS3 records also
carry ``task`` and ``cluster_counts``. A record whose bytes cannot be decoded
raises on read, which the pipeline turns into a skipped, counted record.
Sources of clips expose ``lengths`` (frames per record) so the sampler can
bucket clips without decoding them. ``fingerprint`` names a split's data for
the feature cache: a changed manifest, spec or preprocessing never reuses
stale features.
"""
from __future__ import annotations

import functools
import os

import grain.python as grain
import numpy as np

from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.data.synthetic.spec import spec_from_config

NAMES = ("synthetic_lips", "lrs3", "image_captions")


def data_dir(data_cfg) -> str:
  return str(data_cfg.data_dir or synthetic_lips.default_data_dir())


def _check_name(data_cfg) -> str:
  if data_cfg.name not in NAMES:
    raise ValueError(f"config data.name={data_cfg.name!r} is not known; valid: {list(NAMES)}")
  if data_cfg.name != "synthetic_lips" and not data_cfg.get("manifest_dir"):
    raise ValueError(f"config data.name={data_cfg.name!r} reads a local folder: set "
                     "data.manifest_dir (nothing is downloaded)")
  return data_cfg.name


def _lrs3_options(data_cfg):
  from vsrllm_jax.data.datasets import lrs3  # pylint: disable=g-import-not-at-top
  return lrs3.Lrs3ManifestOptions(
      manual_dir=data_cfg.manifest_dir, storage=data_cfg.get("storage", "mp4"),
      image_size=int(data_cfg.get("source_image_size", 96)),
      max_bad_fraction=float(data_cfg.get("max_bad_fraction", 0.01)))


@functools.lru_cache(maxsize=8)
def _prepared(name: str, key, directory: str):
  """The prepared tfds builder of data set ``name`` (``key``: its hashable options)."""
  if name == "synthetic_lips":
    return synthetic_lips.prepare(key, directory)
  if name == "lrs3":
    from vsrllm_jax.data.datasets import lrs3  # pylint: disable=g-import-not-at-top
    return lrs3.prepare(key, directory)
  from vsrllm_jax.data.datasets import image_captions  # pylint: disable=g-import-not-at-top
  manual_dir, size, mode = key
  return image_captions.prepare(manual_dir, size, mode, data_dir=directory)


def _key(data_cfg):
  name = _check_name(data_cfg)
  if name == "synthetic_lips":
    return spec_from_config(data_cfg)
  if name == "lrs3":
    return _lrs3_options(data_cfg)
  return (os.path.abspath(data_cfg.manifest_dir), int(data_cfg.image_size),
          data_cfg.get("resize_mode", "center_crop"))


def builder(data_cfg):
  return _prepared(data_cfg.name, _key(data_cfg), data_dir(data_cfg))


def fingerprint(data_cfg) -> str:
  """Names the prepared data (its tfds config name carries the content fingerprint)."""
  return f"{data_cfg.name}/{builder(data_cfg).builder_config.name}"


def data_source(data_cfg, split: str):
  """Random-access records of ``split`` (``train``, ``validation`` or ``test``)."""
  b = builder(data_cfg)
  if split not in b.info.splits:
    raise ValueError(f"data set {fingerprint(data_cfg)} has no split {split!r}; it has "
                     f"{sorted(b.info.splits)} (see its manifest)")
  source = b.as_data_source(split=split)
  if data_cfg.name == "lrs3":
    return ClipSource(source, os.path.join(os.fspath(b.data_dir), f"lengths-{split}.npy"))
  if data_cfg.name == "image_captions":
    return ImageSource(source)
  return source


def split_size(data_cfg, split: str) -> int:
  return len(data_source(data_cfg, split))


class ClipSource(grain.RandomAccessDataSource):
  """LRS3 records with ``video`` decoded from mp4 on read, and known ``lengths``.

  The lengths (``num_frames`` of every record) are read once and kept next to
  the prepared data, written atomically.
  """

  def __init__(self, source, lengths_file: str):
    self._source = source
    self._lengths_file = lengths_file

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:  # grain checks the source of a restored state by its repr
    return f"ClipSource({self._source!r})"

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    if os.path.exists(self._lengths_file):
      return np.load(self._lengths_file)
    lengths = np.asarray([int(self._source[i]["num_frames"]) for i in range(len(self))],
                         np.int32)
    tmp = self._lengths_file + f".tmp{os.getpid()}.npy"
    np.save(tmp, lengths)
    os.replace(tmp, self._lengths_file)
    return lengths

  def __getitem__(self, index: int) -> dict:
    from vsrllm_jax.data.datasets import lrs3  # pylint: disable=g-import-not-at-top
    return lrs3.decode_record(self._source[index])


class ImageSource(grain.RandomAccessDataSource):
  """Image-caption records as one-frame RGB clips: ``video`` [1, S, S, 3], ``text``."""

  def __init__(self, source):
    self._source = source
    self.lengths = np.ones((len(source),), np.int32)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f"ImageSource({self._source!r})"

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    image = np.asarray(record["image"], np.uint8)
    return dict(id=record["id"], text=record["caption"], video=image[None], num_frames=1)
