"""Torch mirrors of ``vsrllm_jax/models/projectors/blocks.py`` (the query family's blocks).

Same submodule names and math as ours. Ours create the text cross-attention
only when called with a text; here a block has it when built with
``text_dim`` (the instruction embedding width), and calling it with or
without a text against how it was built is an error, since the parameters
would not match. Blocks return ``x`` (ours return ``(x, None)`` for scan).
"""
from __future__ import annotations

import torch
from torch import nn

from vsrllm_jax.torch_port import layers


def head_dim(width: int, num_heads: int, where: str) -> int:
  """Per-head width; ``where`` names the config keys in the error."""
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"{where}: width {width} must be a positive multiple of num_heads "
                     f"({num_heads})")
  return width // num_heads


def queries_param(num_queries: int, width: int) -> nn.Parameter:
  """A learned [N, W] query table (ours: normal(0.02) init, axes 'queries', 'embed')."""
  return nn.Parameter(torch.randn(num_queries, width) * 0.02)


def learned_queries(queries: torch.Tensor, batch_size: int) -> torch.Tensor:
  """[N, W] -> [B, N, W]."""
  return queries[None].expand(batch_size, -1, -1)


def ones_mask(x: torch.Tensor) -> torch.Tensor:
  """All-real mask [B, S] for a token sequence x [B, S, ...] (learned queries)."""
  return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


def _check_text(block: str, text_dim, text, text_mask):
  if (text is None) != (text_dim is None):
    raise ValueError(f"{block} was built with text_dim={text_dim} but called with "
                     f"text={'None' if text is None else tuple(text.shape)}: build it with "
                     "text_dim exactly when it is called with the instruction embeddings")
  if text is not None and text_mask is None:
    raise ValueError(f"{block}: text needs text_mask [B, L]")


