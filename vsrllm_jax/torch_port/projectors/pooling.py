"""Pooling projectors: ``self_aggregating_linear``, ``self_aggregating_mlp``, ``temporal_pool_mlp``.

Ours are in models/projectors/pooling.py. self_aggregating_*: per-frame
features plus a Dense of sinusoidal frame times; ``num_output_tokens``
learned queries gather them through one masked cross-attention (all output
tokens are real). temporal_pool_mlp: masked mean over windows of ``stride``
frames, then Dense-GELU-Dense (a window is real if it holds a real frame).
"""
from __future__ import annotations

import torch

from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


class _SelfAggregating(Projector):
  """Shared body; subclasses set ``frame_features`` (a module: [B, T, D] -> [B, T, E])."""

  def __init__(self, output_dim: int, num_output_tokens: int, num_heads: int,
               time_embedding_dim: int):
    super().__init__()
    e = output_dim
    if num_output_tokens < 1 or e % num_heads:
      raise ValueError(f"projector self_aggregating needs num_output_tokens >= 1 and output_dim "
                       f"divisible by num_heads; got {num_output_tokens}, {e}, {num_heads}")
    self.time_embedding_dim = time_embedding_dim
    if time_embedding_dim:
      self.time = layers.Dense(2 * (time_embedding_dim // 2), e, bias=False)
    self.queries = blocks.queries_param(num_output_tokens, e)
    self.context_norm = layers.LayerNorm(e)
    self.query_norm = layers.LayerNorm(e)
    self.pool_attn = layers.MultiHeadAttention(e, num_heads, e // num_heads)
    self.out_norm = layers.LayerNorm(e)

  def frame_features(self, features):
    raise NotImplementedError

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    x = self.frame_features(features)                                # [B, T, E]
    if self.time_embedding_dim:
      pos = torch.arange(x.shape[1], device=x.device)
      x = x + self.time(layers.sinusoid(pos, self.time_embedding_dim))[None]
    q = blocks.learned_queries(self.queries, x.shape[0])
    q = q + self.pool_attn(self.query_norm(q), mask.bool(), self.context_norm(x))
    tokens = self.out_norm(q)                                        # [B, N, E]
    return ProjectorOutput(tokens, blocks.ones_mask(tokens))


@register("self_aggregating_linear")
class SelfAggregatingLinearProjector(_SelfAggregating):
  """Frames through one Dense (``frame_proj``)."""

  def __init__(self, output_dim: int, input_dim: int, *, num_output_tokens: int = 32,
               num_heads: int = 4, time_embedding_dim: int = 64):
    super().__init__(output_dim, num_output_tokens, num_heads, time_embedding_dim)
    self.frame_proj = layers.Dense(input_dim, output_dim)

  def frame_features(self, features):
    return self.frame_proj(features)


@register("self_aggregating_mlp")
class SelfAggregatingMlpProjector(_SelfAggregating):
  """Frames through Dense-GELU-Dense (``frame_mlp``)."""

  def __init__(self, output_dim: int, input_dim: int, *, num_output_tokens: int = 32,
               num_heads: int = 4, time_embedding_dim: int = 64, hidden_dim: int | None = None):
    super().__init__(output_dim, num_output_tokens, num_heads, time_embedding_dim)
    self.frame_mlp = layers.Mlp(input_dim, hidden_dim or output_dim, output_dim)

  def frame_features(self, features):
    return self.frame_mlp(features)


@register("temporal_pool_mlp")
class TemporalPoolMlpProjector(Projector):
  """Masked mean over ``stride`` frames, then ``mlp`` (Dense-GELU-Dense)."""

  def __init__(self, output_dim: int, input_dim: int, *, stride: int = 2,
               hidden_dim: int | None = None):
    super().__init__()
    if stride < 1:
      raise ValueError(f"projector temporal_pool_mlp needs stride >= 1, got {stride}")
    self.stride = stride
    self.mlp = layers.Mlp(input_dim, hidden_dim or output_dim, output_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    x, mask = layers.masked_temporal_pool(features, mask, self.stride)   # [B, T/s, D]
    return ProjectorOutput(self.mlp(x), mask)
