"""AV-HuBERT's image preprocessing of mouth crops, in numpy.

Evaluation: center crop 88x88 of the 96x96 crops, then ``x / 255`` normalised
with the dataset mean/std. Training: a random 88x88 crop (one offset per clip)
and a horizontal flip of the whole clip with probability 0.5 instead of the
center crop (AV-HuBERT's ``image_aug``). Frames are [T, H, W] or [T, H, W, C];
every random draw comes from the ``np.random.Generator`` passed in, so the
output is a function of (frames, rng state).

Optional time masking (off by default), with fairseq's span-masking rule
(``compute_mask_indices``, static lengths): the clip gets
``n = floor(mask_prob * T / L + u)`` spans of ``L = min(mask_span, T)``
frames, u ~ U[0, 1); their starts are drawn without replacement from
[0, T - L] (n capped at T - L + 1), spans may overlap, and every frame inside
a span is replaced by the fill value: the dataset mean gray level
(``round(PIXEL_MEAN * 255)`` = 107) for uint8 input, 0.0 for normalised float
input -- the same gray either way. AV-HuBERT masks its features, not pixels;
masking pixels the same way keeps the data side independent of the model.
"""
from __future__ import annotations

import numpy as np

from vsrllm_jax.models.encoders.video_encoder import PIXEL_MEAN, PIXEL_STD

CROP_SIZE = 88
MEAN_GRAY = int(round(PIXEL_MEAN * 255))


def _check(frames, crop_size: int) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim not in (3, 4):
    raise ValueError(f"expected frames [T, H, W] or [T, H, W, C], got shape {frames.shape}")
  height, width = frames.shape[1:3]
  if not 0 < crop_size <= min(height, width):
    raise ValueError(f"crop_size={crop_size} does not fit frames of {height}x{width}")
  return frames


def center_crop(frames, crop_size: int = CROP_SIZE) -> np.ndarray:
  """The central crop_size x crop_size window (top/left offset (size - crop) // 2)."""
  frames = _check(frames, crop_size)
  top = (frames.shape[1] - crop_size) // 2
  left = (frames.shape[2] - crop_size) // 2
  return frames[:, top:top + crop_size, left:left + crop_size]


def random_crop(frames, rng: np.random.Generator, crop_size: int = CROP_SIZE) -> np.ndarray:
  """One crop window for the whole clip, top/left uniform in [0, size - crop]."""
  frames = _check(frames, crop_size)
  top = int(rng.integers(0, frames.shape[1] - crop_size, endpoint=True))
  left = int(rng.integers(0, frames.shape[2] - crop_size, endpoint=True))
  return frames[:, top:top + crop_size, left:left + crop_size]


def horizontal_flip(frames, rng: np.random.Generator, prob: float = 0.5) -> np.ndarray:
  """Mirrors every frame left-right with probability ``prob`` (one draw per clip)."""
  frames = np.asarray(frames)
  return frames[:, :, ::-1] if rng.random() < prob else frames


def normalize(frames) -> np.ndarray:
  """float32 ``(x / 255 - PIXEL_MEAN) / PIXEL_STD`` (the video encoder's own constants)."""
  return ((np.asarray(frames, np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


def time_mask(frames, rng: np.random.Generator, *, mask_prob: float, mask_span: int = 10,
              fill=None) -> tuple[np.ndarray, np.ndarray]:
  """(masked copy of frames, bool [T] of masked frames); rule in the module docstring."""
  frames = np.asarray(frames)
  if not 0.0 <= mask_prob <= 1.0 or mask_span < 1:
    raise ValueError(f"time mask needs 0 <= mask_prob <= 1 and mask_span >= 1, got "
                     f"mask_prob={mask_prob}, mask_span={mask_span}")
  if fill is None:
    fill = MEAN_GRAY if frames.dtype == np.uint8 else 0.0
  length = frames.shape[0]
  span = min(int(mask_span), length)
  count = int(mask_prob * length / span + rng.random())
  count = min(count, length - span + 1)
  mask = np.zeros((length,), bool)
  for start in rng.choice(length - span + 1, size=count, replace=False):
    mask[start:start + span] = True
  out = frames.copy()
  out[mask] = fill
  return out, mask


def crop_and_flip(frames, rng: np.random.Generator | None = None, *, train: bool,
                  crop_size: int = CROP_SIZE, flip_prob: float = 0.5) -> np.ndarray:
  """Train: random crop + flip; eval: center crop. Keeps the dtype (uint8 stays uint8)."""
  if not train:
    return center_crop(frames, crop_size)
  if rng is None:
    raise ValueError("training augmentation needs an rng (np.random.Generator)")
  return horizontal_flip(random_crop(frames, rng, crop_size), rng, flip_prob)


def preprocess(frames, rng: np.random.Generator | None = None, *, train: bool,
               crop_size: int = CROP_SIZE, flip_prob: float = 0.5, mask_prob: float = 0.0,
               mask_span: int = 10) -> np.ndarray:
  """AV-HuBERT's full transform: crop (+ flip), normalise, then optional time mask.

  Returns float32 [T, crop, crop(, C)]. Draw order from ``rng``: crop top,
  crop left, flip, then the mask (only when ``mask_prob`` > 0).
  """
  out = normalize(crop_and_flip(frames, rng, train=train, crop_size=crop_size,
                                flip_prob=flip_prob))
  if mask_prob > 0:
    if rng is None:
      raise ValueError("time masking needs an rng (np.random.Generator)")
    out, _ = time_mask(out, rng, mask_prob=mask_prob, mask_span=mask_span)
  return out
