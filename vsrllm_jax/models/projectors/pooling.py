"""Pooling projectors: ``self_aggregating_linear``, ``self_aggregating_mlp``, ``temporal_pool_mlp``.

self_aggregating_*: per-frame features (one Dense, or Dense-GELU-Dense) plus
a learned projection of sinusoidal frame times (attention pooling is
otherwise blind to word order), then ``num_output_tokens`` learnable output
tokens gather them through one masked cross-attention: a fixed number of
tokens per clip whatever its length.

temporal_pool_mlp: masked average pooling over windows of ``stride`` frames,
then Dense-GELU-Dense; one token per window, in order (the cheap baseline of
later video-LLMs).

Padding: attention keys and pooling windows are masked, so padded frames
never reach real outputs.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput
from vsrllm_jax.models.projectors.multiscale_contrastive import sinusoid


class _SelfAggregating(Projector):
  """Shared body; subclasses say how frames become ``output_dim``-wide features."""
  num_output_tokens: int = 32
  num_heads: int = 4
  time_embedding_dim: int = 64   # 0: no frame-time input

  def frame_features(self, features):
    raise NotImplementedError

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    e = self.output_dim
    if self.num_output_tokens < 1 or e % self.num_heads:
      raise ValueError(f"projector self_aggregating needs num_output_tokens >= 1 and output_dim "
                       f"divisible by num_heads; got {self.num_output_tokens}, {e}, "
                       f"{self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = features_mask.astype(bool)
    x = self.frame_features(features)                                # [B, T, E]
    if self.time_embedding_dim:
      x = x + layers.Dense(e, (None, "embed"), use_bias=False, name="time", **kw)(
          sinusoid(jnp.arange(x.shape[1]), self.time_embedding_dim))[None]
    queries = self.param("queries", layers.with_axes(nn.initializers.normal(0.02),
                                                     ("queries", "embed")),
                         (self.num_output_tokens, e), self.param_dtype)
    q = jnp.broadcast_to(jnp.asarray(queries, self.dtype), (x.shape[0],) + queries.shape)
    context = layers.LayerNorm(name="context_norm", **kw)(x)
    q = q + layers.MultiHeadAttention(self.num_heads, e // self.num_heads, name="pool_attn",
                                      **kw)(layers.LayerNorm(name="query_norm", **kw)(q), mask,
                                            context=context)
    tokens = layers.LayerNorm(name="out_norm", **kw)(q)              # [B, N, E]
    return ProjectorOutput(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool), aux_losses={},
                           embeddings={})


@register("self_aggregating_linear")
class SelfAggregatingLinearProjector(_SelfAggregating):

  def frame_features(self, features):
    return layers.Dense(self.output_dim, ("features", "embed"), name="frame_proj",
                        dtype=self.dtype, param_dtype=self.param_dtype)(features)


@register("self_aggregating_mlp")
class SelfAggregatingMlpProjector(_SelfAggregating):
  hidden_dim: int | None = None   # MLP hidden width; default output_dim

  def frame_features(self, features):
    return layers.Mlp(self.hidden_dim or self.output_dim, out_dim=self.output_dim,
                      in_axis_name="features", name="frame_mlp", dtype=self.dtype,
                      param_dtype=self.param_dtype)(features)


@register("temporal_pool_mlp")
class TemporalPoolMlpProjector(Projector):
  stride: int = 2                 # frames per output token
  hidden_dim: int | None = None   # MLP hidden width; default output_dim

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    if self.stride < 1:
      raise ValueError(f"projector temporal_pool_mlp needs stride >= 1, got {self.stride}")
    x, mask = layers.masked_temporal_pool(features, features_mask, self.stride)  # [B, T/s, D]
    tokens = layers.Mlp(self.hidden_dim or self.output_dim, out_dim=self.output_dim,
                        in_axis_name="features", name="mlp", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
    return ProjectorOutput(tokens=tokens, mask=mask, aux_losses={}, embeddings={})
