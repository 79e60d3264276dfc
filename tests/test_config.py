"""Config parsing: sweeps args, overrides, and errors that name the valid keys."""
import pytest

from configs import common, contrastive, linear, mlp


def test_parse_arg_types_and_errors():
  args = common.parse_arg("seed=3,depth=4,flag=false", seed=0, depth=2, flag=True)
  assert (args.seed, args.depth, args.flag) == (3, 4, False)
  with pytest.raises(ValueError, match=r"unknown config arg 'sed'.*\['depth', 'seed'\]"):
    common.parse_arg("sed=1", seed=0, depth=2)


@pytest.mark.parametrize("module", [contrastive, linear, mlp])
def test_configs_build_and_lock(module):
  c = module.get_config()
  c.lock()
  with pytest.raises(AttributeError, match="total_stepz"):
    c.total_stepz = 3
  assert c.projector.name in ("multiscale_contrastive", "linear", "mlp")
  assert set(c.loss_weights) >= {"lm"}


def test_contrastive_preset_weights_both_losses():
  c = contrastive.get_config("contrastive_weight=0.5")
  assert dict(c.loss_weights) == {"lm": 1.0, "contrastive": 0.5}
