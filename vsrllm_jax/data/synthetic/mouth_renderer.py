"""Draws grayscale mouth videos from viseme timelines (vectorised numpy).

A frame is a face-coloured background with the lips as an elliptic ring; the
opening is dark, with an upper-teeth band and a tongue blob when the viseme
shows them. Shapes are interpolated between viseme centres (coarticulation),
speakers differ in size, position, lip thickness and brightness, and every
frame gets small jitter and gaussian noise. Deterministic given the rng.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from vsrllm_jax.data.synthetic import visemes as visemes_lib
from vsrllm_jax.data.synthetic.spec import SyntheticLipsSpec

_SPEAKER_STREAM = 0x5BEA  # separates speaker rngs from clip rngs of the same seed


@dataclasses.dataclass(frozen=True)
class SpeakerStyle:
  """Appearance of one speaker; sizes are fractions of the image size."""
  mouth_scale: float
  center_dx: float
  center_dy: float
  lip_thickness: float
  skin: float
  lip: float
  inner: float
  teeth: float
  tongue: float
  articulation: float
  noise_std: float


def sample_speaker_style(spec: SyntheticLipsSpec, speaker_id: int) -> SpeakerStyle:
  """The fixed appearance of ``speaker_id`` under ``spec.generation_seed``."""
  rng = np.random.default_rng(np.random.SeedSequence(
      [spec.generation_seed, _SPEAKER_STREAM, int(speaker_id)]))
  u = lambda r: float(rng.uniform(*r))
  return SpeakerStyle(
      mouth_scale=u(spec.mouth_scale_range),
      center_dx=u((-spec.center_offset, spec.center_offset)),
      center_dy=u((-spec.center_offset, spec.center_offset)),
      lip_thickness=u(spec.lip_thickness_range),
      skin=u(spec.skin_brightness_range),
      lip=u(spec.lip_brightness_range),
      inner=u(spec.inner_brightness_range),
      teeth=u(spec.teeth_brightness_range),
      tongue=u(spec.tongue_brightness_range),
      articulation=u(spec.articulation_range),
      noise_std=spec.pixel_noise_std + u(spec.speaker_noise_std_range),
  )


def shape_track(visemes, durations) -> np.ndarray:
  """Per-frame mouth shapes, float32 [sum(durations), P].

  Each viseme is a keyframe at the centre of its segment; frames in between
  interpolate linearly (coarticulation). Zero-length segments are skipped.
  """
  durations = np.asarray(durations, np.int64)
  if len(durations) != len(visemes):
    raise ValueError(f"{len(visemes)} visemes but {len(durations)} durations")
  keep = durations > 0
  shapes = visemes_lib.shapes_of([v for v, k in zip(visemes, keep) if k])  # [K, P]
  d = durations[keep]
  centres = np.cumsum(d) - d + (d - 1) / 2.0  # [K]
  t = np.arange(int(d.sum()), dtype=np.float64)
  return np.stack([np.interp(t, centres, shapes[:, p]) for p in range(shapes.shape[1])],
                  axis=1).astype(np.float32)


def _ellipse_alpha(dx, dy, a, b):
  """Soft (anti-aliased) coverage of an axis-aligned ellipse, in [0, 1]."""
  a = np.maximum(a, 1e-3)
  b = np.maximum(b, 1e-3)
  r = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
  m = np.minimum(a, b)
  return np.clip(0.5 + (1.0 - r) * m, 0.0, 1.0) * np.clip(2.0 * m, 0.0, 1.0)


def render_frames(shapes: np.ndarray, style: SpeakerStyle, spec: SyntheticLipsSpec,
                  rng: np.random.Generator) -> np.ndarray:
  """Renders shapes [T, P] as uint8 frames [T, S, S, 1] (S = spec.image_size)."""
  s = spec.image_size
  t_len = shapes.shape[0]
  col = lambda x: np.asarray(x, np.float32).reshape(-1, 1, 1)  # [T] -> [T, 1, 1]
  openness, width, rounding, teeth, tongue = (col(shapes[:, i]) for i in range(5))

  # Per-frame nuisance: centre jitter, scale jitter, brightness flicker.
  jitter = rng.normal(0.0, spec.frame_jitter_px, size=(2, t_len)).astype(np.float32)
  scale = style.mouth_scale * (1.0 + spec.frame_scale_jitter
                               * rng.standard_normal(t_len).astype(np.float32))
  flicker = col(spec.frame_brightness_jitter * rng.standard_normal(t_len))
  cx = col(s * (0.5 + style.center_dx) + jitter[0])
  cy = col(s * (0.56 + style.center_dy) + jitter[1])
  scale = col(scale)

  # Geometry in pixels, all [T, 1, 1].
  half_w = s * 0.3 * scale * (0.7 + 0.6 * width)
  thick = s * style.lip_thickness * scale * (1.0 + 0.5 * rounding)
  open_h = s * 0.19 * scale * np.clip(openness * style.articulation, 0.0, 1.2)
  inner_w = np.maximum(half_w * (1.0 - 0.4 * rounding) - 0.35 * thick, 0.5)

  ys, xs = np.meshgrid(np.arange(s, dtype=np.float32) + 0.5,
                       np.arange(s, dtype=np.float32) + 0.5, indexing="ij")
  dx = xs[None] - cx  # [T, S, S]
  dy = ys[None] - cy
  lips = _ellipse_alpha(dx, dy, half_w, open_h + thick)
  mouth = _ellipse_alpha(dx, dy, inner_w, open_h)
  # Upper teeth: a band hanging from the top of the opening.
  teeth_edge = -open_h + teeth * np.maximum(open_h, 0.6) * 0.9
  teeth_a = mouth * np.clip(teeth_edge - dy + 0.5, 0.0, 1.0) * np.clip(teeth * 2.0, 0.0, 1.0)
  tongue_a = mouth * _ellipse_alpha(dx, dy - 0.55 * open_h, 0.6 * inner_w,
                                    0.45 * open_h * tongue)
  # Lips pressed together leave a faint dark seam.
  seam = lips * np.clip(1.0 - np.abs(dy) * 1.5, 0.0, 1.0) * np.clip(1.0 - open_h, 0.0, 1.0) \
      * np.clip(1.0 - (dx / np.maximum(inner_w, 1e-3)) ** 2, 0.0, 1.0)

  img = style.skin + 14.0 * (0.5 - ys[None] / s) + flicker  # shading: darker chin
  lip_level = style.lip + 18.0 * rounding  # protruding lips catch light
  img = img + lips * (lip_level - img)
  img = img - 25.0 * seam
  img = img + mouth * (style.inner - img)
  img = img + tongue_a * (style.tongue - img)
  img = img + teeth_a * (style.teeth - img)
  img = img + rng.standard_normal(img.shape, dtype=np.float32) * style.noise_std
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)[..., None]
