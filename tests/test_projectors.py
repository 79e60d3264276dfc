"""The projector registry and the loss-weight checks of a run."""
import jax
import numpy as np
import pytest

from tests.helpers.tiny import tiny_config
from tests.test_train_step import make
from vsrllm_jax import sharding
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.training import step as step_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import projectors


def test_unknown_projector_lists_the_registry():
  with pytest.raises(ValueError) as e:
    projectors.build("qformerr", {"output_dim": 8})
  for name in ("linear", "mlp", "multiscale_contrastive", "conv_abstractor"):
    assert name in str(e.value)


def test_unknown_projector_field_lists_valid_fields():
  with pytest.raises(ValueError, match=r"no field\(s\) \['dept'\].*'depth'"):
    projectors.build("mlp", {"output_dim": 8, "dept": 2})


@pytest.mark.parametrize("name", ["linear", "mlp", "multiscale_contrastive", "conv_abstractor"])
def test_projector_interface(name):
  module = projectors.build(name, {"output_dim": 16, "name": name})
  feats = np.random.default_rng(0).normal(size=(4, 10, 12)).astype(np.float32)
  mask = np.arange(10)[None] < np.array([10, 7, 4, 9])[:, None]
  variables = module.init(jax.random.key(0), feats, mask, train=False)
  out = module.apply(variables, feats, mask, train=False)
  assert out.tokens.ndim == 3 and out.tokens.shape[0] == 4 and out.tokens.shape[2] == 16
  assert out.mask.shape == out.tokens.shape[:2]
  if module.sequence_preserving:
    assert out.tokens.shape[1] == 10
    np.testing.assert_array_equal(out.mask, mask)
  for v in out.aux_losses.values():
    assert np.isfinite(float(v))


def test_loss_weights_must_match_produced_losses():
  config = tiny_config("multiscale_contrastive")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, _, layout = make(config, mesh)
  model = build_lib.build_model(config)
  batch = batch_lib.dummy_batch(config, 2)
  assert step_lib.check_loss_weights(model, layout, config, batch) == ["contrastive", "lm"]
  with config.unlocked():
    config.loss_weights.routing = 0.1
  with pytest.raises(ValueError, match="routing.*which no part of the model produces"):
    step_lib.check_loss_weights(model, layout, config, batch)
  with config.unlocked():
    del config.loss_weights["routing"]
    del config.loss_weights["contrastive"]
  with pytest.raises(ValueError, match="contrastive.*no weight"):
    step_lib.check_loss_weights(model, layout, config, batch)



def test_conv_abstractor_is_local_in_time():
  """A token sees only its receptive field: frame 0 reaches early tokens, never late ones."""
  module = projectors.build("conv_abstractor", {"output_dim": 16, "depth": 2, "kernel_size": 3,
                                                "stride": 2})
  feats = np.random.default_rng(0).normal(size=(1, 40, 12)).astype(np.float32)
  mask = np.ones((1, 40), bool)
  variables = module.init(jax.random.key(0), feats, mask)
  base = module.apply(variables, feats, mask).tokens
  changed = feats.copy()
  changed[:, 0] += 1.0
  moved = np.abs(np.asarray(module.apply(variables, changed, mask).tokens - base)).max(-1)[0]
  assert moved.shape == (20,)
  # Frame 0 reaches frames 0..2 (2 blocks), tokens 0..1 (pool), tokens 0..3 (2 blocks).
  assert moved[0] > 1e-4 and moved[:4].min() > 0 and moved[4:].max() == 0.0
