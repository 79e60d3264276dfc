"""``multiscale_contrastive``: ours (models/projectors/multiscale_contrastive.py) in PyTorch.

Features are average-pooled in time at each of ``scales`` (masked); each
scale has its own projection (``scale{s}_proj``), LayerNorm (``scale{s}_norm``),
learned embedding (the raw param ``scale{s}_embedding`` [E]) and an embedding
of its tokens' centre times (``scale{s}_time``); ``num_output_tokens``
learned ``queries`` attend over all scales at once. All output tokens are
real. The InfoNCE loss between scales and the pooled clip embedding are
training-only and left out.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


@register("multiscale_contrastive")
class MultiScaleContrastiveProjector(Projector):
  """Per-scale tokens, then ``queries`` + ``pool_attn`` (``query_norm``) + ``pool_mlp``
  (``mlp_norm``), ``out_norm``."""

  def __init__(self, output_dim: int, input_dim: int, *, scales: Sequence[int] = (1, 2, 4),
               num_output_tokens: int = 16, num_heads: int = 4, mlp_ratio: int = 2,
               temperature: float = 0.1, time_embedding_dim: int = 64):
    super().__init__()
    del temperature   # the contrastive loss's; training-only
    e = output_dim
    self.scales = tuple(int(s) for s in scales)
    if (not self.scales or min(self.scales) < 1 or len(set(self.scales)) != len(self.scales)):
      raise ValueError(f"projector multiscale_contrastive: scales must be distinct windows "
                       f">= 1 (frames), got {tuple(scales)}")
    if num_output_tokens < 1 or num_heads < 1 or e // num_heads < 1:
      raise ValueError(f"projector multiscale_contrastive needs num_output_tokens >= 1 and "
                       f"1 <= num_heads <= output_dim; got {num_output_tokens}, {num_heads}, {e}")
    self.time_embedding_dim = time_embedding_dim
    for s in self.scales:
      setattr(self, f"scale{s}_proj", layers.Dense(input_dim, e))
      setattr(self, f"scale{s}_norm", layers.LayerNorm(e))
      setattr(self, f"scale{s}_embedding", nn.Parameter(torch.randn(e) * 0.02))
      setattr(self, f"scale{s}_time",
              layers.Dense(2 * (time_embedding_dim // 2), e, bias=False))
    self.queries = blocks.queries_param(num_output_tokens, e)
    self.query_norm = layers.LayerNorm(e)
    self.pool_attn = layers.MultiHeadAttention(e, num_heads, e // num_heads)
    self.mlp_norm = layers.LayerNorm(e)
    self.pool_mlp = layers.Mlp(e, mlp_ratio * e)
    self.out_norm = layers.LayerNorm(e)

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    scale_tokens, scale_masks = [], []
    for s in self.scales:
      x, m = layers.masked_temporal_pool(features, mask, s)             # [B, T/s, D]
      x = getattr(self, f"scale{s}_norm")(getattr(self, f"scale{s}_proj")(x))
      centres = torch.arange(x.shape[1], device=x.device) * s + (s - 1) / 2   # frame times
      time = getattr(self, f"scale{s}_time")(layers.sinusoid(centres, self.time_embedding_dim))
      scale_tokens.append(x + getattr(self, f"scale{s}_embedding") + time[None])
      scale_masks.append(m)
    tokens = torch.cat(scale_tokens, dim=1)                           # [B, S, E]
    token_mask = torch.cat(scale_masks, dim=1)                        # [B, S]
    q = blocks.learned_queries(self.queries, tokens.shape[0])
    q = q + self.pool_attn(self.query_norm(q), token_mask, tokens)
    q = q + self.pool_mlp(self.mlp_norm(q))
    out = self.out_norm(q)                                            # [B, N, E]
    return ProjectorOutput(out, blocks.ones_mask(out))