class InputProjection(nn.Module):
  """features [B, T, D] -> [B, T, W]: Dense + Dense(sinusoid of the frame index), LayerNorm,
  padded frames zeroed."""

  def __init__(self, in_dim: int, width: int, time_embedding_dim: int = 64):
    super().__init__()
    self.time_embedding_dim = time_embedding_dim
    self.proj = layers.Dense(in_dim, width)
    self.time = layers.Dense(2 * (time_embedding_dim // 2), width, bias=False)
    self.norm = layers.LayerNorm(width)

  def forward(self, features, mask):
    x = self.proj(features)
    pos = torch.arange(features.shape[1], device=features.device)
    time = self.time(layers.sinusoid(pos, self.time_embedding_dim))     # [T, W]
    x = self.norm(x + time[None])
    return torch.where(mask[..., None].bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


class _Gate(nn.Module):
  """Shared by the sub-layers: ``tanh(gate)`` (a scalar, 0 at init) when gated, else 1."""

  def _init_gate(self, gated: bool):
    self.gated = gated
    if gated:
      self.gate = nn.Parameter(torch.zeros(()))

  def _gate(self):
    return torch.tanh(self.gate) if self.gated else 1.0


class AttentionSublayer(_Gate):
  """Pre-LN residual attention ``x + g * MHA(LN(x), context)``; context=None is self-attention."""

  def __init__(self, width: int, num_heads: int, gated: bool = False, *,
               context_dim: int | None = None):
    super().__init__()
    self.norm = layers.LayerNorm(width)
    self.attn = layers.MultiHeadAttention(width, num_heads, width // num_heads,
                                          context_dim=context_dim)
    self._init_gate(gated)

  def forward(self, x, context, context_mask):
    return x + self._gate() * self.attn(self.norm(x), context_mask, context)


class MlpSublayer(_Gate):
  """Pre-LN residual MLP ``x + g * Mlp(LN(x))``."""

  def __init__(self, width: int, mlp_ratio: int, gated: bool = False):
    super().__init__()
    self.norm = layers.LayerNorm(width)
    self.mlp = layers.Mlp(width, mlp_ratio * width)
    self._init_gate(gated)

  def forward(self, x):
    return x + self._gate() * self.mlp(self.norm(x))


class QueryBlock(nn.Module):
  """Pre-LN: [self-attn among queries], cross-attn to context, [to text], MLP."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, self_attention: bool = True,
               gated: bool = False, context_dim: int | None = None, text_dim: int | None = None):
    super().__init__()
    self.text_dim = text_dim
    if self_attention:
      self.self_attn = AttentionSublayer(width, num_heads)
    self.self_attention = self_attention
    self.cross_attn = AttentionSublayer(width, num_heads, gated, context_dim=context_dim)
    if text_dim is not None:
      self.text_cross_attn = AttentionSublayer(width, num_heads, gated, context_dim=text_dim)
    self.mlp = MlpSublayer(width, mlp_ratio, gated)

  def forward(self, x, context, context_mask, text=None, text_mask=None):
    _check_text("QueryBlock", self.text_dim, text, text_mask)
    if self.self_attention:
      x = self.self_attn(x, None, ones_mask(x))
    x = self.cross_attn(x, context, context_mask)
    if text is not None:
      x = self.text_cross_attn(x, text, text_mask)
    return self.mlp(x)


class CrossSelfBlock(nn.Module):
  """A cross-attention QueryBlock (``cross``) and ``self_layers`` TransformerLayers
  (``self0``, ...): self first when ``self_first``, else cross first."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, self_layers: int = 1,
               self_first: bool = False, gated: bool = False, context_dim: int | None = None,
               text_dim: int | None = None):
    super().__init__()
    self.self_layers, self.self_first = self_layers, self_first
    for i in range(self_layers):
      setattr(self, f"self{i}", layers.TransformerLayer(width, num_heads, width // num_heads,
                                                        mlp_ratio * width))
    self.cross = QueryBlock(width, num_heads, mlp_ratio, self_attention=False, gated=gated,
                            context_dim=context_dim, text_dim=text_dim)

  def _self_attend(self, x):
    for i in range(self.self_layers):
      x = getattr(self, f"self{i}")(x, ones_mask(x))
    return x

  def forward(self, x, context, context_mask, text=None, text_mask=None):
    if self.self_first:
      x = self._self_attend(x)
    x = self.cross(x, context, context_mask, text, text_mask)
    if not self.self_first:
      x = self._self_attend(x)
    return x


class PostLNQueryBlock(nn.Module):
  """BERT-style (post-LN) Q-Former layer, the BLIP-2 layout."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, cross_attention: bool = True,
               context_dim: int | None = None, text_dim: int | None = None):
    super().__init__()
    mha = lambda ctx=None: layers.MultiHeadAttention(width, num_heads, width // num_heads,
                                                     context_dim=ctx)
    self.cross_attention, self.text_dim = cross_attention, text_dim
    self.self_norm, self.self_attn = layers.LayerNorm(width), mha()
    if cross_attention:
      self.cross_norm, self.cross_attn = layers.LayerNorm(width), mha(context_dim)
      if text_dim is not None:
        self.text_cross_norm, self.text_cross_attn = layers.LayerNorm(width), mha(text_dim)
    self.mlp = layers.Mlp(width, mlp_ratio * width)
    self.mlp_norm = layers.LayerNorm(width)

  def forward(self, x, context, context_mask, text=None, text_mask=None):
    x = self.self_norm(x + self.self_attn(x, ones_mask(x)))
    if self.cross_attention:
      _check_text("PostLNQueryBlock", self.text_dim, text, text_mask)
      x = self.cross_norm(x + self.cross_attn(x, context_mask, context))
      if text is not None:
        x = self.text_cross_norm(x + self.text_cross_attn(x, text_mask, text))
    return self.mlp_norm(x + self.mlp(x))


class JointQueryLayer(nn.Module):
  """Pre-LN layer over [queries; visual tokens] [B, N + T, W] with our block mask:
  queries see queries and real visual tokens, visual tokens see real visual tokens;
  the optional text is cross-attended by the query rows only."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, num_queries: int, *,
               text_dim: int | None = None):
    super().__init__()
    self.num_queries, self.text_dim = num_queries, text_dim
    self.attn_norm = layers.LayerNorm(width)
    self.attn = layers.MultiHeadAttention(width, num_heads, width // num_heads)
    if text_dim is not None:
      self.text_cross_attn = AttentionSublayer(width, num_heads, context_dim=text_dim)
    self.mlp = MlpSublayer(width, mlp_ratio)

  def forward(self, x, visual_mask, text=None, text_mask=None):
    _check_text("JointQueryLayer", self.text_dim, text, text_mask)
    n = self.num_queries
    h = self.attn_norm(x)
    all_mask = torch.cat([ones_mask(h[:, :n]), visual_mask.bool()], dim=1)
    q_out = self.attn(h[:, :n], all_mask, h)
    v_out = self.attn(h[:, n:], visual_mask, h[:, n:])
    x = x + torch.cat([q_out, v_out], dim=1)
    if text is not None:
      q = self.text_cross_attn(x[:, :n], text, text_mask)
      x = torch.cat([q, x[:, n:]], dim=1)
    return self.mlp(x)


def masked_mse(pred, target, mask):
  """MSE over the real rows of ``mask`` [B, T] and every feature (0 when none is real)."""
  err = torch.square(pred.float() - target.float())
  m = mask.float()[..., None]
  return torch.sum(err * m) / torch.clamp(torch.sum(m) * pred.shape[-1], min=1.0)


class ReconstructionLoss(nn.Module):
  """Ours: per-frame queries (Dense of a sinusoid, ``position``) cross-attend to the tokens
  (``decoder``), LayerNorm, Dense to the feature width (``out``); MSE on real frames.

  A training loss: exported so that a projector's state dict loads whole.
  Returns (loss, reconstruction [B, T, D]).
  """

  def __init__(self, token_dim: int, feature_dim: int, width: int, num_heads: int = 4,
               mlp_ratio: int = 2, time_embedding_dim: int = 64):
    super().__init__()
    self.width, self.time_embedding_dim = width, time_embedding_dim
    self.position = layers.Dense(2 * (time_embedding_dim // 2), width, bias=False)
    self.decoder = QueryBlock(width, num_heads, mlp_ratio, self_attention=False,
                              context_dim=token_dim)
    self.norm = layers.LayerNorm(width)
    self.out = layers.Dense(width, feature_dim)

  def forward(self, tokens, token_mask, features, features_mask):
    b, t, _ = features.shape
    pos = torch.arange(t, device=features.device)
    q = self.position(layers.sinusoid(pos, self.time_embedding_dim))     # [T, W]
    q = q[None].expand(b, t, self.width)
    q = self.decoder(q, tokens, token_mask.bool())
    pred = self.out(self.norm(q))                                        # [B, T, D]
    return masked_mse(pred, features, features_mask.bool()), pred
