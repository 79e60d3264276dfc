"""The PyTorch ports of ``hierarchical_moe`` and ``multiscale_contrastive`` against ours.

Random (not init) params exported with ``torch_layout``; the shared padded
batch has a clip with no real frame. Routing ties are checked on the MoE FFN
alone, where the router can be made to tie exactly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.torch_port_parity import (ATOL_FRAC, RTOL, assert_config_fields_match, assert_matches, load,
                                             projector_case_fixture, random_params, to_torch)
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models.projectors import moe as jax_moe
from vsrllm_jax.torch_port import projectors as torch_projectors
from vsrllm_jax.torch_port.projectors import moe as torch_moe

NAMES = ["hierarchical_moe", "multiscale_contrastive"]
# The defaults, then non-default fields: top-1 (Switch gates), 3 stages pooling by 3 over
# 12 frames (a ragged last window on padded clips), no time embedding, odd scales order.
CASES = [(name, {}) for name in NAMES] + [
    ("hierarchical_moe", dict(hidden_dim=16, num_stages=3, layers_per_stage=2, pool=3,
                              num_experts=3, top_k=1, num_heads=2, mlp_ratio=1,
                              time_embedding_dim=0)),
    ("hierarchical_moe", dict(num_experts=5, top_k=3, time_embedding_dim=7)),
    ("multiscale_contrastive", dict(scales=(3, 1), num_output_tokens=5, num_heads=2,
                                    mlp_ratio=1, time_embedding_dim=6)),
]


projector_case = projector_case_fixture(CASES)


def test_projector_matches_ours(projector_case, torch_single_thread):
  label, want, got, _ = projector_case
  assert_matches(label, want, got)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  assert_config_fields_match(name)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_ffn_routing_ties_match_ours(top_k, torch_single_thread):
  """A router whose probabilities tie exactly (zero kernel, tied biases) plus a per-clip
  router_bias that breaks some ties: the same experts, gates and outputs as ours."""
  b, s, d, e, h = 3, 4, 6, 5, 7
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
  mask = jnp.asarray(np.arange(s)[None] < np.array([[0], [s], [2]]))
  router_bias = jnp.asarray([[0., 0., 0., 0., 0.], [0., 1., 0., 1., 1.], [2., 0., 2., 0., 0.]])
  ours = jax_moe.MoeFfn(num_experts=e, top_k=top_k, hidden_dim=h)
  boxed = jax.eval_shape(lambda: ours.init(jax.random.key(0), x, mask, router_bias))
  params = random_params(boxed["params"], seed=6)
  params["router"]["kernel"] = np.zeros_like(params["router"]["kernel"])
  params["router"]["bias"] = np.array([0.5, 0.5, 0.2, 0.5, 0.2], np.float32)
  want, _, expert_mask = ours.apply({"params": params}, x, mask, router_bias)
  assert np.all(np.asarray(expert_mask).sum(-1) == top_k)
  rules = torch_layout.plan(ours, boxed["params"], variables={"params": params},
                            args=(x, mask, router_bias))
  theirs = load(torch_moe.MoeFfn(d, e, top_k, h), torch_layout.to_state_dict(params, rules))
  with torch.no_grad():
    got = theirs(to_torch(x), to_torch(router_bias)).numpy()
  assert np.abs(np.asarray(want)).max() > 0.1
  assert_close(got, want, rtol=RTOL, atol_frac=ATOL_FRAC)
  # The combine weights themselves: ties go to the lower expert index, as jax.lax.top_k.
  logits = torch.from_numpy(params["router"]["bias"])[None] + to_torch(router_bias)
  combine = torch_moe.route(logits, top_k).numpy()
  np.testing.assert_array_equal(combine > 0, np.asarray(expert_mask)[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_bfloat16(name):
  module = torch_projectors.build(name, {}, 8, 4).to(torch.bfloat16)
  x, mask = torch.randn(2, 6, 4), torch.arange(6)[None] < torch.tensor([[0], [5]])
  with torch.no_grad():
    out = module(x, mask)
  assert out.tokens.dtype == torch.bfloat16 and out.mask.dtype == torch.bool
  assert out.tokens.shape[-1] == 8 and tuple(out.mask.shape) == tuple(out.tokens.shape[:2])
  assert torch.isfinite(out.tokens.float()).all()


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match="top_k <= num_experts.*top_k=3"):
    torch_projectors.build("hierarchical_moe", {"num_experts": 2, "top_k": 3}, 8, 4)
  with pytest.raises(ValueError, match="hierarchical_moe needs num_stages"):
    torch_projectors.build("hierarchical_moe", {"pool": 0}, 8, 4)
  with pytest.raises(ValueError, match="not divisible by num_heads 3"):
    torch_projectors.build("hierarchical_moe", {"num_heads": 3}, 8, 4)
  with pytest.raises(ValueError, match="multiscale_contrastive: scales.*0"):
    torch_projectors.build("multiscale_contrastive", {"scales": [1, 0]}, 8, 4)
  with pytest.raises(ValueError, match="multiscale_contrastive: scales"):
    torch_projectors.build("multiscale_contrastive", {"scales": [2, 2]}, 8, 4)
  module = torch_projectors.build("hierarchical_moe", {"num_experts": 3}, 8, 4)
  with pytest.raises(ValueError, match=r"router_bias must be \[batch, num_experts\]"):
    module.trunk(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4))
