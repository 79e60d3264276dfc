"""The attention resamplers and their text-aware variants; ours are in
models/projectors/attention_family.py and models/projectors/text_aware.py.

Each is ``query.QueryProjector``'s flow with its own ``mix``:

- cross_attention: per layer (``layers``), self-attention then cross-attention.
- perceiver: latents cross-attend then self-attend, ``num_iterations`` times;
  one block per iteration (``iterations``) or, with ``share_weights``, one
  block (``iteration``) run every time.
- adaptive_query: [queries; visual tokens] through JointQueryLayers (``layers``).
- fusion_refinement: QueryBlock stages (``stage{s}``) cross-attending to the
  features and every earlier stage's output, normalised (``memory_norm{s}``).
- gated_cross_attention: tanh-gated cross-attention, then self-attention.

Unlike ours (text_aware.py), the text variants (text_cross_attention,
text_perceiver, text_adaptive_query, text_fusion_refinement,
text_gated_cross_attention) live here on the torch side: each is a thin
subclass with ``text_aware = True``, whose blocks get a text cross-attention
sub-layer of width ``text_dim`` (default ``output_dim``). The base classes
take ``text_dim`` too, so that both share one constructor; for them it must
be None (an error otherwise).
"""
from __future__ import annotations

import torch
from torch import nn

from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.query import QueryProjector


class _AttentionFamily(QueryProjector):
  """What every one shares: ``_init_family`` (the query flow's parts and ``out_proj``).

  Each subclass's ``__init__`` spells out the keyword fields (they are its
  config fields, as ours); the text variants inherit it and set ``text_aware``.
  """

  def _init_family(self, output_dim: int, input_dim: int, text_dim: int | None,
                   **fields) -> int:
    """Validates as ours and builds the shared parts; returns the block width."""
    if not self.text_aware and text_dim is not None:
      raise ValueError(f"projector {self.name!r} does not read the instruction; text_dim must "
                       "be None")
    width = self._init_query(output_dim, input_dim, **fields,
                             text_dim=(text_dim or output_dim) if self.text_aware else None)
    self.out_proj = layers.Dense(width, output_dim)
    return width

  def _cross_self(self, **fields) -> blocks.CrossSelfBlock:
    return blocks.CrossSelfBlock(self.width, self.num_heads, self.mlp_ratio,
                                 context_dim=self.width, text_dim=self.text_dim, **fields)


def _run(stack, x, *args):
  """The blocks in order (ours: a scan), each given the same context ``args``."""
  for block in stack:
    x = block(x, *args)
  return x


@register("cross_attention")
class CrossAttentionProjector(_AttentionFamily):
  """Per layer: a self-attention layer among the queries, then cross-attention + MLP."""
  name = "cross_attention"

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64):
    super().__init__()
    self._init_family(output_dim, input_dim, text_dim, num_queries=num_queries,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      width=width, reconstruction=reconstruction,
                      time_embedding_dim=time_embedding_dim)
    self.layers = nn.ModuleList(self._cross_self(self_layers=1, self_first=True)
                                for _ in range(self.num_layers))

  def mix(self, queries, feats, mask, text, text_mask):
    return _run(self.layers, queries, feats, mask, text, text_mask)


@register("perceiver")
class PerceiverProjector(_AttentionFamily):
  """Latents cross-attend to the features, then ``num_layers`` self-attention
  layers; ``num_iterations`` times, with one set of weights (``share_weights``)
  or one per iteration."""
  name = "perceiver"

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64, num_iterations: int = 2,
               share_weights: bool = False):
    super().__init__()
    self._init_family(output_dim, input_dim, text_dim, num_queries=num_queries,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      width=width, reconstruction=reconstruction,
                      time_embedding_dim=time_embedding_dim)
    if num_iterations < 1:
      raise ValueError(f"projector {self.name!r}: num_iterations must be >= 1, got "
                       f"{num_iterations}")
    self.num_iterations, self.share_weights = num_iterations, share_weights
    block = lambda: self._cross_self(self_layers=num_layers, self_first=False)
    if share_weights:
      self.iteration = block()
    else:
      self.iterations = nn.ModuleList(block() for _ in range(num_iterations))

  def mix(self, queries, feats, mask, text, text_mask):
    stack = ([self.iteration] * self.num_iterations if self.share_weights
             else self.iterations)
    return _run(stack, queries, feats, mask, text, text_mask)


