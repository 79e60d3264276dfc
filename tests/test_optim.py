"""Param groups, schedules and the frozen/trainable split."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsrllm_jax.configs import common
from vsrllm_jax.training import optim

PARAMS = {"encoder": {"w": jnp.ones((3, 3))}, "projector": {"a": {"kernel": jnp.ones((3, 2)),
                                                                "bias": jnp.zeros(2)}},
          "llm": {"emb": jnp.ones((4, 3))}}


def test_every_param_must_be_covered():
  with pytest.raises(ValueError, match="covers no pattern.*encoder/w"):
    optim.label_params(PARAMS, (("^projector/", "main"), ("^llm/", None)))


def test_split_merge_and_frozen_have_no_optimizer_state():
  cfg = common.get_base_config().optim
  labels = optim.label_params(PARAMS, cfg.param_groups)
  trainable, frozen = optim.split(PARAMS, labels)
  assert set(trainable) == {"projector"} and set(frozen) == {"encoder", "llm"}
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
  tx, _ = optim.make_optimizer(cfg, labels, 100)
  state = tx.init(trainable)
  shapes = {x.shape for x in jax.tree.leaves(state) if x.ndim}
  assert shapes == {(3, 2), (2,)}   # mu/nu of projector leaves only


def test_patterns_can_train_llm_params_with_their_own_schedule():
  cfg = common.get_base_config().optim
  with cfg.unlocked():
    cfg.param_groups = (("^projector/", "main"), ("^llm/", "slow"), (".*", None))
    cfg.schedules.slow = common.ConfigDict(dict(cfg.schedules.main.to_dict(), peak_lr=1e-5))
  labels = optim.label_params(PARAMS, cfg.param_groups)
  trainable, _ = optim.split(PARAMS, labels)
  assert set(trainable) == {"projector", "llm"}
  tx, schedules = optim.make_optimizer(cfg, labels, 100)
  assert set(schedules) == {"main", "slow"}
  grads = jax.tree.map(jnp.ones_like, trainable)
  state = tx.init(trainable)
  updates, state = tx.update(grads, state, trainable)
  assert float(jnp.abs(updates["llm"]["emb"]).max()) > 0


def test_unknown_schedule_name_is_an_error():
  cfg = common.get_base_config().optim
  labels = optim.label_params(PARAMS, (("^projector/", "fast"), (".*", None)))
  with pytest.raises(ValueError, match="fast.*not defined"):
    optim.make_optimizer(cfg, labels, 10)


@pytest.mark.parametrize("kind", ["warmup_cosine", "tri_stage"])
def test_schedules(kind):
  cfg = common.get_base_config().optim.schedules.main
  with cfg.unlocked():
    cfg.kind, cfg.warmup_steps, cfg.hold_steps = kind, 10, 5
  fn = optim.make_schedule(cfg, 100)
  lrs = np.array([float(fn(s)) for s in range(101)])
  assert lrs.argmax() in range(10, 16) and lrs.max() == pytest.approx(cfg.peak_lr)
  assert np.all(np.diff(lrs[:10]) > 0)
  end = cfg.end_lr_scale if kind == "warmup_cosine" else cfg.final_lr_scale
  assert lrs[-1] == pytest.approx(cfg.peak_lr * end, rel=1e-3)
  if kind == "tri_stage":
    assert lrs[0] == pytest.approx(cfg.peak_lr * cfg.init_lr_scale, rel=1e-4)
    assert np.allclose(lrs[10:16], cfg.peak_lr)


def test_weight_decay_only_on_projection_weights():
  tree = {"proj": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((2, 4))},
          "moe": {"wi": jnp.ones((2, 3, 4)), "bi": jnp.ones((2, 4))},
          "norm": {"scale": jnp.ones(4)}, "queries": jnp.ones((5, 4)),
          "conv": {"kernel": jnp.ones((3, 4, 4))}}
  mask = optim._decay_mask(tree)
  assert mask == {"proj": {"kernel": True, "bias": False}, "moe": {"wi": True, "bi": False},
                  "norm": {"scale": False}, "queries": False, "conv": {"kernel": True}}
