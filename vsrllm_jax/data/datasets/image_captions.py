"""tfds builder ``image_captions``: a local folder of images + ``captions.jsonl``.

The folder (the builder's manual dir) holds the images and one manifest,
``captions.jsonl``, one JSON object per line::

  {"image": "relative/path.jpg", "caption": "...", "split": "train"}

``split`` is optional (default ``train``); several lines may share an image.
Each line becomes one record, in line order within its split (deterministic,
``disable_shuffling``): the image decoded with PIL (EXIF orientation applied),
converted to RGB, resized to ``image_size`` squared and stored as raw uint8
bytes, so grain reads it through ``tfds.data_sources`` without TensorFlow.
A missing or undecodable image and an empty caption are skipped, warned with
the file name and counted per split and kind in ``info.metadata['skipped']``
(also written next to the data). A malformed manifest line is an authoring
error and raises, naming the file and line. The config name carries a
fingerprint of the manifest and the preprocessing, so a changed manifest or
size never reuses stale files (changed image bytes under an unchanged
manifest are not detected: rebuild into a new data_dir then).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from vsrllm_jax.data.datasets.base import LocalBuilder
from vsrllm_jax.data.synthetic.synthetic_lips import default_data_dir

MANIFEST = "captions.jsonl"
SPLITS = ("train", "validation", "test")
RESIZE_MODES = ("center_crop", "squash")
SKIP_KINDS = ("missing_image", "corrupt_image", "empty_caption")
_log = logging.getLogger(__name__)


def resize_image(image: Image.Image, size: int, mode: str) -> np.ndarray:
  """An RGB PIL image -> uint8 [size, size, 3] (bicubic).

  ``center_crop`` (CLIP): scale the short side to ``size``, crop the centre.
  ``squash`` (SigLIP): scale both sides to ``size``, ignoring aspect ratio.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode {mode!r}; expected one of {RESIZE_MODES}")
  w, h = image.size
  if mode == "squash":
    out = image.resize((size, size), Image.Resampling.BICUBIC)
  else:
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    out = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    out = out.crop((left, top, left + size, top + size))
  return np.asarray(out, np.uint8).reshape(size, size, 3)


def load_image(path: pathlib.Path) -> Image.Image:
  """Decodes ``path`` fully (truncated files fail here) and converts it to RGB."""
  with Image.open(path) as im:
    im.load()
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  line: int      # 1-based line number in captions.jsonl
  image: str     # path relative to the manual dir
  caption: str   # stripped
  split: str


def read_manifest(manual_dir: str | os.PathLike) -> list[ManifestEntry]:
  """Every non-blank line of ``manual_dir/captions.jsonl``; malformed lines raise."""
  path = pathlib.Path(manual_dir) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: expected a folder of images with a {MANIFEST} "
                            'of lines {"image": "rel/path.jpg", "caption": "...", "split": ...}')
  out = []
  with open(path, encoding="utf-8") as f:
    for n, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(raw)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
        raise ValueError(f"{where}: expected an object with a non-empty string 'image', got "
                         f"{raw.strip()[:200]}")
      if pathlib.PurePath(row["image"]).is_absolute():
        raise ValueError(f"{where}: 'image' = {row['image']!r} must be relative to {path.parent}")
      caption = row.get("caption", "")
      if not isinstance(caption, str):
        raise ValueError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
      split = row.get("split", "train")
      if split not in SPLITS:
        raise ValueError(f"{where}: 'split' = {split!r}; expected one of {SPLITS}")
      out.append(ManifestEntry(n, row["image"], caption.strip(), split))
  return out


def fingerprint(manual_dir: str | os.PathLike, image_size: int, resize_mode: str) -> str:
  """Hash of the manifest bytes and the preprocessing (not of the folder's path)."""
  h = hashlib.sha256(f"{image_size}|{resize_mode}|".encode())
  h.update((pathlib.Path(manual_dir) / MANIFEST).read_bytes())
  return h.hexdigest()[:12]


def config_name(manual_dir, image_size: int, resize_mode: str) -> str:
  return f"s{image_size}_{resize_mode}_{fingerprint(manual_dir, image_size, resize_mode)}"


@dataclasses.dataclass(eq=False, repr=False)
class ImageCaptionsConfig(tfds.core.BuilderConfig):
  """Where the folder is and how images are sized; the name embeds a fingerprint."""
  manual_dir: str = ""
  image_size: int = 224
  resize_mode: str = "center_crop"

  def __repr__(self):
    return f"ImageCaptionsConfig(name={self.name!r})"


