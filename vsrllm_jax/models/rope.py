"""Rotary position embeddings, Llama style (rotate-half over the head dim).

Matches transformers' Llama: the head dim is split in two halves that rotate
as pairs ``(x[i], x[i + D/2])`` with frequency ``inv_freq[i]``. Frequencies are
computed in float32 the same way transformers does, so positions in the
thousands still agree to float32 rounding.

``rope_scaling`` (a dict, or a tuple of ``(key, value)`` pairs so that it can
live in a hashable config) selects the frequency schedule: ``None`` /
'default', 'linear' (positions divided by ``factor``) or 'llama3' (Llama 3.1
wavelength-dependent interpolation). Other types raise NotImplementedError.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

RopeScaling = Mapping[str, Any] | tuple[tuple[str, Any], ...] | None


def rope_type(rope_scaling: RopeScaling) -> str:
  """The schedule name of a rope_scaling dict ('default' when None)."""
  if not rope_scaling:
    return "default"
  scaling = dict(rope_scaling)
  return str(scaling.get("rope_type", scaling.get("type", "default")))


def from_hf_config(hf: Mapping[str, Any], bad: Callable[[str, str], None]
                   ) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling dict or None) from a transformers config.json dict.

  transformers>=5 writes ``rope_parameters`` (theta inside); older files
  ``rope_theta`` + ``rope_scaling``. ``bad(field, why)`` raises for what we
  do not implement (other schedules, partial rotary, per-layer-type rope).
  """
  params = dict(hf.get("rope_parameters") or {})
  field = "rope_parameters" if params else "rope_scaling"
  if not params:
    params = dict(hf.get("rope_scaling") or {})
  if any(isinstance(v, Mapping) for v in params.values()):
    bad(field, "per-layer-type rope parameters (Gemma 3 style) are not implemented")
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rope_type(params)
  if kind not in SUPPORTED_ROPE_TYPES:
    bad(field, f"rope type {kind!r}; supported: {SUPPORTED_ROPE_TYPES}")
  if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
    bad(field, "partial_rotary_factor must be 1 (rotary over the whole head)")
  if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
    bad("partial_rotary_factor", "must be 1 (rotary over the whole head)")
  if kind == "llama3" and "original_max_position_embeddings" not in params:
    params["original_max_position_embeddings"] = hf["max_position_embeddings"]
  params.pop("type", None)
  params.pop("partial_rotary_factor", None)
  return theta, (None if kind == "default" else dict(params, rope_type=kind))


def inverse_frequencies(head_dim: int, theta: float,
                        rope_scaling: RopeScaling = None) -> np.ndarray:
  """float32 [D/2] inverse frequencies of the schedule named by ``rope_scaling``."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim)))).astype(np.float32)
  kind = rope_type(rope_scaling)
  scaling = dict(rope_scaling or {})
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)
  raise NotImplementedError(
      f"rope_scaling type {kind!r} is not implemented (supported: {SUPPORTED_ROPE_TYPES})")


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 rope_scaling: RopeScaling = None) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [B, S, D] (float32) for integer ``positions`` [B, S]."""
  inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta, rope_scaling))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, S, D]
  return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies precomputed cos/sin, broadcastable against x [..., D] (e.g. x [B, S, H, D]
  with cos [B, S, 1, D]), to x rotated along its last axis. Result in x.dtype."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               rope_scaling: RopeScaling = None) -> jax.Array:
  """Rotates x [B, S, H, D] by integer positions [B, S]."""
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta, rope_scaling)
  return rotate(x, cos[:, :, None], sin[:, :, None])
