"""Query-based projectors: the shared flow, and the Q-Former family.

Every query projector runs the same flow: the features get an input projection
with a time embedding (``blocks.InputProjection``), ``num_queries`` learned
queries read them through a projector-specific ``mix`` of ``blocks``, a
readout maps the queries to ``output_dim``, and with ``reconstruction`` the
auxiliary ``reconstruction`` loss asks the tokens to reconstruct the features.
Padded frames are key-masked everywhere, so extra padding changes nothing.

A subclass with ``text_aware = True`` receives the instruction text as a
second source in every block (``text`` [B, L, E], ``text_mask`` [B, L]).

Registered here: qformer, enhanced_qformer (BLIP-2 Q-Former, pre-LN), and
blip2_qformer (the BERT-style post-LN layout).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
import vsrllm_jax.models.projectors.blocks as blocks
from vsrllm_jax.models.projectors.registry import CATALOG, register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


class QueryProjector(Projector):
  """Fields and flow shared by the query family; subclasses define ``mix``."""
  num_queries: int = 32
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  width: int | None = None          # block width; default output_dim
  reconstruction: bool = False      # add aux loss 'reconstruction' (needs a loss weight)
  time_embedding_dim: int = 64

  final_norm = True                 # class-level: LayerNorm before the readout

  def catalog_name(self) -> str:
    return CATALOG.name_of(type(self)) or type(self).__name__

  def check_fields(self) -> int:
    """Validates the fields; returns the block width."""
    width = self.width or self.output_dim
    where = f"projector {self.catalog_name()!r}"
    for key in ("num_queries", "num_layers", "mlp_ratio", "time_embedding_dim"):
      if getattr(self, key) < 1:
        raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
    blocks.head_dim(width, self.num_heads, f"{where} (fields width, num_heads)")
    return width

  def mix(self, queries, feats, mask, text, text_mask):
    """queries [B,N,W], feats [B,T,W], mask [B,T] (+ optional text) -> [B,N,W]."""
    raise NotImplementedError(f"{type(self).__name__} must define mix()")

  def readout(self, x):
    """[B, N, W] -> [B, N, output_dim]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.final_norm:
      x = layers.LayerNorm(name="out_norm", **kw)(x)
    return layers.Dense(self.output_dim, ("mlp", "embed"), name="out_proj", **kw)(x)

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del train
    width = self.check_fields()
    if type(self).text_aware:
      if text is None or text_mask is None:
        raise ValueError(f"projector {self.catalog_name()!r} is text-aware: it needs text and "
                         "text_mask")
      text_mask = text_mask.astype(bool)
    else:
      text = text_mask = None
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = features_mask.astype(bool)
    feats = blocks.InputProjection(width, self.time_embedding_dim, name="input", **kw)(
        features, mask)                                                  # [B, T, W]
    queries = blocks.learned_queries(self, self.num_queries, width, features.shape[0])
    tokens = self.readout(self.mix(queries, feats, mask, text, text_mask))   # [B, N, E]
    token_mask = blocks.ones_mask(tokens)
    aux = {}
    if self.reconstruction:
      aux["reconstruction"] = blocks.ReconstructionLoss(
          width, self.num_heads, time_embedding_dim=self.time_embedding_dim,
          name="reconstruction", **kw)(tokens, token_mask, features, mask)
    return ProjectorOutput(tokens=tokens, mask=token_mask, aux_losses=aux,
                           embeddings={"pooled": jnp.mean(tokens, axis=1)})


def scan_blocks(block_cls, num_layers: int, name: str, fields: dict, x, *broadcast) -> jax.Array:
  """Runs ``num_layers`` copies of a block under ``nn.scan`` (params on 'layers')."""
  stack = layers.scan_layers(block_cls, num_layers, num_broadcast=len(broadcast))
  x, _ = stack(**fields, name=name)(x, *broadcast)
  return x


@register("qformer")
class QFormerProjector(QueryProjector):
  """Learned queries; layers of self-attn, cross-attn to the features, MLP (BLIP-2)."""
  output_mlp_ratio: int = 0         # 0: Dense readout; k: MLP readout of hidden k * width

  def mix(self, queries, feats, mask, text, text_mask):
    fields = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    return scan_blocks(blocks.QueryBlock, self.num_layers, "layers", fields, queries, feats,
                       mask, text, text_mask)

  def readout(self, x):
    if self.output_mlp_ratio < 0:
      raise ValueError(f"projector {self.catalog_name()!r}: output_mlp_ratio must be >= 0, got "
                       f"{self.output_mlp_ratio}")
    if not self.output_mlp_ratio:
      return super().readout(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(name="out_norm", **kw)(x)
    return layers.Mlp(self.output_mlp_ratio * x.shape[-1], out_dim=self.output_dim,
                      name="out_mlp", **kw)(x)


@register("enhanced_qformer")
class EnhancedQFormerProjector(QFormerProjector):
  """The qformer, deeper and wider: more layers and heads, an MLP readout."""
  num_layers: int = 4
  num_heads: int = 8
  output_mlp_ratio: int = 2


@register("blip2_qformer")
class Blip2QFormerProjector(QueryProjector):
  """BERT-style Q-Former: LayerNorm on the queries, post-LN layers, cross-attention
  every ``cross_attention_frequency`` layers (from the first), Dense readout."""
  cross_attention_frequency: int = 1

  final_norm = False                # post-LN layers end normalised

  def mix(self, queries, feats, mask, text, text_mask):
    if self.cross_attention_frequency < 1:
      raise ValueError(f"projector {self.catalog_name()!r}: cross_attention_frequency must be "
                       f">= 1, got {self.cross_attention_frequency}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(name="query_norm", **kw)(queries)
    for i in range(self.num_layers):
      x, _ = blocks.PostLNQueryBlock(
          self.num_heads, self.mlp_ratio, cross_attention=i % self.cross_attention_frequency == 0,
          name=f"layer{i}", **kw)(x, feats, mask, text, text_mask)
    return x
