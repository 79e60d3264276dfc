"""config.optim.freeze_finetune_updates = N: the encoder frozen for the first N updates
(no gradient, no optimizer state), then trained with fresh AdamW state and the global
schedule's learning rate; checkpoints restore into their step's layout, so a run resumed
on either side of N continues bit for bit as the uninterrupted one."""
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import tiny_run_config, workdir_files
from tests.helpers.tiny import tiny_config
from vsrllm_jax import sharding
from vsrllm_jax.configs import common
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.run import checkpoint
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.training import loop, optim

GROUPS = (("^(projector|encoder)/", "main"), (".*", None))
PARAMS = {"encoder": {"w": jnp.ones((3, 2))}, "projector": {"w": jnp.ones((3, 2))},
          "llm": {"e": jnp.ones((4, 3))}}


def _optim(n, **fields):
  cfg = common.get_base_config().optim
  cfg.update(dict(param_groups=GROUPS, freeze_finetune_updates=n, **fields))
  return cfg


def test_the_encoder_is_frozen_before_n_and_trains_from_n():
  labels = optim.label_params(PARAMS, GROUPS)
  cfg = _optim(3)
  for step, want in ((0, optim.FROZEN), (2, optim.FROZEN), (3, "main"), (9, "main")):
    got = optim.phase_labels(labels, cfg, step, 10)
    assert got[("encoder", "w")] is want and got[("projector", "w")] == "main", step
    assert got[("llm", "e")] is optim.FROZEN
  assert optim.phase_labels(labels, _optim(0), 0, 10) == labels   # 0: as the groups say


def test_the_encoders_adamw_starts_fresh_at_n_with_the_global_schedules_lr():
  """From N the encoder has its own AdamW ('main@N', count 0) whose first update uses
  lr(N), while a fresh projector state would use lr(0): fairseq's one global schedule."""
  cfg = _optim(3, weight_decay=0.0, clip_grad_norm=0.0)
  cfg.schedules.main.warmup_steps = 5
  labels = optim.phase_labels(optim.label_params(PARAMS, GROUPS), cfg, 3, 10)
  tx, schedules = optim.make_optimizer(cfg, labels, 10)
  trainable, _ = optim.split(PARAMS, labels)
  state = tx.init(trainable)
  assert set(state.inner_states) == {"main", "main@3"}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), state, trainable)
  lr = schedules["main"]
  assert float(lr(3)) > 2 * float(lr(0))   # in the warmup: the two differ
  one = 1 / (1 + cfg.eps)                  # AdamW's first update of a unit gradient
  np.testing.assert_allclose(updates["encoder"]["w"], -float(lr(3)) * one, rtol=1e-6)
  np.testing.assert_allclose(updates["projector"]["w"], -float(lr(0)) * one, rtol=1e-6)


@pytest.mark.parametrize("groups, n, total, match", [
    ((("^projector/", "main"), (".*", None)), 2, 10, "trains no encoder param"),
    (GROUPS, 10, 10, r">= config.total_steps=10"),
    ((("^encoder/", "main"), (".*", None)), 2, 10, "before that step nothing would train"),
    (GROUPS, -1, 10, "must be an int >= 0"),
])
def test_bad_freeze_finetune_updates_is_an_error_naming_the_key(groups, n, total, match):
  cfg = _optim(n)
  labels = optim.label_params(PARAMS, groups)
  with pytest.raises(ValueError, match=rf"config\.optim\.freeze_finetune_updates.*{match}"):
    optim.phase_labels(labels, cfg, 0, total)


