"""``qformer``, ``enhanced_qformer``, ``blip2_qformer``; ours are in models/projectors/query.py.

The shared query flow: ``input`` (Dense + time embedding, LayerNorm, padded
frames zeroed), ``queries`` (a learned [N, W] table) read the frames through a
projector-specific mix of ``blocks``, then a readout to ``output_dim``; every
output token is real. With ``reconstruction`` ours trains an auxiliary loss;
its module (``reconstruction``) is built here too so that the exported state
dict loads whole, but inference never runs it.

``QueryProjector`` is the base for the family: a subclass calls
``_init_query`` from its ``__init__`` (whose keyword-only arguments are the
config fields) and defines ``mix``; a text-aware one passes ``text_dim``.
"""
from __future__ import annotations

from torch import nn

from vsrllm_jax.torch_port import blocks, layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


class QueryProjector(Projector):
  """Fields and flow shared by the query family; subclasses define ``mix``."""
  final_norm = True                 # class-level: LayerNorm before the readout
  name = "query"                    # the catalog name, for errors

  def _init_query(self, output_dim: int, input_dim: int, *, num_queries: int, num_layers: int,
                  num_heads: int, mlp_ratio: int, width: int | None, reconstruction: bool,
                  time_embedding_dim: int, text_dim: int | None = None) -> int:
    """Validates the fields as ours and builds the shared parts; returns the block width."""
    width = width or output_dim
    where = f"projector {self.name!r}"
    for key, value in (("num_queries", num_queries), ("num_layers", num_layers),
                       ("mlp_ratio", mlp_ratio), ("time_embedding_dim", time_embedding_dim)):
      if value < 1:
        raise ValueError(f"{where}: {key} must be >= 1, got {value}")
    blocks.head_dim(width, num_heads, f"{where} (fields width, num_heads)")
    self.width, self.text_dim = width, text_dim
    self.num_queries, self.num_layers = num_queries, num_layers
    self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
    self.input = blocks.InputProjection(input_dim, width, time_embedding_dim)
    self.queries = blocks.queries_param(num_queries, width)
    if self.final_norm:
      self.out_norm = layers.LayerNorm(width)
    if reconstruction:     # training only: built so that the state dict loads whole
      self.reconstruction = blocks.ReconstructionLoss(
          output_dim, input_dim, width, num_heads, time_embedding_dim=time_embedding_dim)
    return width

  def mix(self, queries, feats, mask, text, text_mask):
    """queries [B,N,W], feats [B,T,W], mask [B,T] (+ optional text) -> [B,N,W]."""
    raise NotImplementedError(f"{type(self).__name__} must define mix()")

  def readout(self, x):
    """[B, N, W] -> [B, N, output_dim]: ``out_norm`` (if final_norm), ``out_proj``."""
    if self.final_norm:
      x = self.out_norm(x)
    return self.out_proj(x)

  def forward(self, features, mask, text=None, text_mask=None):
    if self.text_aware:
      if text is None or text_mask is None:
        raise ValueError(f"projector {self.name!r} is text-aware: it needs text and text_mask")
      text_mask = text_mask.bool()
    else:
      text = text_mask = None
    mask = mask.bool()
    feats = self.input(features, mask)                                   # [B, T, W]
    queries = blocks.learned_queries(self.queries.to(feats.dtype), features.shape[0])
    tokens = self.readout(self.mix(queries, feats, mask, text, text_mask))   # [B, N, E]
    return ProjectorOutput(tokens, blocks.ones_mask(tokens))


class _QFormerBase(QueryProjector):
  """Scanned pre-LN QueryBlocks (``layers``); Dense or MLP readout."""

  def _init_qformer(self, output_dim: int, input_dim: int, output_mlp_ratio: int,
                    **fields) -> None:
    width = self._init_query(output_dim, input_dim, **fields)
    if output_mlp_ratio < 0:
      raise ValueError(f"projector {self.name!r}: output_mlp_ratio must be >= 0, got "
                       f"{output_mlp_ratio}")
    self.layers = nn.ModuleList(
        blocks.QueryBlock(width, self.num_heads, self.mlp_ratio, context_dim=width,
                          text_dim=self.text_dim) for _ in range(self.num_layers))
    if output_mlp_ratio:
      self.out_mlp = layers.Mlp(width, output_mlp_ratio * width, output_dim)
    else:
      self.out_proj = layers.Dense(width, output_dim)
    self.output_mlp_ratio = output_mlp_ratio

  def mix(self, queries, feats, mask, text, text_mask):
    x = queries
    for layer in self.layers:
      x = layer(x, feats, mask, text, text_mask)
    return x

  def readout(self, x):
    if not self.output_mlp_ratio:
      return super().readout(x)
    return self.out_mlp(self.out_norm(x))


@register("qformer")
class QFormerProjector(_QFormerBase):
  """Learned queries; layers of self-attn, cross-attn to the features, MLP (BLIP-2)."""
  name = "qformer"

  def __init__(self, output_dim: int, input_dim: int, *, num_queries: int = 32,
               num_layers: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
               width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64, output_mlp_ratio: int = 0):
    super().__init__()
    self._init_qformer(output_dim, input_dim, output_mlp_ratio, num_queries=num_queries,
                       num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                       width=width, reconstruction=reconstruction,
                       time_embedding_dim=time_embedding_dim)


@register("enhanced_qformer")
class EnhancedQFormerProjector(_QFormerBase):
  """The qformer, deeper and wider: more layers and heads, an MLP readout."""
  name = "enhanced_qformer"

  def __init__(self, output_dim: int, input_dim: int, *, num_queries: int = 32,
               num_layers: int = 4, num_heads: int = 8, mlp_ratio: int = 4,
               width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64, output_mlp_ratio: int = 2):
    super().__init__()
    self._init_qformer(output_dim, input_dim, output_mlp_ratio, num_queries=num_queries,
                       num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                       width=width, reconstruction=reconstruction,
                       time_embedding_dim=time_embedding_dim)


@register("blip2_qformer")
class Blip2QFormerProjector(QueryProjector):
  """BERT-style Q-Former: ``query_norm``, post-LN ``layer{i}`` with cross-attention every
  ``cross_attention_frequency`` layers (from the first), Dense readout ``out_proj``."""
  name = "blip2_qformer"
  final_norm = False                # post-LN layers end normalised

  def __init__(self, output_dim: int, input_dim: int, *, num_queries: int = 32,
               num_layers: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
               width: int | None = None, reconstruction: bool = False,
               time_embedding_dim: int = 64, cross_attention_frequency: int = 1):
    super().__init__()
    width = self._init_query(output_dim, input_dim, num_queries=num_queries,
                             num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio,
                             width=width, reconstruction=reconstruction,
                             time_embedding_dim=time_embedding_dim)
    if cross_attention_frequency < 1:
      raise ValueError(f"projector {self.name!r}: cross_attention_frequency must be >= 1, got "
                       f"{cross_attention_frequency}")
    self.query_norm = layers.LayerNorm(width)
    for i in range(num_layers):
      cross = i % cross_attention_frequency == 0
      self.add_module(f"layer{i}", blocks.PostLNQueryBlock(
          width, num_heads, mlp_ratio, cross_attention=cross, context_dim=width,
          text_dim=self.text_dim if cross else None))
    self.out_proj = layers.Dense(width, output_dim)

  def mix(self, queries, feats, mask, text, text_mask):
    x = self.query_norm(queries)
    for i in range(self.num_layers):
      x = getattr(self, f"layer{i}")(x, feats, mask, text, text_mask)
    return x
