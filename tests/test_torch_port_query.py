"""The PyTorch port of the Q-Former family (torch_port/projectors/query.py) against ours.

The method of tests/torch_port_parity.py (shared with the other port tests): random
params exported by torch_layout, loaded strictly, the same tokens on the same
padded inputs (clip 0 has no real frame).
"""
# pylint: disable=redefined-outer-name  (pytest fixtures)
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.torch_port_parity import (assert_config_fields_match, assert_matches,
                                             projector_case_fixture, to_torch)
from vsrllm_jax.torch_port import projectors as torch_projectors

NAMES = ["qformer", "enhanced_qformer", "blip2_qformer"]
# Tiny fields (the LLM width is 32), then non-defaults: a narrower block width, an MLP
# readout, the reconstruction module's params, cross-attention every other layer.
TINY = dict(num_queries=3, num_layers=2, num_heads=2, mlp_ratio=2, time_embedding_dim=6)
CASES = [(name, TINY) for name in NAMES] + [
    ("qformer", dict(TINY, width=16, output_mlp_ratio=3, reconstruction=True)),
    ("enhanced_qformer", dict(TINY, num_layers=3, output_mlp_ratio=0)),
    ("blip2_qformer", dict(TINY, num_layers=3, width=16, cross_attention_frequency=2,
                           reconstruction=True)),
]


projector_case = projector_case_fixture(CASES, TINY)


def test_projector_matches_ours(projector_case, torch_single_thread):
  label, want, got, _ = projector_case
  assert want[1].all()                       # queries: every token is real
  assert_matches(label, want, got)


def test_all_padding_clip_is_finite(projector_case, encoded):
  """Clip 0 has no real frame: its queries attend to nothing real, yet stay finite and
  its tokens are the queries' alone (the same whatever its padded frames hold)."""
  _, _, (got, _), module = projector_case
  assert not np.asarray(encoded["features_mask"])[0].any()
  assert np.isfinite(got).all()
  feats = np.array(encoded["features"])
  feats[0] = 100.0 * np.random.default_rng(5).standard_normal(feats[0].shape)
  with torch.no_grad():
    again = module(torch.from_numpy(feats), to_torch(encoded["features_mask"])).tokens.numpy()
  assert_close(again, got, rtol=1e-6, atol_frac=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  assert_config_fields_match(name)


@pytest.mark.parametrize("name,fields,match", [
    ("qformer", dict(num_heads=3), r"qformer.*width, num_heads"),
    ("enhanced_qformer", dict(num_queries=0), r"enhanced_qformer.*num_queries must be >= 1"),
    ("qformer", dict(output_mlp_ratio=-1), r"output_mlp_ratio must be >= 0"),
    ("blip2_qformer", dict(cross_attention_frequency=0), r"cross_attention_frequency"),
])
def test_bad_fields_are_named(name, fields, match):
  with pytest.raises(ValueError, match=match):
    torch_projectors.build(name, fields, 8, 4)


def test_bfloat16_runs():
  module = torch_projectors.build("blip2_qformer", dict(TINY, cross_attention_frequency=2), 8, 4)
  mask = torch.arange(5)[None] < torch.tensor([[0], [5]])
  out = module.to(torch.bfloat16)(torch.randn(2, 5, 4), mask)
  assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (2, 3, 8)
  assert torch.isfinite(out.tokens.float()).all() and out.mask.all()