def test_freeze_finetune_updates_none_is_zero_and_a_float_is_an_error():
  assert optim.unfreeze_step({"freeze_finetune_updates": None}) == 0
  assert optim.unfreeze_step({}) == 0
  with pytest.raises(ValueError, match=r"freeze_finetune_updates=2\.5 must be an int"):
    optim.unfreeze_step({"freeze_finetune_updates": 2.5})


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_layouts_of_the_two_phases_and_the_switch_between_them():
  config = tiny_config("mlp")
  config.optim.param_groups = GROUPS
  config.optim.freeze_finetune_updates = 2
  config.frozen_param_dtype = "bfloat16"
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model = build_lib.build_model(config)
  before = state_lib.layout(model, config, mesh, step=0)
  after = state_lib.layout(model, config, mesh, step=2)
  assert before.until == 2 and after.until is None
  assert state_lib.layout(model, config, mesh).labels == after.labels   # None: the last phase
  assert all(v is optim.FROZEN for k, v in before.labels.items() if k[0] == "encoder")
  assert all(v == "main" for k, v in after.labels.items() if k[0] == "encoder")
  # One storage dtype per param in both phases: the encoder's is the trainable one.
  assert before.params == after.params
  assert {x.dtype for x in jax.tree.leaves(before.params["encoder"])} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(before.params["llm"])} == {jnp.dtype("bfloat16")}
  assert not any("encoder" in k for k in _leaves(before.opt_state))
  # The switch: the projector's state carried as it is, the encoder's created fresh.
  state = state_lib.create(model, config, before)
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
  old = _leaves(state.opt_state)
  layout, state = state_lib.next_phase(model, config, before, state)
  assert layout.labels == after.labels and layout.until is None
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(after.opt_state)
  new = _leaves(state.opt_state)
  for k, v in old.items():
    np.testing.assert_array_equal(new[k], v, err_msg=k)
  added = {k: v for k, v in new.items() if k not in old}
  assert added and all("'main@2'" in k for k in added)
  assert sum("encoder" in k for k in added) == 2 * len(jax.tree.leaves(before.params["encoder"]))
  assert all(not v.any() for v in added.values())          # zero moments, counts 0


STEPS, N = 4, 2


def _run_config(data_dir):
  c = tiny_run_config.get_config(f"steps={STEPS}")
  c.data.data_dir = str(data_dir)
  c.data.cache_features = False           # the encoder runs in the step
  c.data.train_clips = 16
  c.batch_size = c.eval_batch_size = 8    # in-process: 8 simulated devices
  c.optim.param_groups = GROUPS
  c.optim.freeze_finetune_updates = N
  c.loss.label_smoothing = 0.1
  c.checkpoint_every, c.keep_checkpoints = 1, STEPS + 1
  c.eval_every = STEPS                    # validation once, at the end
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run, and runs resumed from its checkpoints at 1 (< N), at N (the
  state the switch made) and at 3 (> N)."""
  data_dir = tmp_path_factory.mktemp("data")
  full = str(tmp_path_factory.mktemp("full"))
  loop.train_and_evaluate(_run_config(data_dir), full)
  resumed = {}
  for start in (1, N, 3):
    workdir = str(tmp_path_factory.mktemp(f"from_{start}"))
    shutil.copytree(os.path.join(full, checkpoint.LATEST_DIR, str(start)),
                    os.path.join(workdir, checkpoint.LATEST_DIR, str(start)))
    loop.train_and_evaluate(_run_config(data_dir), workdir)
    resumed[start] = workdir
  return full, resumed


def test_the_encoder_starts_training_at_n(runs):
  full, _ = runs
  enc = {s: workdir_files.saved_state(full, s)["params"]["encoder"] for s in (1, 2, 3)}
  flat = {s: flax.traverse_util.flatten_dict(t) for s, t in enc.items()}
  assert all(np.array_equal(flat[1][k], flat[2][k]) for k in flat[1])     # step 1: frozen
  assert any(not np.array_equal(flat[2][k], flat[3][k]) for k in flat[2])  # step 2: trained
  opt = {s: _leaves(workdir_files.saved_state(full, s)["opt_state"]) for s in (1, 2, 3)}
  assert not any("encoder" in k for k in opt[1])
  counts = {s: [v for k, v in opt[s].items() if "main@2" in k and "count" in k] for s in (2, 3)}
  assert counts[2] and all(c == 0 for c in counts[2])    # created at N, before its first update
  assert all(c == 1 for c in counts[3])
  losses = workdir_files.scalars(full, "train/loss", "train/lm_nll")
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert all(loss != nll for loss, nll in losses.values())   # label smoothing is on


@pytest.mark.parametrize("start", [1, N, 3])
def test_resume_before_at_and_after_n_is_bitwise_exact(runs, start):
  full, resumed = runs
  want, got = _leaves(workdir_files.saved_state(full, STEPS)), _leaves(workdir_files.saved_state(resumed[start], STEPS))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  lf, lr = workdir_files.scalars(full, "train/loss", "train/lm_nll"), workdir_files.scalars(resumed[start], "train/loss", "train/lm_nll")
  assert sorted(lr) == list(range(start + 1, STEPS + 1))
  assert all(lr[s] == lf[s] for s in lr), (lf, lr)
