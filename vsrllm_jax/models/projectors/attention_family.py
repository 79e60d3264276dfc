"""The attention-resampler projectors: compositions of ``blocks`` on learned queries.

All share ``query.QueryProjector``'s flow (input projection with a time
embedding, learned queries, readout, optional reconstruction loss); each
defines only how the queries read the features:

- cross_attention: per layer, self-attention then cross-attention (Flamingo-like).
- perceiver: latents cross-attend then self-attend, iterated (Perceiver).
- adaptive_query: queries and visual tokens in one encoder under a block mask.
- fusion_refinement: stages that cross-attend to the features and to all
  earlier stages' outputs.
- gated_cross_attention: tanh-gated cross-attention (gates start closed).
"""
from __future__ import annotations

import jax.numpy as jnp

from vsrllm_jax.models import layers
import vsrllm_jax.models.projectors.blocks as blocks
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.query import QueryProjector, scan_blocks


def _fields(p: QueryProjector, **extra) -> dict:
  return dict(num_heads=p.num_heads, mlp_ratio=p.mlp_ratio, dtype=p.dtype,
              param_dtype=p.param_dtype, **extra)


@register("cross_attention")
class CrossAttentionProjector(QueryProjector):
  """Per layer: a self-attention layer among the queries, then cross-attention + MLP."""

  def mix(self, queries, feats, mask, text, text_mask):
    return scan_blocks(blocks.CrossSelfBlock, self.num_layers, "layers",
                       _fields(self, self_layers=1, self_first=True),
                       queries, feats, mask, text, text_mask)


@register("perceiver")
class PerceiverProjector(QueryProjector):
  """Latents cross-attend to the features, then ``num_layers`` self-attention
  layers; ``num_iterations`` times, with one set of weights (``share_weights``)
  or one per iteration."""
  num_iterations: int = 2
  share_weights: bool = False

  def mix(self, queries, feats, mask, text, text_mask):
    if self.num_iterations < 1:
      raise ValueError(f"projector {self.catalog_name()!r}: num_iterations must be >= 1, got "
                       f"{self.num_iterations}")
    fields = _fields(self, self_layers=self.num_layers, self_first=False)
    if not self.share_weights:
      return scan_blocks(blocks.CrossSelfBlock, self.num_iterations, "iterations", fields,
                         queries, feats, mask, text, text_mask)
    block = blocks.CrossSelfBlock(**fields, name="iteration")
    x = queries
    for _ in range(self.num_iterations):
      x, _ = block(x, feats, mask, text, text_mask)
    return x


@register("adaptive_query")
class AdaptiveQueryProjector(QueryProjector):
  """[queries; visual tokens] through one encoder; queries see everything real,
  visual tokens see visual tokens only; the query outputs are kept."""

  def mix(self, queries, feats, mask, text, text_mask):
    x = jnp.concatenate([queries, feats], axis=1)                     # [B, N + T, W]
    x = scan_blocks(blocks.JointQueryLayer, self.num_layers, "layers",
                    _fields(self, num_queries=self.num_queries), x, mask, text, text_mask)
    return x[:, :self.num_queries]


@register("fusion_refinement")
class FusionRefinementProjector(QueryProjector):
  """``num_layers`` stages (self-attn, cross-attn, MLP); each refines the previous
  stage's queries and cross-attends to the features and to every earlier
  stage's (normalised) output. The last stage is the output."""

  def mix(self, queries, feats, mask, text, text_mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    memory, memory_mask = [feats], [mask]
    x = queries
    for s in range(self.num_layers):
      x, _ = blocks.QueryBlock(self.num_heads, self.mlp_ratio, name=f"stage{s}", **kw)(
          x, jnp.concatenate(memory, axis=1), jnp.concatenate(memory_mask, axis=1),
          text, text_mask)
      if s < self.num_layers - 1:
        memory.append(layers.LayerNorm(name=f"memory_norm{s}", **kw)(x))
        memory_mask.append(blocks.ones_mask(x))
    return x


@register("gated_cross_attention")
class GatedCrossAttentionProjector(QueryProjector):
  """Per layer: cross-attention and MLP with tanh(gate) residuals (gates start
  at zero, Flamingo), then an ungated self-attention layer among the queries.
  At initialisation the tokens do not depend on the video; the gates open as
  they learn."""

  def mix(self, queries, feats, mask, text, text_mask):
    return scan_blocks(blocks.CrossSelfBlock, self.num_layers, "layers",
                       _fields(self, self_layers=1, self_first=False, gated=True),
                       queries, feats, mask, text, text_mask)
