"""``multiscale_contrastive``: multi-scale temporal pooling, attention pooling, InfoNCE.

Features are average-pooled in time at scales 1, 1/2, 1/4, ... (masked), each
scale gets its own projection, a learned scale embedding and an embedding of
its tokens' centre times (attention pooling is otherwise blind to order), and
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

from vsrllm_jax.models.contrastive import info_nce
from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


def sinusoid(positions: jax.Array, dim: int, max_period: float = 1000.0) -> jax.Array:
  """Sinusoidal embedding of (fractional) frame times. positions [...] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half) / max(half, 1))
  angles = positions[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


@register("multiscale_contrastive")
class MultiScaleContrastiveProjector(Projector):
  scales: Sequence[int] = (1, 2, 4)   # pooling windows in frames
  num_output_tokens: int = 16
  num_heads: int = 4
  mlp_ratio: int = 2
  temperature: float = 0.1
  time_embedding_dim: int = 64

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    e = self.output_dim
    scale_tokens, scale_masks, pooled = [], [], []
    for i, s in enumerate(self.scales):
      x, m = layers.masked_temporal_pool(features, features_mask, s)        # [B, T/s, D]
      x = layers.Dense(e, ("features", "embed"), name=f"scale{s}_proj", **kw)(x)
      x = layers.LayerNorm(name=f"scale{s}_norm", **kw)(x)
      scale_emb = self.param(f"scale{s}_embedding",
                             layers.with_axes(nn.initializers.normal(0.02), ("embed",)), (e,),
                             self.param_dtype)
      centres = jnp.arange(x.shape[1]) * s + (s - 1) / 2                # frame time of each token
      time = layers.Dense(e, (None, "embed"), use_bias=False, name=f"scale{s}_time", **kw)(
          sinusoid(centres, self.time_embedding_dim))                   # [T/s, E]
      scale_tokens.append(x + jnp.asarray(scale_emb, self.dtype) + time[None])
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
    contrastive = (sum(info_nce(pooled[i], pooled[j], self.temperature) for i, j in pairs)
                   / max(len(pairs), 1))
    return ProjectorOutput(
        tokens=out, mask=jnp.ones(out.shape[:2], bool),
        aux_losses={"contrastive": jnp.asarray(contrastive, jnp.float32)} if pairs else {},
        embeddings={"pooled": jnp.mean(jnp.stack(pooled), axis=0)})
