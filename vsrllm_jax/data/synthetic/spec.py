"""SyntheticLipsSpec: the one place that sets how hard the synthetic data is.

Every knob that changes the generated clips lives here, so a run's data is
fully described by its spec and ``spec.fingerprint()`` names it on disk: a
changed knob (or renderer version) never reuses stale data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from vsrllm_jax.data.synthetic import grid_grammar
from vsrllm_jax.data.synthetic import visemes as visemes_lib

# Bump when the generation code changes its output for an unchanged spec.
GENERATOR_VERSION = 2  # 2: per-frame viseme_ids

SPLITS = ("train", "validation", "test")

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class SyntheticLipsSpec:
  """Knobs of the synthetic lip-reading data (GRID sentences as mouth videos).

  Sizes and splits:
    image_size: frames are square, this many pixels per side (grayscale).
    max_frames: upper bound on a clip's length; a sampled timeline that is too
      long is shrunk (longest segments first), never cropped or rejected.
    fps: nominal frame rate; the duration knobs below are in frames at it.
    train_clips / validation_clips / test_clips: clips per split.
    generation_seed: with (split, index) it seeds each clip independently.
    *_speakers: speaker ids per split. Validation and test speakers are
      disjoint from train and from each other, so test measures unseen
      speakers (appearance is a function of (generation_seed, speaker id)).

  Per-speaker appearance (sampled once per speaker, uniform in the range):
    mouth_scale_range: mouth size relative to the default (0.5 * image width).
    center_offset: max shift of the mouth centre, fraction of image size.
    lip_thickness_range: lip ring thickness, fraction of image size.
    skin/lip/inner/teeth/tongue_brightness_range: gray levels 0..255.
    articulation_range: gain on mouth opening (mumblers vs. clear speakers).
    speaker_noise_std_range: extra gaussian pixel noise std of the speaker's
      recordings (camera quality), added to pixel_noise_std.

  Timing (sampled per occurrence, inclusive integer ranges, in frames):
    viseme_frames: frames a speech viseme is held; shapes are interpolated
      between viseme centres (coarticulation), so 1-frame visemes may barely
      reach their target shape.
    word_gap_frames: silence between words (0 means none for that gap).
    edge_silence_frames: silence before the first and after the last word.

  Per-frame nuisance:
    pixel_noise_std: gaussian pixel noise std for every speaker.
    frame_jitter_px: std of the mouth centre's frame-to-frame jitter (head
      motion / tracking error), pixels.
    frame_scale_jitter: std of relative mouth-size jitter per frame.
    frame_brightness_jitter: std of global brightness flicker per frame.
  """
  image_size: int = 32
  max_frames: int = 64
  fps: int = 25
  train_clips: int = 2000
  validation_clips: int = 200
  test_clips: int = 200
  generation_seed: int = 0
  train_speakers: tuple[int, ...] = tuple(range(0, 20))
  validation_speakers: tuple[int, ...] = tuple(range(20, 24))
  test_speakers: tuple[int, ...] = tuple(range(24, 30))

  mouth_scale_range: Range = (0.8, 1.15)
  center_offset: float = 0.06
  lip_thickness_range: Range = (0.06, 0.11)
  skin_brightness_range: Range = (150.0, 210.0)
  lip_brightness_range: Range = (80.0, 125.0)
  inner_brightness_range: Range = (15.0, 45.0)
  teeth_brightness_range: Range = (200.0, 240.0)
  tongue_brightness_range: Range = (110.0, 150.0)
  articulation_range: Range = (0.8, 1.15)
  speaker_noise_std_range: Range = (0.0, 5.0)

  viseme_frames: tuple[int, int] = (1, 3)
  word_gap_frames: tuple[int, int] = (0, 2)
  edge_silence_frames: tuple[int, int] = (1, 4)

  pixel_noise_std: float = 3.0
  frame_jitter_px: float = 0.35
  frame_scale_jitter: float = 0.02
  frame_brightness_jitter: float = 2.0

  def __post_init__(self):
    if self.image_size < 8:
      raise ValueError(f"SyntheticLipsSpec.image_size must be >= 8, got {self.image_size}")
    needed = max_speech_visemes()
    if self.max_frames < needed:
      raise ValueError(f"SyntheticLipsSpec.max_frames={self.max_frames} is too short: the "
                       f"longest GRID sentence needs {needed} frames (one per viseme)")
    for split in SPLITS:
      if self.num_clips(split) < 0:
        raise ValueError(f"SyntheticLipsSpec.{split}_clips must be >= 0")
      if not self.speakers(split):
        raise ValueError(f"SyntheticLipsSpec.{split}_speakers is empty")
    groups = [set(self.speakers(s)) for s in SPLITS]
    if groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]:
      raise ValueError("SyntheticLipsSpec: train, validation and test speakers must be "
                       f"disjoint, got {[sorted(g) for g in groups]}")
    for name in ("viseme_frames", "word_gap_frames", "edge_silence_frames"):
      lo, hi = getattr(self, name)
      if not 0 <= lo <= hi or (name == "viseme_frames" and lo < 1):
        raise ValueError(f"SyntheticLipsSpec.{name}={(lo, hi)} is not a valid frame range")

  def num_clips(self, split: str) -> int:
    return getattr(self, f"{_check_split(split)}_clips")

  def speakers(self, split: str) -> tuple[int, ...]:
    return getattr(self, f"{_check_split(split)}_speakers")

  def fingerprint(self) -> str:
    """Short stable hash of every field and the generator version."""
    fields = dataclasses.asdict(self)
    fields["_generator_version"] = GENERATOR_VERSION
    blob = json.dumps(fields, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
  return split


def max_speech_visemes() -> int:
  """Visemes of the longest grammatical sentence (lower bound on max_frames)."""
  return sum(max(len(visemes_lib.word_to_visemes(w)) for w in grid_grammar.SLOT_WORDS[s])
             for s in grid_grammar.SLOT_NAMES)


def spec_from_config(data_cfg) -> SyntheticLipsSpec:
  """Spec from ``config.data``; knobs the config does not name keep their defaults."""
  return SyntheticLipsSpec(
      image_size=int(data_cfg.image_size),
      max_frames=int(data_cfg.max_frames),
      train_clips=int(data_cfg.train_clips),
      validation_clips=int(data_cfg.validation_clips),
      test_clips=int(data_cfg.test_clips),
      generation_seed=int(data_cfg.generation_seed),
  )
