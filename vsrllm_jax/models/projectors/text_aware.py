"""The text-aware projectors: the base catalog with the instruction as a second source.

Each ``text_*`` projector is a thin subclass of its base projector; it sets
``text_aware = True``, so the composed model's instruction embeddings
(``text`` [B, L, E], ``text_mask`` [B, L]; frozen LLM table, instruction only,
never label tokens) are required and a missing text is an error naming the
projector. Padded text tokens are masked everywhere (key masks, masked means),
so extra instruction padding changes nothing.

How each one reads the text:

- text_cross_attention, text_perceiver, text_adaptive_query,
  text_fusion_refinement: one more cross-attention sub-layer, to the text,
  after the visual one in every block (``blocks``; the query flow passes it).
- text_gated_cross_attention: the same text cross-attention, tanh-gated like
  the visual one (gate initialised at zero, Flamingo). We chose a gated text
  cross-attention over text-conditioned gates: it reuses the shared block and
  lets every query attend to individual instruction tokens.
- text_hierarchical_moe: a text-conditioned router bias, LayerNorm(masked mean
  of the text) -> Dense (zero-initialised) -> [B, num_experts], added to the
  router logits of every MoE layer.
- text_pevl_adapter: LayerNorm(masked mean of the text) is the FiLM condition
  of every bottleneck adapter (zero-initialised, so it starts unconditioned).
- text_multiscale_contrastive: multiscale_contrastive, then its output queries
  cross-attend to the text (pre-LN residual, LayerNorm). It returns the visual
  clip vector ``embeddings['pooled']`` [B, E], and its ``label_losses`` the
  ``visual_text`` InfoNCE loss between that vector and the masked mean of the
  frozen LLM embeddings of the label text (the label enters the loss only).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.contrastive import visual_text_info_nce
import vsrllm_jax.models.projectors.attention_family as attention_family
import vsrllm_jax.models.projectors.blocks as blocks
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.adapters import PevlAdapterProjector
from vsrllm_jax.models.projectors.base import ProjectorOutput
from vsrllm_jax.models.projectors.moe import HierarchicalMoeProjector
from vsrllm_jax.models.projectors.multiscale_contrastive import MultiScaleContrastiveProjector


def require_text(name: str, text, text_mask) -> tuple[jax.Array, jax.Array]:
  """Raises unless both are given; returns (text, bool mask)."""
  if text is None or text_mask is None:
    raise ValueError(f"projector {name!r} is text-aware: it needs text [B, L, E] and text_mask "
                     f"[B, L] (the instruction embeddings), got text={type(text).__name__}, "
                     f"text_mask={type(text_mask).__name__}")
  if text.ndim != 3 or text_mask.shape != text.shape[:2]:
    raise ValueError(f"projector {name!r}: text must be [B, L, E] and text_mask [B, L]; got "
                     f"{tuple(text.shape)} and {tuple(text_mask.shape)}")
  return text, text_mask.astype(bool)


def text_summary(module: nn.Module, text, text_mask) -> jax.Array:
  """LayerNorm of the masked mean of the text over its real tokens: [B, E]."""
  pooled = layers.masked_mean(jnp.asarray(text, module.dtype), text_mask)
  return layers.LayerNorm(name="text_norm", dtype=module.dtype,
                          param_dtype=module.param_dtype)(pooled)


# The query family: the base flow already passes the text to every block.

@register("text_cross_attention")
class TextCrossAttentionProjector(attention_family.CrossAttentionProjector):
  """cross_attention with a text cross-attention sub-layer in every block."""
  text_aware = True


@register("text_perceiver")
class TextPerceiverProjector(attention_family.PerceiverProjector):
  """perceiver whose latents also cross-attend to the text in every iteration."""
  text_aware = True


@register("text_adaptive_query")
class TextAdaptiveQueryProjector(attention_family.AdaptiveQueryProjector):
  """adaptive_query whose query rows also cross-attend to the text in every layer."""
  text_aware = True


@register("text_fusion_refinement")
class TextFusionRefinementProjector(attention_family.FusionRefinementProjector):
  """fusion_refinement with a text cross-attention sub-layer in every stage."""
  text_aware = True


@register("text_gated_cross_attention")
class TextGatedCrossAttentionProjector(attention_family.GatedCrossAttentionProjector):
  """gated_cross_attention with a tanh-gated (closed at init) text cross-attention."""
  text_aware = True


@register("text_hierarchical_moe")
class TextHierarchicalMoeProjector(HierarchicalMoeProjector):
  """hierarchical_moe whose routers get a per-clip bias computed from the text."""
  text_aware = True

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del train
    text, text_mask = require_text("text_hierarchical_moe", text, text_mask)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    bias = layers.Dense(self.num_experts, ("embed", "experts"), name="text_router",
                        kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                        param_dtype=self.param_dtype)(text_summary(self, text, text_mask))
    x, mask, routing = self.trunk(features, features_mask, router_bias=bias)
    x = layers.LayerNorm(name="out_norm", **kw)(x)
    tokens = layers.Mlp(self.mlp_ratio * x.shape[-1], out_dim=self.output_dim, name="readout",
                        **kw)(x)
    return ProjectorOutput(tokens=tokens, mask=mask,
                           aux_losses={"routing": jnp.asarray(routing, jnp.float32)},
                           embeddings={})


@register("text_pevl_adapter")
class TextPevlAdapterProjector(PevlAdapterProjector):
  """pevl_adapter whose adapters are FiLM-conditioned on the text summary."""
  text_aware = True

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del train
    text, text_mask = require_text("text_pevl_adapter", text, text_mask)
    x = self.trunk(features, condition=text_summary(self, text, text_mask))
    tokens = layers.Dense(self.output_dim, ("mlp", "embed"), name="out_proj",
                          dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return ProjectorOutput(tokens=tokens, mask=features_mask.astype(bool), aux_losses={},
                           embeddings={})


@register("text_multiscale_contrastive")
class TextMultiScaleContrastiveProjector(MultiScaleContrastiveProjector):
  """multiscale_contrastive whose output queries then cross-attend to the text.

  ``label_losses`` adds ``visual_text``: InfoNCE at ``visual_text_temperature``
  between the visual clip vector and the label text, which enters this loss only.
  """
  visual_text_temperature: float = 0.07

  text_aware = True

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    text, text_mask = require_text("text_multiscale_contrastive", text, text_mask)
    if self.output_dim % self.num_heads:
      raise ValueError(f"projector 'text_multiscale_contrastive': output_dim {self.output_dim} "
                       f"must be a multiple of num_heads {self.num_heads}")
    if self.visual_text_temperature <= 0:
      raise ValueError("projector 'text_multiscale_contrastive': visual_text_temperature must be "
                       f"> 0, got {self.visual_text_temperature}")
    out = super().__call__(features, features_mask, train=train)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = blocks.AttentionSublayer(self.num_heads, name="text_cross_attn", **kw)(
        out.tokens, jnp.asarray(text, self.dtype), text_mask)
    tokens = layers.LayerNorm(name="text_out_norm", **kw)(q)
    return out.replace(tokens=tokens)

  def label_losses(self, output: ProjectorOutput, label_embeds, label_mask):
    return {"visual_text": visual_text_info_nce(output.embeddings["pooled"], label_embeds,
                                                label_mask, self.visual_text_temperature)}
