"""Config parsing: sweeps args, overrides, and errors that name the valid keys."""
import pytest

from vsrllm_jax.configs import base, common, contrastive, conv_abstractor, linear, mlp, moe, qformer, text_aware
from vsrllm_jax.models import projectors

PRESETS = [contrastive, conv_abstractor, linear, mlp, moe, qformer, text_aware]


def test_parse_arg_types_and_errors():
  args = common.parse_arg("seed=3,depth=4,flag=false", seed=0, depth=2, flag=True)
  assert (args.seed, args.depth, args.flag) == (3, 4, False)
  with pytest.raises(ValueError, match=r"unknown config arg 'sed'.*\['depth', 'seed'\]"):
    common.parse_arg("sed=1", seed=0, depth=2)


@pytest.mark.parametrize("module", PRESETS)
def test_configs_build_and_lock(module):
  c = module.get_config()
  c.lock()
  with pytest.raises(AttributeError, match="total_stepz"):
    c.total_stepz = 3
  assert c.projector.name in projectors.names()
  # Exactly one weight per loss the projector produces (a run checks this again).
  assert sorted(c.loss_weights) == sorted(["lm"] + projectors.loss_names(c.projector))


@pytest.mark.parametrize("name", projectors.names())
def test_base_config_runs_any_projector_with_its_own_losses(name):
  c = base.get_config(f"projector={name}")
  assert c.projector.name == name
  assert sorted(c.loss_weights) == sorted(["lm"] + projectors.loss_names(c.projector))
  for loss in ("routing", "visual_text"):
    assert (loss in c.loss_weights) == (
        name.endswith("hierarchical_moe") if loss == "routing"
        else name == "text_multiscale_contrastive")


def test_contrastive_preset_weights_both_losses():
  c = contrastive.get_config("contrastive_weight=0.5")
  assert dict(c.loss_weights) == {"lm": 1.0, "contrastive": 0.5}
