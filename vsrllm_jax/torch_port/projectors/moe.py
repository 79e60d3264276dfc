"""``hierarchical_moe``: ours (models/projectors/moe.py) in PyTorch, inference outputs only.

Stage 1 runs at frame rate; every later stage first average-pools time by
``pool`` (masked). Each stage holds ``layers_per_stage`` pre-LN blocks of
masked self-attention and a routed mixture-of-experts FFN (``MoeFfn``).

Routing is ours exactly: softmax router (fp32, plus an optional per-clip
``router_bias``), top-k with ties going to the lower expert index (as
``jax.lax.top_k``; a stable descending sort here, since ``torch.topk`` does
not promise an order among ties), gates renormalised to sum 1 when
``top_k > 1`` and the raw top-1 probability when ``top_k == 1``; dense
dispatch, no capacity, no dropped token. The routing loss is training-only
and left out. The experts' stacked ``wi``/``bi``/``wo``/``bo`` keep our
names and [E, in, out] layout.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from vsrllm_jax.torch_port import layers
from vsrllm_jax.torch_port.projectors.registry import register
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput


def route(logits: torch.Tensor, top_k: int) -> torch.Tensor:
  """Router logits [..., E] (fp32) -> combine weights [..., E], zero outside the top-k."""
  probs = torch.softmax(logits.float(), dim=-1)
  top_probs, top_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
  top_probs, top_idx = top_probs[..., :top_k], top_idx[..., :top_k]
  gates = top_probs / torch.sum(top_probs, dim=-1, keepdim=True) if top_k > 1 else top_probs
  return torch.zeros_like(probs).scatter(-1, top_idx, gates)


class MoeFfn(nn.Module):
  """Top-k routed expert FFNs (Dense-GELU-Dense each), dense dispatch.

  x [B, S, D], router_bias [B, E] or None -> y [B, S, D].
  """

  def __init__(self, width: int, num_experts: int, top_k: int, hidden_dim: int):
    super().__init__()
    e, k = num_experts, top_k
    if e < 1 or not 1 <= k <= e:
      raise ValueError(f"projector MoE needs num_experts >= 1 and 1 <= top_k <= num_experts; "
                       f"got num_experts={e}, top_k={k}")
    self.num_experts, self.top_k = e, k
    self.router = layers.Dense(width, e)
    self.wi = nn.Parameter(torch.randn(e, width, hidden_dim) * 0.02)
    self.bi = nn.Parameter(torch.zeros(e, hidden_dim))
    self.wo = nn.Parameter(torch.randn(e, hidden_dim, width) * 0.02)
    self.bo = nn.Parameter(torch.zeros(e, width))

  def forward(self, x, router_bias=None):
    b, e = x.shape[0], self.num_experts
    # Ours computes the router in fp32 whatever the compute dtype.
    logits = F.linear(x.float(), self.router.weight.float(), self.router.bias.float())
    if router_bias is not None:
      if tuple(router_bias.shape) != (b, e):
        raise ValueError(f"MoeFfn router_bias must be [batch, num_experts] = {(b, e)}, got "
                         f"{tuple(router_bias.shape)}")
      logits = logits + router_bias.float()[:, None, :]
    combine = route(logits, self.top_k)                                # [B, S, E]
    dtype = self.wi.dtype
    h = torch.einsum("bsd,edh->bseh", x.to(dtype), self.wi) + self.bi
    h = F.gelu(h, approximate="none")
    out = torch.einsum("bseh,ehd->bsed", h, self.wo) + self.bo       # every expert, every token
    return torch.einsum("bsed,bse->bsd", out, combine.to(dtype))


class MoeBlock(nn.Module):
  """Pre-LN block: masked self-attention, then a routed MoE FFN. x [B, S, W] -> same."""

  def __init__(self, width: int, num_heads: int, num_experts: int, top_k: int, mlp_dim: int):
    super().__init__()
    if num_heads < 1 or width % num_heads:
      raise ValueError(f"projector MoE width {width} is not divisible by num_heads {num_heads}")
    self.attn_norm = layers.LayerNorm(width)
    self.attn = layers.MultiHeadAttention(width, num_heads, width // num_heads)
    self.moe_norm = layers.LayerNorm(width)
    self.moe = MoeFfn(width, num_experts, top_k, mlp_dim)

  def forward(self, x, mask, router_bias=None):
    x = x + self.attn(self.attn_norm(x), mask)
    return x + self.moe(self.moe_norm(x), router_bias)


@register("hierarchical_moe")
class HierarchicalMoeProjector(Projector):
  """Input projection (``in_proj``, ``time``), blocks ``stage{s}_block{i}``, ``out_norm``,
  ``readout`` (Mlp to output_dim)."""

  def __init__(self, output_dim: int, input_dim: int, *, hidden_dim: int | None = None,
               num_stages: int = 2, layers_per_stage: int = 1, pool: int = 2,
               num_experts: int = 4, top_k: int = 2, num_heads: int = 4, mlp_ratio: int = 2,
               time_embedding_dim: int = 64):
    super().__init__()
    if num_stages < 1 or layers_per_stage < 1 or pool < 1:
      raise ValueError(f"projector hierarchical_moe needs num_stages, layers_per_stage and pool "
                       f">= 1; got {num_stages}, {layers_per_stage}, {pool}")
    width = hidden_dim or output_dim
    self.num_stages, self.layers_per_stage, self.pool = num_stages, layers_per_stage, pool
    self.time_embedding_dim = time_embedding_dim
    self.in_proj = layers.Dense(input_dim, width)
    if time_embedding_dim:
      self.time = layers.Dense(2 * (time_embedding_dim // 2), width, bias=False)
    for s in range(num_stages):
      for i in range(layers_per_stage):
        setattr(self, f"stage{s}_block{i}",
                MoeBlock(width, num_heads, num_experts, top_k, mlp_ratio * width))
    self.out_norm = layers.LayerNorm(width)
    self.readout = layers.Mlp(width, mlp_ratio * width, output_dim)

  def trunk(self, features, mask, router_bias=None):
    """Input projection and the MoE stages -> (x [B, N, W], mask [B, N]); a text-aware
    subclass passes its ``router_bias`` [B, E]."""
    mask = mask.bool()
    x = self.in_proj(features)
    if self.time_embedding_dim:
      pos = torch.arange(x.shape[1], device=x.device)
      x = x + self.time(layers.sinusoid(pos, self.time_embedding_dim))[None]
    for s in range(self.num_stages):
      if s > 0:
        x, mask = layers.masked_temporal_pool(x, mask, self.pool)
      for i in range(self.layers_per_stage):
        x = getattr(self, f"stage{s}_block{i}")(x, mask, router_bias)
    return x, mask

  def forward(self, features, mask, text=None, text_mask=None):
    del text, text_mask
    x, mask = self.trunk(features, mask)
    return ProjectorOutput(self.readout(self.out_norm(x)), mask)