class ImageCaptions(LocalBuilder, skip_registration=True):
  """Image-caption pairs from a local folder; ``ImageCaptions(manual_dir=..., image_size=...)``.

  Not registered with tfds; prepare with ``prepare`` and read with
  ``as_data_source`` (or ``tfds.builder_from_directory``).
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"A folder of images with a {MANIFEST}; pass it as "
                                  "ImageCaptions(manual_dir=...).")

  def __init__(self, *, manual_dir: str | os.PathLike | None = None, image_size: int = 224,
               resize_mode: str = "center_crop", config: ImageCaptionsConfig | None = None,
               **kwargs):
    # tfds unpickles a builder (e.g. inside a grain worker) as __init__(config=...).
    if config is None:
      if manual_dir is None:
        raise ValueError("ImageCaptions needs manual_dir (the folder holding captions.jsonl)")
      if resize_mode not in RESIZE_MODES:
        raise ValueError(f"ImageCaptions: resize_mode={resize_mode!r}; expected one of "
                         f"{RESIZE_MODES}")
      if int(image_size) < 1:
        raise ValueError(f"ImageCaptions: image_size={image_size!r}; expected a positive int")
      manual_dir = str(pathlib.Path(manual_dir).resolve())
      config = ImageCaptionsConfig(
          name=config_name(manual_dir, int(image_size), resize_mode), version=self.VERSION,
          manual_dir=manual_dir, image_size=int(image_size), resize_mode=resize_mode,
          description=f"images from {manual_dir}")
    super().__init__(config=config, **kwargs)
    self._skipped: dict[str, dict[str, int]] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Image-caption pairs read from a local folder (captions.jsonl).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),        # "<image path>#<manifest line>"
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "caption": tfds.features.Text(),
            "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (h, w)
        }),
        supervised_keys=None,
        disable_shuffling=True,  # record i of a split is its i-th kept manifest line
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local: the folder is in the config
    entries = read_manifest(self.builder_config.manual_dir)
    splits = [s for s in SPLITS if any(e.split == s for e in entries)]
    if not splits:
      raise ValueError(f"{pathlib.Path(self.builder_config.manual_dir) / MANIFEST}: no examples")
    self.info.metadata["skipped"] = self._skipped
    return {s: self._generate_examples(s, [e for e in entries if e.split == s]) for s in splits}

  def _generate_examples(self, split: str, entries: list[ManifestEntry]):
    cfg = self.builder_config
    counts = self._skipped.setdefault(split, {k: 0 for k in SKIP_KINDS})
    root = pathlib.Path(cfg.manual_dir)
    kept = 0
    for e in entries:
      example = _example(root, e, cfg.image_size, cfg.resize_mode)
      if isinstance(example, str):  # a skip kind
        counts[example] += 1
        continue
      kept += 1
      yield e.line, example
    if not kept:  # tfds cannot write an empty split; say why instead of its assertion
      raise ValueError(f"{root / MANIFEST}: every one of the {len(entries)} lines of split "
                       f"{split!r} was skipped ({counts}); fix them or drop the split")


def _example(root: pathlib.Path, e: ManifestEntry, size: int, mode: str) -> dict | str:
  """One record, or the kind of skip (warned with the file name)."""
  path = root / e.image
  where = f"{root / MANIFEST}:{e.line}"
  if not e.caption:
    _log.warning("%s: skipping %s: empty caption", where, path)
    return "empty_caption"
  if not path.is_file():
    _log.warning("%s: skipping %s: image file not found", where, path)
    return "missing_image"
  try:
    image = load_image(path)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    _log.warning("%s: skipping %s: cannot decode image (%s)", where, path, err)
    return "corrupt_image"
  return {"id": f"{e.image}#{e.line}", "image": resize_image(image, size, mode),
          "caption": e.caption,
          "original_size": np.asarray([image.height, image.width], np.int32)}


def prepare(manual_dir: str | os.PathLike, image_size: int, resize_mode: str = "center_crop",
            data_dir: str | os.PathLike | None = None) -> ImageCaptions:
  """The builder for this folder and size under ``data_dir`` (default: as synthetic_lips),
  generated on first use (no network)."""
  builder = ImageCaptions(manual_dir=manual_dir, image_size=image_size, resize_mode=resize_mode,
                          data_dir=str(data_dir or default_data_dir()))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def skip_counts(builder: ImageCaptions) -> dict[str, dict[str, int]]:
  """{split: {kind: count}} of the prepared data (also after a reload from disk)."""
  return {s: dict(c) for s, c in builder.info.metadata.get("skipped", {}).items()}
