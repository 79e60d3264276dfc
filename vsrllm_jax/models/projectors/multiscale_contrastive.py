"""``multiscale_contrastive``: multi-scale temporal pooling, attention pooling, InfoNCE.

Features are average-pooled in time at scales 1, 1/2, 1/4, ... (masked), each
scale gets its own projection and a learned scale embedding, and
``num_output_tokens`` learnable queries attend over all scales at once. The
auxiliary ``contrastive`` loss is InfoNCE between the pooled clip vectors of
different scales of the same clip (positives) against the other clips of the
batch (negatives).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax import losses
from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


def masked_temporal_pool(x: jax.Array, mask: jax.Array, window: int):
  """Mean over non-overlapping windows of real frames.

  x [B, T, D], mask [B, T] -> ([B, ceil(T/w), D], [B, ceil(T/w)]); a window
  is real if it holds at least one real frame.
  """
  if window == 1:
    return x, mask.astype(bool)
  b, t, d = x.shape
  pad = (-t) % window
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  m = jnp.pad(mask.astype(x.dtype), ((0, 0), (0, pad)))
  x = x.reshape(b, -1, window, d)
  m = m.reshape(b, -1, window)
  total = jnp.sum(x * m[..., None], axis=2)
  count = jnp.sum(m, axis=2)
  return total / jnp.maximum(count, 1)[..., None], count > 0


@register("multiscale_contrastive")
class MultiScaleContrastiveProjector(Projector):
  scales: Sequence[int] = (1, 2, 4)   # pooling windows in frames
  num_output_tokens: int = 16
  num_heads: int = 4
  mlp_ratio: int = 2
  temperature: float = 0.1

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    e = self.output_dim
    scale_tokens, scale_masks, pooled = [], [], []
    for i, s in enumerate(self.scales):
      x, m = masked_temporal_pool(features, features_mask, s)        # [B, T/s, D]
      x = layers.Dense(e, ("features", "embed"), name=f"scale{s}_proj", **kw)(x)
      x = layers.LayerNorm(name=f"scale{s}_norm", **kw)(x)
      scale_emb = self.param(f"scale{s}_embedding",
                             layers.with_axes(nn.initializers.normal(0.02), ("embed",)), (e,),
                             self.param_dtype)
      scale_tokens.append(x + jnp.asarray(scale_emb, self.dtype))
      scale_masks.append(m)
      pooled.append(layers.masked_mean(x, m))                         # [B, E]
    tokens = jnp.concatenate(scale_tokens, axis=1)                    # [B, S, E]
    mask = jnp.concatenate(scale_masks, axis=1)                       # [B, S]

    queries = self.param("queries", layers.with_axes(nn.initializers.normal(0.02),
                                                     ("queries", "embed")),
                         (self.num_output_tokens, e), self.param_dtype)
    q = jnp.broadcast_to(jnp.asarray(queries, self.dtype), (tokens.shape[0],) + queries.shape)
    head_dim = e // self.num_heads
    q = q + layers.MultiHeadAttention(self.num_heads, head_dim, name="pool_attn", **kw)(
        layers.LayerNorm(name="query_norm", **kw)(q), mask, context=tokens)
    q = q + layers.Mlp(self.mlp_ratio * e, name="pool_mlp", **kw)(
        layers.LayerNorm(name="mlp_norm", **kw)(q))
    out = layers.LayerNorm(name="out_norm", **kw)(q)                  # [B, N, E]

    pairs = [(i, j) for i in range(len(pooled)) for j in range(i + 1, len(pooled))]
    contrastive = (sum(losses.info_nce(pooled[i], pooled[j], self.temperature) for i, j in pairs)
                   / max(len(pairs), 1))
    return ProjectorOutput(
        tokens=out, mask=jnp.ones(out.shape[:2], bool),
        aux_losses={"contrastive": jnp.asarray(contrastive, jnp.float32)} if pairs else {},
        embeddings={"pooled": jnp.mean(jnp.stack(pooled), axis=0)})