@register("adaptive_query")
class AdaptiveQueryProjector(_AttentionFamily):
  """[queries; visual tokens] through one encoder; queries see everything real,
  visual tokens see visual tokens only; the query outputs are kept."""
  name = "adaptive_query"

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64):
    super().__init__()
    self._init_family(output_dim, input_dim, text_dim, num_queries=num_queries,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      width=width, reconstruction=reconstruction,
                      time_embedding_dim=time_embedding_dim)
    self.layers = nn.ModuleList(
        blocks.JointQueryLayer(self.width, self.num_heads, self.mlp_ratio, self.num_queries,
                               text_dim=self.text_dim) for _ in range(self.num_layers))

  def mix(self, queries, feats, mask, text, text_mask):
    x = torch.cat([queries, feats], dim=1)                             # [B, N + T, W]
    return _run(self.layers, x, mask, text, text_mask)[:, :self.num_queries]


@register("fusion_refinement")
class FusionRefinementProjector(_AttentionFamily):
  """``num_layers`` stages (self-attn, cross-attn, MLP); each refines the previous
  stage's queries and cross-attends to the features and to every earlier
  stage's (normalised) output. The last stage is the output."""
  name = "fusion_refinement"

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64):
    super().__init__()
    self._init_family(output_dim, input_dim, text_dim, num_queries=num_queries,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      width=width, reconstruction=reconstruction,
                      time_embedding_dim=time_embedding_dim)
    for s in range(self.num_layers):
      self.add_module(f"stage{s}", blocks.QueryBlock(
          self.width, self.num_heads, self.mlp_ratio, context_dim=self.width,
          text_dim=self.text_dim))
      if s < self.num_layers - 1:
        self.add_module(f"memory_norm{s}", layers.LayerNorm(self.width))

  def mix(self, queries, feats, mask, text, text_mask):
    memory, memory_mask = [feats], [mask]
    x = queries
    for s in range(self.num_layers):
      x = getattr(self, f"stage{s}")(x, torch.cat(memory, dim=1), torch.cat(memory_mask, dim=1),
                                     text, text_mask)
      if s < self.num_layers - 1:
        memory.append(getattr(self, f"memory_norm{s}")(x))
        memory_mask.append(blocks.ones_mask(x))
    return x


@register("gated_cross_attention")
class GatedCrossAttentionProjector(_AttentionFamily):
  """Per layer: cross-attention and MLP with tanh(gate) residuals (gates start
  at zero, Flamingo), then an ungated self-attention layer among the queries."""
  name = "gated_cross_attention"

  def __init__(self, output_dim: int, input_dim: int, text_dim: int | None = None, *,
               num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
               mlp_ratio: int = 4, width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64):
    super().__init__()
    self._init_family(output_dim, input_dim, text_dim, num_queries=num_queries,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      width=width, reconstruction=reconstruction,
                      time_embedding_dim=time_embedding_dim)
    self.layers = nn.ModuleList(self._cross_self(self_layers=1, self_first=False, gated=True)
                                for _ in range(self.num_layers))

  def mix(self, queries, feats, mask, text, text_mask):
    return _run(self.layers, queries, feats, mask, text, text_mask)


# The text variants: the same modules, with the text cross-attention sub-layers.

@register("text_cross_attention")
class TextCrossAttentionProjector(CrossAttentionProjector):
  """cross_attention with a text cross-attention sub-layer in every block."""
  name = "text_cross_attention"
  text_aware = True


@register("text_perceiver")
class TextPerceiverProjector(PerceiverProjector):
  """perceiver whose latents also cross-attend to the text in every iteration."""
  name = "text_perceiver"
  text_aware = True


@register("text_adaptive_query")
class TextAdaptiveQueryProjector(AdaptiveQueryProjector):
  """adaptive_query whose query rows also cross-attend to the text in every layer."""
  name = "text_adaptive_query"
  text_aware = True


@register("text_fusion_refinement")
class TextFusionRefinementProjector(FusionRefinementProjector):
  """fusion_refinement with a text cross-attention sub-layer in every stage."""
  name = "text_fusion_refinement"
  text_aware = True


@register("text_gated_cross_attention")
class TextGatedCrossAttentionProjector(GatedCrossAttentionProjector):
  """gated_cross_attention with a tanh-gated (closed at init) text cross-attention."""
  name = "text_gated_cross_attention"
  text_aware = True
