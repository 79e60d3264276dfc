"""The PyTorch port of the attention resamplers (torch_port/projectors/attention_family.py)
and their text variants against ours.

The method of tests/torch_port_parity.py: random params exported by torch_layout,
loaded strictly, the same tokens on the same padded inputs (clip 0 has no real
frame, instruction 1 no real token).
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.torch_port_parity import (assert_config_fields_match, assert_matches,
                                             projector_case_fixture, to_torch)
from vsrllm_jax.models import projectors as jax_projectors
from vsrllm_jax.torch_port import projectors as torch_projectors
from vsrllm_jax.torch_port.projectors import attention_family

BASE = ["cross_attention", "perceiver", "adaptive_query", "fusion_refinement",
        "gated_cross_attention"]
NAMES = BASE + [f"text_{name}" for name in BASE]
# Tiny fields (the LLM width, and so the text width, is 32), then non-defaults: a
# narrower block width (so text width != block width), the reconstruction module's
# params (built so the export loads strictly), three perceiver iterations with one
# shared block and with one block each, three layers / fusion stages.
TINY = dict(num_queries=3, num_layers=2, num_heads=2, mlp_ratio=2, time_embedding_dim=6)
CASES = [(name, TINY) for name in NAMES] + [
    ("cross_attention", dict(TINY, width=16, reconstruction=True)),
    ("perceiver", dict(TINY, num_layers=1, num_iterations=3, share_weights=True)),
    ("text_perceiver", dict(TINY, width=16, num_iterations=3, reconstruction=True)),
    ("adaptive_query", dict(TINY, width=16, num_layers=3, reconstruction=True)),
    ("fusion_refinement", dict(TINY, num_layers=3, width=16, reconstruction=True)),
    ("text_gated_cross_attention", dict(TINY, width=16, num_layers=3, reconstruction=True)),
]


projector_case = projector_case_fixture(CASES, TINY)


def test_projector_matches_ours(projector_case, torch_single_thread):
  label, want, got, _ = projector_case
  assert want[1].all()                       # queries: every token is real
  assert_matches(label, want, got)


def test_all_padding_clip_is_finite(projector_case, encoded, torch_single_thread):
  """Clip 0 has no real frame: its queries attend to nothing real, yet stay finite and
  its tokens are the same whatever its padded frames hold (text-aware ones get a fixed
  random text with the batch's instruction mask, whose row 1 has no real token)."""
  _, _, (got, _), module = projector_case
  mask = to_torch(encoded["features_mask"])
  assert not mask[0].any()
  assert np.isfinite(got).all()
  rng = np.random.default_rng(5)
  kwargs = {}
  if module.text_aware:
    text_mask = to_torch(encoded["instruction_mask"])
    assert not text_mask[1].any()
    text = torch.from_numpy(rng.standard_normal(text_mask.shape + (32,)).astype(np.float32))
    kwargs = dict(text=text, text_mask=text_mask)
  feats = np.array(encoded["features"])
  with torch.no_grad():
    before = module(torch.from_numpy(feats), mask, **kwargs).tokens.numpy()
    feats[0] = 100.0 * rng.standard_normal(feats[0].shape)
    after = module(torch.from_numpy(feats), mask, **kwargs).tokens.numpy()
  assert np.isfinite(before).all()
  assert_close(after, before, rtol=1e-6, atol_frac=1e-7)


def test_perceiver_share_weights_state_dict():
  """share_weights: one block ('iteration'); otherwise one per iteration ('iterations.i')."""
  fields = dict(TINY, num_iterations=3)
  shared = torch_projectors.build("perceiver", dict(fields, share_weights=True), 8, 4)
  split = torch_projectors.build("perceiver", dict(fields, share_weights=False), 8, 4)
  shared_keys = {k.split(".", 1)[1] for k in shared.state_dict() if k.startswith("iteration.")}
  assert shared_keys and not any(k.startswith("iterations.") for k in shared.state_dict())
  split_keys = {}
  for key in split.state_dict():
    if key.startswith("iterations."):
      _, i, rest = key.split(".", 2)
      split_keys.setdefault(i, set()).add(rest)
  assert sorted(split_keys) == ["0", "1", "2"]
  assert all(keys == shared_keys for keys in split_keys.values())
  assert not any(k.startswith("iteration.") for k in split.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  assert_config_fields_match(name)


def _our_error(name: str, fields: dict) -> str:
  """Our projector's error for ``fields`` (output_dim 8, features [1, 5, 4], text [1, 2, 8])."""
  module = jax_projectors.build(name, fields, output_dim=8)
  feats, mask = jnp.zeros((1, 5, 4)), jnp.ones((1, 5), bool)
  text = dict(text=jnp.zeros((1, 2, 8)), text_mask=jnp.ones((1, 2), bool))
  with pytest.raises(ValueError) as ours:
    jax.eval_shape(lambda: module.init(jax.random.key(0), feats, mask, **text))
  return str(ours.value)


@pytest.mark.parametrize("name,fields", [
    ("perceiver", dict(num_iterations=0)),
    ("cross_attention", dict(num_heads=3)),
    ("fusion_refinement", dict(num_queries=0)),
    ("gated_cross_attention", dict(time_embedding_dim=0)),
    ("text_adaptive_query", dict(mlp_ratio=0)),
])
def test_bad_fields_raise_our_errors(name, fields):
  with pytest.raises(ValueError) as got:
    torch_projectors.build(name, fields, 8, 4)
  assert str(got.value) == _our_error(name, fields)


def test_bad_text_dim_and_text_perceiver_iterations_are_named():
  with pytest.raises(ValueError, match="'text_perceiver': num_iterations must be >= 1, got 0"):
    torch_projectors.build("text_perceiver", dict(num_iterations=0), 8, 4)
  with pytest.raises(ValueError, match="'adaptive_query' does not read the instruction"):
    attention_family.AdaptiveQueryProjector(8, 4, 8)
  with pytest.raises(ValueError, match="adaptive_query.*text_dim must be None"):
    torch_projectors.build("adaptive_query", {}, 8, 4, text_dim=8)


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("text_")])
def test_missing_text_is_named(name):
  module = torch_projectors.build(name, TINY, 8, 4, text_dim=6)
  feats, mask = torch.zeros(1, 5, 4), torch.ones(1, 5, dtype=torch.bool)
  with pytest.raises(ValueError, match=f"projector '{name}' is text-aware: it needs text"):
    module(feats, mask)
  with pytest.raises(ValueError, match=f"projector '{name}' is text-aware"):
    module(feats, mask, text=torch.zeros(1, 2, 6))
  out = module(feats, mask, text=torch.zeros(1, 2, 6), text_mask=torch.ones(1, 2))
  assert out.tokens.shape == (1, 3, 8)


@pytest.mark.parametrize("name,fields", [
    ("text_gated_cross_attention", dict(TINY, width=4)),
    ("perceiver", dict(TINY, num_iterations=3, share_weights=True)),
    ("text_adaptive_query", TINY),
    ("fusion_refinement", dict(TINY, num_layers=3, width=16, reconstruction=True)),
])
def test_bfloat16_runs(name, fields):
  module = torch_projectors.build(name, fields, 8, 4).to(torch.bfloat16)
  mask = torch.arange(5)[None] < torch.tensor([[0], [5]])
  text = {}
  if module.text_aware:
    text = dict(text=torch.randn(2, 3, 8, dtype=torch.bfloat16),
                text_mask=torch.arange(3)[None] < torch.tensor([[2], [0]]))
  with torch.no_grad():
    out = module(torch.randn(2, 5, 4), mask, **text)
  assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (2, 3, 8)
  assert torch.isfinite(out.tokens.float()).all() and out.mask.all()
