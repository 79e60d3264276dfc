"""Shared blocks of the query-based projectors, and the reconstruction loss.

The catalog's query family (qformer, cross_attention, perceiver, ...) is a set
of compositions of these blocks; only their order, gating and masks differ.

Every cross-attending block takes the visual features as ``context`` [B, T, W]
with ``context_mask`` [B, T] (padded frames are never attended to) and,
optionally, a second source ``text`` [B, L, E] with ``text_mask`` [B, L]: when
given, one more cross-attention sub-layer, to the text, follows the visual one
(its parameters exist only then), so that text-aware variants are the same
compositions called with one more argument. Blocks return ``(x, None)`` so
that ``layers.scan_layers`` can stack them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.multiscale_contrastive import sinusoid

Dtype = Any


def head_dim(width: int, num_heads: int, where: str) -> int:
  """Per-head width; ``where`` names the config keys in the error."""
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"{where}: width {width} must be a positive multiple of num_heads "
                     f"({num_heads})")
  return width // num_heads


def learned_queries(module: nn.Module, num_queries: int, width: int, batch_size: int,
                    name: str = "queries") -> jax.Array:
  """A [N, W] parameter of ``module`` (axes 'queries', 'embed') broadcast to [B, N, W]."""
  queries = module.param(name, layers.with_axes(nn.initializers.normal(0.02),
                                                ("queries", "embed")),
                         (num_queries, width), module.param_dtype)
  queries = jnp.asarray(queries, module.dtype)
  return jnp.broadcast_to(queries, (batch_size,) + queries.shape)


def ones_mask(x: jax.Array) -> jax.Array:
  """All-real mask [B, S] for a token sequence x [B, S, ...] (learned queries)."""
  return jnp.ones(x.shape[:2], bool)


class InputProjection(nn.Module):
  """features [B, T, D] -> [B, T, W]: Dense, plus a time embedding, LayerNorm.

  Attention is blind to order, so the frame index enters as a sinusoid
  (through a bias-free Dense). Padded frames are zeroed, so whatever they hold
  never reaches an output even before masking.
  """
  width: int
  time_embedding_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.Dense(self.width, ("features", "embed"), name="proj", **kw)(features)
    time = layers.Dense(self.width, (None, "embed"), use_bias=False, name="time", **kw)(
        sinusoid(jnp.arange(features.shape[1]), self.time_embedding_dim))   # [T, W]
    x = layers.LayerNorm(name="norm", **kw)(x + time[None])
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


class AttentionSublayer(nn.Module):
  """Pre-LN residual attention: ``x + g * MHA(LN(x), context)``.

  ``context=None`` is self-attention. With ``gated`` the residual is scaled by
  ``g = tanh(alpha)``, alpha a scalar initialised at zero (Flamingo), so the
  sub-layer starts as the identity; otherwise g = 1.
  """
  num_heads: int
  gated: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(name="norm", **kw)(x)
    y = layers.MultiHeadAttention(self.num_heads, x.shape[-1] // self.num_heads, name="attn",
                                  **kw)(h, context_mask, context)
    return x + _gate(self, self.gated) * y


class MlpSublayer(nn.Module):
  """Pre-LN residual MLP ``x + g * Mlp(LN(x))`` (g as in AttentionSublayer)."""
  mlp_ratio: int
  gated: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(name="norm", **kw)(x)
    y = layers.Mlp(self.mlp_ratio * x.shape[-1], name="mlp", **kw)(h)
    return x + _gate(self, self.gated) * y


def _gate(module: nn.Module, gated: bool):
  if not gated:
    return 1.0
  alpha = module.param("gate", layers.with_axes(nn.initializers.zeros, ()), (), module.param_dtype)
  return jnp.tanh(jnp.asarray(alpha, module.dtype))


class QueryBlock(nn.Module):
  """Pre-LN: [self-attn among queries], cross-attn to context, [to text], MLP.

  With ``self_attention`` this is the Q-Former layer; without it, the
  cross-attention block (Perceiver's cross-attend). ``gated`` gates the
  cross-attention and MLP residuals (Flamingo's gated xattn-dense).
  """
  num_heads: int
  mlp_ratio: int
  self_attention: bool = True
  gated: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask, text=None, text_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.self_attention:
      x = AttentionSublayer(self.num_heads, name="self_attn", **kw)(x, None, ones_mask(x))
    x = AttentionSublayer(self.num_heads, self.gated, name="cross_attn", **kw)(
        x, context, context_mask)
    if text is not None:
      x = AttentionSublayer(self.num_heads, self.gated, name="text_cross_attn", **kw)(
          x, text, text_mask)
    return MlpSublayer(self.mlp_ratio, self.gated, name="mlp", **kw)(x), None


class CrossSelfBlock(nn.Module):
  """A cross-attention QueryBlock and ``self_layers`` self-attention layers.

  ``self_first``: self-attention, then cross-attention (cross_attention);
  otherwise cross then self (perceiver; gated_cross_attention with ``gated``,
  where the self-attention layers stay ungated as Flamingo's LM layers do).
  """
  num_heads: int
  mlp_ratio: int
  self_layers: int = 1
  self_first: bool = False
  gated: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask, text=None, text_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]

    def self_attend(x):
      for i in range(self.self_layers):
        x, _ = layers.TransformerLayer(self.num_heads, width // self.num_heads,
                                       self.mlp_ratio * width, name=f"self{i}", **kw)(
                                           x, ones_mask(x))
      return x

    if self.self_first:
      x = self_attend(x)
    x, _ = QueryBlock(self.num_heads, self.mlp_ratio, self_attention=False, gated=self.gated,
                      name="cross", **kw)(x, context, context_mask, text, text_mask)
    if not self.self_first:
      x = self_attend(x)
    return x, None


class PostLNQueryBlock(nn.Module):
  """BERT-style (post-LN) Q-Former layer, the BLIP-2 layout.

  ``x = LN(x + SelfAttn(x))``; with ``cross_attention``
  ``x = LN(x + CrossAttn(x, context))`` (and the same to the text, if given);
  ``x = LN(x + FFN(x))``.
  """
  num_heads: int
  mlp_ratio: int
  cross_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, context_mask, text=None, text_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    mha = lambda name: layers.MultiHeadAttention(self.num_heads, width // self.num_heads,
                                                 name=name, **kw)
    x = layers.LayerNorm(name="self_norm", **kw)(x + mha("self_attn")(x, ones_mask(x)))
    if self.cross_attention:
      x = layers.LayerNorm(name="cross_norm", **kw)(
          x + mha("cross_attn")(x, context_mask, context))
      if text is not None:
        x = layers.LayerNorm(name="text_cross_norm", **kw)(
            x + mha("text_cross_attn")(x, text_mask, text))
    y = layers.Mlp(self.mlp_ratio * width, name="mlp", **kw)(x)
    return layers.LayerNorm(name="mlp_norm", **kw)(x + y), None


class JointQueryLayer(nn.Module):
  """One pre-LN encoder layer over [queries; visual tokens] with a block mask.

  x [B, N + T, W]; the first ``num_queries`` rows are queries. Queries attend
  to all queries and real visual tokens; visual tokens attend to real visual
  tokens only (so they stay a function of the video). One attention module
  serves both row groups (shared weights, two key sets). The optional text is
  cross-attended by the query rows only.
  """
  num_heads: int
  mlp_ratio: int
  num_queries: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, visual_mask, text=None, text_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = self.num_queries
    h = layers.LayerNorm(name="attn_norm", **kw)(x)
    attn = layers.MultiHeadAttention(self.num_heads, x.shape[-1] // self.num_heads, name="attn",
                                     **kw)
    all_mask = jnp.concatenate([ones_mask(h[:, :n]), visual_mask], axis=1)
    q_out = attn(h[:, :n], all_mask, h)
    v_out = attn(h[:, n:], visual_mask, h[:, n:])
    x = x + jnp.concatenate([q_out, v_out], axis=1)
    if text is not None:
      q = AttentionSublayer(self.num_heads, name="text_cross_attn", **kw)(x[:, :n], text, text_mask)
      x = jnp.concatenate([q, x[:, n:]], axis=1)
    return MlpSublayer(self.mlp_ratio, name="mlp", **kw)(x), None


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the real rows of ``mask`` [B, T] and every feature.

  pred, target: [B, T, D]. Returns 0 when no row is real.
  """
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(err * m) / jnp.maximum(jnp.sum(m) * pred.shape[-1], 1.0)


class ReconstructionLoss(nn.Module):
  """MSE of the frozen encoder features reconstructed from the projected tokens.

  Keeps the tokens informative about every frame (a query bottleneck may
  otherwise drop whatever the LM loss does not reward yet). One query per
  frame (a sinusoid of its index through a Dense, width ``width``)
  cross-attends to the tokens (a QueryBlock without self-attention); a
  LayerNorm and Dense map it to the feature width. Only real frames count.

  Call: ``(tokens [B,N,E], token_mask [B,N], features [B,T,D], features_mask
  [B,T]) -> scalar``; the reconstruction [B,T,D] is sown as
  ``intermediates/reconstruction``.
  """
  width: int
  num_heads: int = 4
  mlp_ratio: int = 2
  time_embedding_dim: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, token_mask, features, features_mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, d = features.shape
    pos = layers.Dense(self.width, (None, "embed"), use_bias=False, name="position", **kw)(
        sinusoid(jnp.arange(t), self.time_embedding_dim))               # [T, W]
    q = jnp.broadcast_to(pos[None], (b, t, self.width))
    q, _ = QueryBlock(self.num_heads, self.mlp_ratio, self_attention=False, name="decoder",
                      **kw)(q, tokens, token_mask.astype(bool))
    q = layers.LayerNorm(name="norm", **kw)(q)
    pred = layers.Dense(d, ("embed", "features"), name="out", **kw)(q)     # [B, T, D]
    self.sow("intermediates", "reconstruction", pred)
    return masked_mse(pred, jax.lax.stop_gradient(features), features_mask.astype(bool))
