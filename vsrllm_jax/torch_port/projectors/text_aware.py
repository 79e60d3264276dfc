"""The text-aware torch projectors: ours (models/projectors/text_aware.py) that are ported.

They take the instruction embeddings (``text`` [B, L, E], ``text_mask``
[B, L]; the frozen LLM table, instruction only) and a missing text is an
error naming the projector. Padded text tokens are masked out (of the mean,
of the attention keys); an instruction with no real token gives a finite
output, as ours (a zero mean; attention to no real key averages all keys).

- text_pevl_adapter: LayerNorm(masked mean of the text) (``text_norm``) is
  the FiLM condition of every bottleneck adapter.
- text_hierarchical_moe: LayerNorm(masked mean of the text) (``text_norm``)
  -> ``text_router`` (Dense, fp32 as ours) -> a per-clip bias [B, num_experts]
  added to the router logits of every MoE layer (``trunk``'s router_bias).
- text_multiscale_contrastive: multiscale_contrastive, then its output
  queries cross-attend to the text (``text_cross_attn``, pre-LN residual)
  and ``text_out_norm``. Ours also return the visual clip vector
  ``embeddings['pooled']`` for the training-only ``visual_text`` loss; the
  port leaves it out (ProjectorOutput carries tokens and mask only), but
  keeps ``visual_text_temperature`` as a config field with ours' check.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.adapters import PevlAdapterProjector
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput
from vsrllm_jax.torch_port.projectors.moe import HierarchicalMoeProjector
from vsrllm_jax.torch_port.projectors.multiscale_contrastive import MultiScaleContrastiveProjector


def require_text(name: str, text, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
  """Raises unless both are given with matching shapes; returns (text, bool mask)."""
  if text is None or text_mask is None:
    raise ValueError(f"projector {name!r} is text-aware: it needs text [B, L, E] and text_mask "
                     f"[B, L] (the instruction embeddings), got text={type(text).__name__}, "
                     f"text_mask={type(text_mask).__name__}")
  if text.ndim != 3 or tuple(text_mask.shape) != tuple(text.shape[:2]):
    raise ValueError(f"projector {name!r}: text must be [B, L, E] and text_mask [B, L]; got "
                     f"{tuple(text.shape)} and {tuple(text_mask.shape)}")
  return text, text_mask.bool()


def text_summary(norm: nn.Module, text, text_mask) -> torch.Tensor:
  """``norm`` (a LayerNorm) of the masked mean of the text over its real tokens: [B, E]."""
  return norm(layers.masked_mean(text.to(norm.weight.dtype), text_mask))


@register("text_hierarchical_moe")
class TextHierarchicalMoeProjector(HierarchicalMoeProjector):
  """hierarchical_moe whose routers get a per-clip bias computed from the text
  (``text_norm``, ``text_router``)."""
  text_aware = True

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               hidden_dim: int | None = None, num_stages: int = 2, layers_per_stage: int = 1,
               pool: int = 2, num_experts: int = 4, top_k: int = 2, num_heads: int = 4,
               mlp_ratio: int = 2, time_embedding_dim: int = 64):
    super().__init__(output_dim, input_dim, hidden_dim=hidden_dim, num_stages=num_stages,
                     layers_per_stage=layers_per_stage, pool=pool, num_experts=num_experts,
                     top_k=top_k, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     time_embedding_dim=time_embedding_dim)
    text_dim = text_dim or output_dim
    self.text_norm = layers.LayerNorm(text_dim)
    self.text_router = layers.Dense(text_dim, num_experts)

  def router_bias(self, text, text_mask) -> torch.Tensor:
    """The per-clip router bias [B, num_experts], in fp32 as ours (zero-initialised there)."""
    summary = text_summary(self.text_norm, text, text_mask)
    return F.linear(summary.float(), self.text_router.weight.float(),
                    self.text_router.bias.float())

  def forward(self, features, mask, text=None, text_mask=None):
    text, text_mask = require_text("text_hierarchical_moe", text, text_mask)
    x, mask = self.trunk(features, mask, self.router_bias(text, text_mask))
    return ProjectorOutput(self.readout(self.out_norm(x)), mask)


@register("text_pevl_adapter")
class TextPevlAdapterProjector(PevlAdapterProjector):
  """pevl_adapter whose adapters are FiLM-conditioned on the text summary."""
  text_aware = True

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               hidden_dim: int | None = None, num_adapters: int = 2,
               bottleneck_dim: int | None = None):
    Projector.__init__(self)   # pylint: disable=non-parent-init-called
    text_dim = text_dim or output_dim
    self.text_norm = layers.LayerNorm(text_dim)
    self.build_trunk(output_dim, input_dim, hidden_dim, num_adapters, bottleneck_dim,
                     condition_dim=text_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    text, text_mask = require_text("text_pevl_adapter", text, text_mask)
    x = self.trunk(features, condition=text_summary(self.text_norm, text, text_mask))
    return ProjectorOutput(self.out_proj(x), mask.bool())


@register("text_multiscale_contrastive")
class TextMultiScaleContrastiveProjector(MultiScaleContrastiveProjector):
  """multiscale_contrastive whose output queries then cross-attend to the text
  (``text_cross_attn``), then ``text_out_norm``."""
  text_aware = True

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               scales: Sequence[int] = (1, 2, 4), num_output_tokens: int = 16,
               num_heads: int = 4, mlp_ratio: int = 2, temperature: float = 0.1,
               time_embedding_dim: int = 64, visual_text_temperature: float = 0.07):
    super().__init__(output_dim, input_dim, scales=scales, num_output_tokens=num_output_tokens,
                     num_heads=num_heads, mlp_ratio=mlp_ratio, temperature=temperature,
                     time_embedding_dim=time_embedding_dim)
    if output_dim % num_heads:
      raise ValueError(f"projector 'text_multiscale_contrastive': output_dim {output_dim} "
                       f"must be a multiple of num_heads {num_heads}")
    # The visual_text loss's (training-only); checked as ours checks it.
    if visual_text_temperature <= 0:
      raise ValueError("projector 'text_multiscale_contrastive': visual_text_temperature must be "
                       f"> 0, got {visual_text_temperature}")
    self.text_cross_attn = blocks.AttentionSublayer(output_dim, num_heads,
                                                    context_dim=text_dim or output_dim)
    self.text_out_norm = layers.LayerNorm(output_dim)

  def forward(self, features, mask, text=None, text_mask=None):
    text, text_mask = require_text("text_multiscale_contrastive", text, text_mask)
    out = super().forward(features, mask)
    dtype = self.text_out_norm.weight.dtype
    q = self.text_cross_attn(out.tokens, text.to(dtype), text_mask)
    return ProjectorOutput(self.text_out_norm(q), out.mask)
