"""ViT image towers (CLIP and SigLIP vision models) in linen, as frozen image encoders.

The image-side counterpart of ``video_encoder.py``: ``VisionTower`` reads
uint8 (or [0, 1] float) RGB images, normalises them with the checkpoint's
pixel mean/std, and returns patch features ``[B, N, D]`` with a mask. The math
follows transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` exactly
(``hf_vision.from_pretrained_vision`` loads their weights).

What "features" are: Hugging Face's ``hidden_states[feature_layer]`` (index 0
is the embedding output, after CLIP's pre-layernorm; index L the last layer),
which is what VLMs feed their projector (LLaVA: CLIP ``feature_layer=-2`` with
``drop_cls=True``). ``post_layernorm`` applies the tower's final LayerNorm to
them: SigLIP's ``last_hidden_state`` is exactly that at layer -1, so it is on
by default for SigLIP at the last layer; CLIP applies its post-layernorm only
to the pooled class token, so it is off by default there. Only the layers up
to ``feature_layer`` are built (and loaded): ``-2`` skips the last layer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers

KINDS = ("clip", "siglip")
_MODEL_TYPES = {"clip_vision_model": "clip", "clip": "clip",
                "siglip_vision_model": "siglip", "siglip": "siglip"}
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
}
RESIZE_MODES = ("center_crop", "squash")
# transformers' defaults for fields a config.json may leave out (SigLIP hub
# configs often hold only model_type and patch_size).
_HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
# The processors' pixel statistics (OpenAI CLIP; SigLIP maps [0, 1] to [-1, 1]).
PIXEL_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# How images reach image_size: CLIP resizes the short side and centre-crops,
# SigLIP resizes to the square directly.
DEFAULT_RESIZE = {"clip": "center_crop", "siglip": "squash"}


@dataclasses.dataclass(frozen=True)
class VisionTowerConfig:
  """Shape, feature choice and numerics of a vision tower; hashable (jit static)."""
  kind: str
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  feature_layer: int = -1          # index into HF hidden_states (0: embeddings, L: last layer)
  drop_cls: bool = False           # CLIP only: drop the class token from the features
  post_layernorm: bool | None = None  # None: True for SigLIP at the last layer, else False
  image_mean: tuple[float, ...] | None = None  # None: the family's (PIXEL_STATS)
  image_std: tuple[float, ...] | None = None
  resize_mode: str | None = None    # for the data pipeline; None: the family's (DEFAULT_RESIZE)
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f"VisionTowerConfig.{field}={getattr(self, field)!r}: expected {expected}")

    if self.kind not in KINDS:
      bad("kind", f"one of {KINDS}")
    if self.hidden_act not in ACTIVATIONS:
      bad("hidden_act", f"one of {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      bad("hidden_size", f"a multiple of num_attention_heads={self.num_attention_heads}")
    if self.patch_size < 1 or self.image_size % self.patch_size:
      bad("image_size", f"a multiple of patch_size={self.patch_size}")
    if self.num_channels != 3:
      bad("num_channels", "3 (RGB images)")
    depth = self.num_hidden_layers
    if not -(depth + 1) <= self.feature_layer <= depth:
      bad("feature_layer", f"an index into the {depth + 1} hidden states, in "
          f"[{-(depth + 1)}, {depth}]")
    if self.drop_cls and self.kind != "clip":
      bad("drop_cls", "False: SigLIP has no class token")
    for i, field in enumerate(("image_mean", "image_std")):
      value = getattr(self, field)
      value = tuple(float(v) for v in (PIXEL_STATS[self.kind][i] if value is None else value))
      if len(value) != 3 or (field == "image_std" and min(value) <= 0):
        bad(field, "3 numbers (one per RGB channel), std > 0")
      object.__setattr__(self, field, value)
    if self.resize_mode is None:
      object.__setattr__(self, "resize_mode", DEFAULT_RESIZE[self.kind])
    if self.resize_mode not in RESIZE_MODES:
      bad("resize_mode", f"one of {RESIZE_MODES}")
    layers.dtype_from_name(self.dtype)
    layers.dtype_from_name(self.param_dtype)
    if self.post_layernorm is None:
      object.__setattr__(self, "post_layernorm",
                         self.kind == "siglip" and self.layers_used == depth)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def layers_used(self) -> int:
    """How many encoder layers run (and are loaded) to reach ``feature_layer``."""
    return self.feature_layer % (self.num_hidden_layers + 1)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + (self.kind == "clip")

  @property
  def num_features(self) -> int:
    """N, the number of feature vectors per image."""
    return self.num_positions - int(self.drop_cls)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json",
                     preprocessor: Mapping[str, Any] | None = None,
                     preprocessor_source: str = "preprocessor_config.json",
                     **overrides) -> "VisionTowerConfig":
    """From a CLIPVisionConfig / CLIPConfig / SiglipVisionConfig / SiglipConfig dict.

    ``preprocessor``: the directory's ``preprocessor_config.json`` (pixel
    mean/std and resize mode), else the family's defaults. ``overrides`` set
    any field (``feature_layer``, ``drop_cls``, ``dtype``, ...).
    """
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(f"{source}: model_type={model_type!r} is not a supported vision tower; "
                       f"expected one of {sorted(_MODEL_TYPES)}")
    kind = _MODEL_TYPES[model_type]
    vision, where = hf, source
    if model_type in ("clip", "siglip"):
      vision, where = hf.get("vision_config") or {}, f"{source} (vision_config)"
      if not isinstance(vision, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(vision).__name__}")
      inner = vision.get("model_type", f"{kind}_vision_model")
      if inner != f"{kind}_vision_model":
        raise ValueError(f"{where}: model_type={inner!r}, expected '{kind}_vision_model'")
    fields = {k: vision.get(k, v) for k, v in _HF_DEFAULTS[kind].items()}
    if fields["hidden_act"] not in ACTIVATIONS:
      raise ValueError(f"{where}: field 'hidden_act' = {fields['hidden_act']!r} is not "
                       f"supported; expected one of {sorted(ACTIVATIONS)}")
    if fields["num_channels"] != 3:
      raise ValueError(f"{where}: field 'num_channels' = {fields['num_channels']!r} is not "
                       "supported; expected 3 (RGB)")
    kw = dict(kind=kind, **fields)
    if preprocessor is not None:
      kw.update(_from_preprocessor(preprocessor, preprocessor_source))
    kw.update(overrides)
    return cls(**kw)


def _from_preprocessor(pre: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Pixel mean/std and resize mode from an image processor's config dict."""
  out = {}
  if "rescale_factor" in pre and abs(float(pre["rescale_factor"]) - 1 / 255) > 1e-6:
    raise ValueError(f"{source}: field 'rescale_factor' = {pre['rescale_factor']!r} is not "
                     "supported; expected 1/255 (uint8 pixels to [0, 1])")
  if pre.get("do_rescale") is False:
    raise ValueError(f"{source}: field 'do_rescale' = False is not supported; expected "
                     "pixels rescaled to [0, 1]")
  if pre.get("do_normalize") is False:
    out.update(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
  else:
    for field in ("image_mean", "image_std"):
      if field in pre:
        value = pre[field]
        value = [value] * 3 if isinstance(value, (int, float)) else list(value)
        if len(value) != 3:
          raise ValueError(f"{source}: field {field!r} = {pre[field]!r}; expected 3 numbers")
        out[field] = tuple(float(v) for v in value)
  if "do_center_crop" in pre:
    out["resize_mode"] = "center_crop" if pre["do_center_crop"] else "squash"
  return out


def normalize_pixels(image, mean, std) -> jax.Array:
  """uint8 [..., 3] (0..255) or float in [0, 1] -> (x - mean) / std in float32."""
  x = jnp.asarray(image)
  x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else (
      x.astype(jnp.float32))
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class VisionEncoderLayer(nn.Module):
  """Pre-LN ViT layer (CLIP/SigLIP): biased q/k/v/out attention, fc1-act-fc2 MLP."""
  config: VisionTowerConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    kw = dict(dtype=layers.dtype_from_name(c.dtype),
              param_dtype=layers.dtype_from_name(c.param_dtype))
    h = layers.LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = x + layers.MultiHeadAttention(c.num_attention_heads, c.head_dim, name="self_attn",
                                      **kw)(h, mask)
    h = layers.LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
    h = layers.Dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h)
    h = ACTIVATIONS[c.hidden_act](h)
    h = layers.Dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
    return x + h, None


