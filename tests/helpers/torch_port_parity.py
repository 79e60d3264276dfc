"""What the PyTorch-port tests share: random params, the padded batch, one parity case.

Params are random (``random_params``), so that zero-initialised parts (adapter
up-projections, FiLM, gates) are not the identity; the batch has a clip with no
real frame and an instruction with no real token.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.numerics import assert_close
from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import projectors as jax_projectors
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.torch_port import projectors as torch_projectors

RTOL, ATOL_FRAC = 1e-4, 1e-5   # fp32 parity (tests.helpers.numerics.assert_close)


def random_params(boxed, seed: int, scale: float = 0.2):
  """Random values for an abstract (boxed) param tree: norms' scales 1 + scale * N(0, 1),
  the rest scale * N(0, 1). Numpy, no jax random (fast on CPU)."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(boxed))
  out = {k: ((k[-1] == "scale") + scale * rng.standard_normal(v.shape)).astype(v.dtype)
         for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(out)


def load(module: torch.nn.Module, state: dict) -> torch.nn.Module:
  module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return module.eval()


def to_torch(x):
  return torch.from_numpy(np.array(x)) if x is not None else None


def encoded_batch() -> dict:
  """A padded batch with the features our (tiny, initialised) encoder computes for it.

  Masks: clip 0 has no real frame, instruction 1 no real token. The encoder
  is the same for every projector's tiny config, so all of them share this.
  """
  config = tiny_config("linear")
  model = build_lib.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 4, seed=1).items()}
  variables = model.init(jax.random.key(0), batch, method=VSRModel.encode)
  feats, feats_mask = model.apply(variables, batch, method=VSRModel.encode)
  feats_mask = np.array(feats_mask)
  feats_mask[0] = False
  text_mask = np.array(batch["instruction_mask"])
  text_mask[1] = False
  return dict(features=feats, features_mask=jnp.asarray(feats_mask),
              instruction_ids=batch["instruction_ids"], instruction_mask=jnp.asarray(text_mask))


def run_case(name: str, fields: dict, encoded: dict):
  """(ours: tokens/mask, torch: tokens/mask, the torch module) for projector ``name``:
  VSRModel.project on the encoded batch, and the torch projector loaded strictly with
  the same (random) params on the same inputs."""
  config = tiny_config(name, **fields)
  model = build_lib.build_model(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), encoded, train=False,
                                            method=VSRModel.project))
  params = random_params(boxed["params"], seed=2)      # projector and LLM embedding table
  variables = {"params": params}
  out, _, _ = model.apply(variables, encoded, train=False, method=VSRModel.project)
  rules = torch_layout.plan(model, boxed["params"], variables=variables, args=(encoded,),
                            method=VSRModel.project, kwargs=dict(train=False),
                            prefix=("projector",))
  feats = encoded["features"]
  module = load(torch_projectors.build(name, config.projector, config.llm.hidden_dim,
                                       feats.shape[-1]), torch_layout.to_state_dict(params, rules))
  kwargs = {}
  if module.text_aware:
    text = model.apply(variables, encoded["instruction_ids"], method=VSRModel.embed_ids)
    kwargs = dict(text=to_torch(text), text_mask=to_torch(encoded["instruction_mask"]))
  with torch.no_grad():
    got = module(to_torch(feats), to_torch(encoded["features_mask"]), **kwargs)
  return ((np.asarray(out.tokens), np.asarray(out.mask)), (got.tokens.numpy(), got.mask.numpy()),
          module)


def assert_matches(label: str, want, got) -> None:
  """Same masks; tokens within RTOL/ATOL_FRAC on real positions (and not a vacuous comparison)."""
  (want, want_mask), (got, got_mask) = want, got
  assert got.shape == want.shape and got.dtype == np.float32, (got.shape, want.shape)
  np.testing.assert_array_equal(got_mask, want_mask)
  assert got_mask.dtype == np.bool_ and got_mask.any()
  real = want[want_mask]
  assert np.abs(real).max() > 0.1, "a vacuous comparison: the outputs are (near) zero"
  err = float(np.abs(got[got_mask] - real).max())
  print(f"\n{label}: max abs error {err:.3g} on {int(want_mask.sum())} real tokens")
  assert_close(got[got_mask], real, rtol=RTOL, atol_frac=ATOL_FRAC, err_msg=label)


def assert_config_fields_match(name: str) -> None:
  ours = {k: v for k, v in jax_projectors.config_fields(name).items()
          if k not in torch_projectors.SHARED_FIELDS}
  assert torch_projectors.config_fields(name) == ours
  for attr in ("text_aware", "sequence_preserving"):
    assert (getattr(torch_projectors.get_class(name), attr)
            == getattr(jax_projectors.get_class(name), attr)), (name, attr)


def case_id(name: str, fields: dict, base: dict | None = None) -> str:
  return name + "".join(f"-{k}={v}" for k, v in fields.items() if (base or {}).get(k) != v)


def projector_case_fixture(cases, base: dict | None = None):
  """A module-scoped fixture over ``cases`` [(name, fields)]: (label, ours:
  tokens/mask, torch: tokens/mask, the torch module), built once per case."""
  @pytest.fixture(scope="module", params=cases, ids=[case_id(*c, base) for c in cases])
  def projector_case(request, encoded):
    name, fields = request.param
    return (case_id(name, fields, base),) + run_case(name, fields, encoded)
  return projector_case
