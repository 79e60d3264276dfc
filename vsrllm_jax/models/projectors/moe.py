"""``hierarchical_moe``: self-attention + top-k routed expert FFNs, in a temporal hierarchy.

Stage 1 runs at frame rate; every later stage first average-pools the
sequence in time by ``pool`` (masked), so a 2-stage projector emits one token
per ``pool`` frames. Each stage holds ``layers_per_stage`` pre-LN blocks of
masked self-attention and a routed mixture-of-experts FFN (``MoeFfn``).

Routing (``MoeFfn``): a router gives each token a softmax over
``num_experts``; the token goes to its ``top_k`` experts, whose outputs are
mixed by the top-k probabilities renormalised to sum 1 (Mixtral); with
``top_k == 1`` the raw top-1 probability is the gate (Switch), so that the
task loss still reaches the router. An optional additive ``router_bias``
[B, num_experts] enters the router logits (the hook a text-conditioned router
uses).

Dispatch is dense: every expert runs on every token through one einsum and
the outputs are combined with the (zero outside the top-k) gate weights.
Shapes are static, no token is ever dropped and there is no expert capacity,
at ``num_experts / top_k`` times the FFN compute of a sparse dispatch, which
is negligible at projector sizes. Routing is per token, so padded frames
cannot change the outputs of real ones.

Auxiliary loss ``routing`` (mean over the MoE layers) = CV^2 of expert
importance + Switch-style load balancing; see ``routing_loss``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput
from vsrllm_jax.models.projectors.multiscale_contrastive import sinusoid


def routing_terms(router_probs: jax.Array, expert_mask: jax.Array,
                  token_mask: jax.Array) -> dict[str, jax.Array]:
  """The two routing penalties, over the real tokens of the whole batch.

  router_probs [B, S, E] (softmax over experts), expert_mask [B, S, E] (1 where
  the token was dispatched to the expert: top_k ones per token), token_mask
  [B, S] (False on padding, which is excluded from every statistic).

  cv2: importance_e = sum of router probs over real tokens; CV^2 = var / mean^2
    (population variance over experts). 0 when all experts are equally important.
  load_balance: num_experts * sum_e f_e * P_e, with P_e the mean router prob
    over real tokens and f_e the fraction of the dispatch slots (real tokens x
    top_k) that went to e: top-k counting, normalised so that sum_e f_e = 1.
    Balanced routing gives exactly 1 for any top_k; all tokens on one expert
    with probability 1 gives num_experts. f_e comes from the top-k choice and
    carries no gradient; P_e does.
  """
  probs = router_probs.astype(jnp.float32)
  dispatch = expert_mask.astype(jnp.float32)
  m = token_mask.astype(jnp.float32)[..., None]                      # [B, S, 1]
  num_experts = probs.shape[-1]
  num_tokens = jnp.maximum(jnp.sum(m), 1.0)
  importance = jnp.sum(probs * m, axis=(0, 1))                        # [E]
  mean = jnp.mean(importance)
  cv2 = jnp.mean(jnp.square(importance - mean)) / (jnp.square(mean) + 1e-9)
  slots = jnp.maximum(jnp.sum(dispatch * m), 1.0)                     # real tokens x top_k
  fraction = jax.lax.stop_gradient(jnp.sum(dispatch * m, axis=(0, 1)) / slots)
  mean_prob = jnp.sum(probs * m, axis=(0, 1)) / num_tokens
  load_balance = num_experts * jnp.sum(fraction * mean_prob)
  return {"cv2": cv2, "load_balance": load_balance}


def routing_loss(router_probs: jax.Array, expert_mask: jax.Array,
                 token_mask: jax.Array) -> jax.Array:
  """CV^2 of expert importance + Switch load balancing (see ``routing_terms``).

  Its minimum is 1 (perfect balance: CV^2 = 0, load balance = 1), not 0.
  """
  terms = routing_terms(router_probs, expert_mask, token_mask)
  return terms["cv2"] + terms["load_balance"]


class MoeFfn(nn.Module):
  """Top-k routed expert FFNs (Dense-GELU-Dense each), dense dispatch.

  x [B, S, D], mask [B, S], router_bias [B, E] or None ->
  (y [B, S, D], router_probs [B, S, E] fp32, expert_mask [B, S, E]).
  Sows ``expert_tokens`` [E] (real tokens dispatched to each expert) into
  the ``intermediates`` collection.
  """
  num_experts: int
  top_k: int
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, router_bias=None):
    e, k = self.num_experts, self.top_k
    if e < 1 or not 1 <= k <= e:
      raise ValueError(f"projector MoE needs num_experts >= 1 and 1 <= top_k <= num_experts; "
                       f"got num_experts={e}, top_k={k}")
    b, _, d = x.shape
    logits = layers.Dense(e, ("embed", "experts"), dtype=jnp.float32,
                          param_dtype=self.param_dtype, name="router")(x)   # [B, S, E] fp32
    if router_bias is not None:
      if router_bias.shape != (b, e):
        raise ValueError(f"MoeFfn router_bias must be [batch, num_experts] = {(b, e)}, got "
                         f"{tuple(router_bias.shape)}")
      logits = logits + router_bias.astype(jnp.float32)[:, None, :]
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, top_idx = jax.lax.top_k(probs, k)                      # [B, S, k]
    gates = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True) if k > 1 else top_probs
    one_hot = jax.nn.one_hot(top_idx, e, dtype=jnp.float32)           # [B, S, k, E]
    expert_mask = jnp.sum(one_hot, axis=2)                            # [B, S, E] in {0, 1}
    combine = jnp.sum(one_hot * gates[..., None], axis=2)             # [B, S, E]
    self.sow("intermediates", "expert_tokens",
             jnp.sum(expert_mask * mask.astype(jnp.float32)[..., None], axis=(0, 1)))

    init = layers.default_kernel_init
    wi = self.param("wi", layers.with_axes(init, ("experts", "embed", "mlp")),
                    (e, d, self.hidden_dim), self.param_dtype)
    bi = self.param("bi", layers.with_axes(nn.initializers.zeros, ("experts", "mlp")),
                    (e, self.hidden_dim), self.param_dtype)
    wo = self.param("wo", layers.with_axes(init, ("experts", "mlp", "embed")),
                    (e, self.hidden_dim, d), self.param_dtype)
    bo = self.param("bo", layers.with_axes(nn.initializers.zeros, ("experts", "embed")),
                    (e, d), self.param_dtype)
    cast = lambda a: jnp.asarray(a, self.dtype)
    h = jnp.einsum("bsd,edh->bseh", cast(x), cast(wi)) + cast(bi)
    h = nn.gelu(h, approximate=False)
    out = jnp.einsum("bseh,ehd->bsed", h, cast(wo)) + cast(bo)        # every expert, every token
    y = jnp.einsum("bsed,bse->bsd", out, combine.astype(self.dtype))
    return y, probs, expert_mask


class MoeBlock(nn.Module):
  """Pre-LN block: masked self-attention, then a routed MoE FFN.

  x [B, S, W], mask [B, S], router_bias [B, E] or None -> (x, routing loss).
  """
  num_heads: int
  num_experts: int
  top_k: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, router_bias=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"projector MoE width {width} is not divisible by num_heads "
                       f"{self.num_heads}")
    h = layers.LayerNorm(name="attn_norm", **kw)(x)
    x = x + layers.MultiHeadAttention(self.num_heads, width // self.num_heads, name="attn",
                                      **kw)(h, mask)
    h = layers.LayerNorm(name="moe_norm", **kw)(x)
    y, probs, expert_mask = MoeFfn(self.num_experts, self.top_k, self.mlp_dim, name="moe",
                                   **kw)(h, mask, router_bias)
    return x + y, routing_loss(probs, expert_mask, mask)


@register("hierarchical_moe")
class HierarchicalMoeProjector(Projector):
  hidden_dim: int | None = None   # trunk width; default output_dim
  num_stages: int = 2             # stage i > 0 first pools time by `pool`
  layers_per_stage: int = 1       # MoE blocks per stage
  pool: int = 2                   # temporal pooling between stages
  num_experts: int = 4
  top_k: int = 2
  num_heads: int = 4
  mlp_ratio: int = 2              # expert hidden = mlp_ratio * width
  time_embedding_dim: int = 64    # sinusoidal frame-time input (0: none); attention is order-blind

  def trunk(self, features, features_mask, router_bias=None):
    """Input projection and the MoE stages -> (x [B, N, W], mask [B, N], mean routing loss).

    Called from ``__call__`` (a text-aware subclass passes its ``router_bias``).
    """
    if self.num_stages < 1 or self.layers_per_stage < 1 or self.pool < 1:
      raise ValueError(f"projector hierarchical_moe needs num_stages, layers_per_stage and pool "
                       f">= 1; got {self.num_stages}, {self.layers_per_stage}, {self.pool}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_dim or self.output_dim
    mask = features_mask.astype(bool)
    x = layers.Dense(width, ("features", "embed"), name="in_proj", **kw)(features)
    if self.time_embedding_dim:
      time = layers.Dense(width, (None, "embed"), use_bias=False, name="time", **kw)(
          sinusoid(jnp.arange(x.shape[1]), self.time_embedding_dim))
      x = x + time[None]
    losses = []
    for s in range(self.num_stages):
      if s > 0:
        x, mask = layers.masked_temporal_pool(x, mask, self.pool)
      for i in range(self.layers_per_stage):
        x, loss = MoeBlock(self.num_heads, self.num_experts, self.top_k, self.mlp_ratio * width,
                           name=f"stage{s}_block{i}", **kw)(x, mask, router_bias)
        losses.append(loss)
    return x, mask, sum(losses) / len(losses)

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    x, mask, routing = self.trunk(features, features_mask)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.LayerNorm(name="out_norm", **kw)(x)
    tokens = layers.Mlp(self.mlp_ratio * x.shape[-1], out_dim=self.output_dim, name="readout",
                        **kw)(x)
    return ProjectorOutput(tokens=tokens, mask=mask,
                           aux_losses={"routing": jnp.asarray(routing, jnp.float32)},
                           embeddings={})
