"""The PyTorch port of the Q-Former family (torch_port/projectors/query.py) against ours.

Same method as tests/test_torch_port_projectors.py, whose helpers and padded
batch (clip 0 has no real frame) this reuses: random params exported by
torch_layout, loaded strictly, the same tokens on the same inputs.
"""
# pylint: disable=redefined-outer-name,unused-import  (pytest fixtures)
import jax
import numpy as np
import pytest
import torch

from tests.test_torch_port_projectors import TOL, encoded, load, random_params, to_torch  # noqa: F401 (a fixture)
from tests.tiny import tiny_config
from vsrllm_jax import torch_layout
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import projectors as jax_projectors
from vsrllm_jax.models.vsr_model import VSRModel
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


def _case_id(name, fields):
  return name + "".join(f"-{k}={v}" for k, v in fields.items() if TINY.get(k) != v)


@pytest.fixture(scope="module", params=CASES, ids=[_case_id(*c) for c in CASES])
def projector_case(request, encoded):
  """(label, ours: tokens/mask, torch: tokens/mask, the torch module)."""
  name, fields = request.param
  config = tiny_config(name, **fields)
  model = build_lib.build_model(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), encoded, train=False,
                                            method=VSRModel.project))
  params = random_params(boxed["params"], seed=2)
  variables = {"params": params}
  out, _, _ = model.apply(variables, encoded, train=False, method=VSRModel.project)
  rules = torch_layout.plan(model, boxed["params"], variables=variables, args=(encoded,),
                            method=VSRModel.project, kwargs=dict(train=False),
                            prefix=("projector",))
  feats = encoded["features"]
  module = load(torch_projectors.build(name, config.projector, config.llm.hidden_dim,
                                       feats.shape[-1]), torch_layout.to_state_dict(params, rules))
  with torch.no_grad():
    got = module(to_torch(feats), to_torch(encoded["features_mask"]))
  return (_case_id(name, fields), (np.asarray(out.tokens), np.asarray(out.mask)),
          (got.tokens.numpy(), got.mask.numpy()), module)


def test_projector_matches_ours(projector_case, torch_single_thread):
  name, (want, want_mask), (got, got_mask), _ = projector_case
  assert got.shape == want.shape and got.dtype == np.float32, (got.shape, want.shape)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert got_mask.dtype == np.bool_ and got_mask.all()
  assert np.abs(want).max() > 0.1, "a vacuous comparison: the outputs are (near) zero"
  err = float(np.abs(got - want).max())
  print(f"\n{name}: max abs error {err:.3g} on {int(want_mask.sum())} real tokens")
  assert err <= TOL, (name, err)


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
  np.testing.assert_allclose(again, got, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_config_fields_match_ours(name):
  ours = {k: v for k, v in jax_projectors.config_fields(name).items()
          if k not in torch_projectors.SHARED_FIELDS}
  assert torch_projectors.config_fields(name) == ours
  for attr in ("text_aware", "sequence_preserving"):
    assert (getattr(torch_projectors.get_class(name), attr)
            == getattr(jax_projectors.get_class(name), attr)), (name, attr)


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