class VisionEmbeddings(nn.Module):
  """Patch convolution (+ CLIP's class token) plus learned position embeddings."""
  config: VisionTowerConfig

  @nn.compact
  def __call__(self, pixels):                                       # [B, S, S, 3] normalised
    c = self.config
    dtype, pdt = layers.dtype_from_name(c.dtype), layers.dtype_from_name(c.param_dtype)
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), (p, p), padding="VALID", use_bias=c.kind == "siglip",
                dtype=dtype, param_dtype=pdt, name="patch_embedding",
                kernel_init=layers.with_axes(layers.default_kernel_init,
                                             ("conv_h", "conv_w", "conv_in", "embed")),
                bias_init=layers.with_axes(nn.initializers.zeros, ("embed",)))(
                    pixels.astype(dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.hidden_size)                             # row-major patches, as HF
    if c.kind == "clip":
      cls = self.param("class_embedding", layers.with_axes(layers.default_kernel_init, ("embed",)),
                       (c.hidden_size,), pdt)
      cls = jnp.broadcast_to(jnp.asarray(cls, dtype), (b, 1, c.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param("position_embedding",
                     layers.with_axes(layers.default_kernel_init, ("patches", "embed")),
                     (c.num_positions, c.hidden_size), pdt)
    return x + jnp.asarray(pos, dtype)[None]


class VisionTower(nn.Module):
  """image uint8 [B, S, S, 3] (or float in [0, 1]) -> (features [B, N, D], mask [B, N]).

  ``image_mask`` [B] (optional) marks real images; the output mask repeats it
  over the N features (all True without it). ``train`` is accepted for the
  encoder interface and changes nothing (no dropout, no batch statistics).
  """
  config: VisionTowerConfig

  @nn.compact
  def __call__(self, image, image_mask=None, train: bool = False):
    del train
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if image.ndim != 4 or tuple(image.shape[1:]) != want:
      raise ValueError(f"VisionTower: image has shape {tuple(image.shape)}, expected "
                       f"[B, {', '.join(map(str, want))}] (resize images to the tower's "
                       f"image_size={c.image_size}, e.g. the data config's image_size)")
    kw = dict(dtype=layers.dtype_from_name(c.dtype),
              param_dtype=layers.dtype_from_name(c.param_dtype))
    b = image.shape[0]
    x = VisionEmbeddings(c, name="embeddings")(normalize_pixels(image, c.image_mean, c.image_std))
    if c.kind == "clip":
      x = layers.LayerNorm(c.layer_norm_eps, name="pre_layernorm", **kw)(x)
    keys = jnp.ones((b, c.num_positions), bool)
    if c.layers_used:
      stack = layers.scan_layers(VisionEncoderLayer, c.layers_used, num_broadcast=1,
                                 remat_policy=c.remat_policy)
      x, _ = stack(c, name="layers")(x, keys)
    if c.post_layernorm:
      x = layers.LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(x)
    if c.drop_cls:
      x = x[:, 1:]
    real = jnp.ones((b,), bool) if image_mask is None else jnp.asarray(image_mask).astype(bool)
    return x, jnp.broadcast_to(real[:, None], x.shape[:2])
