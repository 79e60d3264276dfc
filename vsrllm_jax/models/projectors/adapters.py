"""``pevl_adapter``: input projection, stacked residual bottleneck adapters, output projection.

Each adapter is Houlsby-style: LayerNorm, down-projection to a bottleneck,
GELU, up-projection, residual. The up-projection starts at zero, so every
adapter starts as the identity and the projector as a plain linear map that
the adapters then refine. Adapters act per frame: one token per frame,
mask == features_mask, and padded frames cannot reach real ones.

``BottleneckAdapter`` takes an optional ``condition`` ([B, C] or [B, T, C]):
a FiLM scale and shift of the bottleneck activations, zero-initialised, so a
conditioned adapter starts as the unconditioned one (the hook a
text-conditioned adapter uses).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


class BottleneckAdapter(nn.Module):
  """x + up(GELU(FiLM(down(LayerNorm(x))))). x [B, T, W]; condition [B, C] / [B, T, C] / None."""
  bottleneck_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, condition=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(name="norm", **kw)(x)
    h = layers.Dense(self.bottleneck_dim, ("embed", "mlp"), name="down", **kw)(h)
    if condition is not None:
      if condition.ndim == 2:
        condition = condition[:, None, :]
      if condition.ndim != 3 or condition.shape[0] != x.shape[0]:
        raise ValueError(f"BottleneckAdapter condition must be [B, C] or [B, T, C] with "
                         f"B = {x.shape[0]}; got {tuple(condition.shape)}")
      film = lambda name: layers.Dense(self.bottleneck_dim, ("embed", "mlp"), name=name,
                                       kernel_init=nn.initializers.zeros, **kw)(condition)
      h = h * (1 + film("cond_scale")) + film("cond_shift")
    h = nn.gelu(h, approximate=False)
    return x + layers.Dense(x.shape[-1], ("mlp", "embed"), name="up",
                            kernel_init=nn.initializers.zeros, **kw)(h)


@register("pevl_adapter")
class PevlAdapterProjector(Projector):
  hidden_dim: int | None = None       # trunk width; default output_dim
  num_adapters: int = 2
  bottleneck_dim: int | None = None   # default trunk width // 4
  sequence_preserving = True

  def trunk(self, features, condition=None):
    """in_proj and the adapters -> [B, T, W] (a text-aware subclass passes ``condition``)."""
    if self.num_adapters < 0:
      raise ValueError(f"projector pevl_adapter needs num_adapters >= 0, got {self.num_adapters}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_dim or self.output_dim
    bottleneck = self.bottleneck_dim or max(width // 4, 1)
    x = layers.Dense(width, ("features", "embed"), name="in_proj", **kw)(features)
    for i in range(self.num_adapters):
      x = BottleneckAdapter(bottleneck, name=f"adapter{i}", **kw)(x, condition)
    return layers.LayerNorm(name="out_norm", **kw)(x)

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    x = self.trunk(features)
    # The trunk is labelled 'mlp' here, as the hidden of a Dense pair, so that the
    # kernel is not sharded twice on the mesh axis of 'embed'.
    tokens = layers.Dense(self.output_dim, ("mlp", "embed"), name="out_proj",
                          dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return ProjectorOutput(tokens=tokens, mask=features_mask.astype(bool), aux_losses={},
                           embeddings={})
