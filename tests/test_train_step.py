"""The train step: what changes, what has optimizer state, gradient accumulation.

Mesh agreement, sharding presets and compilation counts: test_scaling.py."""
import flax
import jax
import numpy as np
import pytest

from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.training import optim, step as step_lib
from vsrllm_jax import sharding
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.models import build as build_lib


def make(config, mesh):
  """(state, jitted train step, layout) of the config's model, freshly initialised."""
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  return state_lib.create(model, config, layout), step_lib.make_train_step(model, config,
                                                                           layout), layout


@pytest.fixture(scope="module")
def single():
  config = tiny_config("multiscale_contrastive")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state, step, layout = make(config, mesh)
  batch = sharding.global_batch(random_batch(config, config.batch_size), mesh)
  return config, mesh, state, step, layout.labels, batch


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def test_only_projector_params_change_and_only_they_have_optimizer_state(single):
  config, mesh, state, step, labels, batch = single
  before = _flat(jax.device_get(state.params))
  new_state, metrics = step(jax.tree.map(lambda x: x.copy(), state), batch)
  after = _flat(jax.device_get(new_state.params))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(k.startswith("projector/") for k in changed), sorted(changed)[:5]
  projector_leaves = [k for k in before if k.startswith("projector/")]
  assert len(changed) > 0.8 * len(projector_leaves)   # not just one leaf
  # Optimizer state: exactly the projector leaves (mu and nu), nothing frozen.
  trainable, _ = optim.split(state.params, labels)
  assert set(trainable) == {"projector"}
  opt_shapes = sorted(x.shape for x in jax.tree.leaves(new_state.opt_state) if x.ndim)
  proj_shapes = sorted(v.shape for k, v in before.items() if k.startswith("projector/"))
  assert opt_shapes == sorted(proj_shapes * 2)
  assert np.isfinite(float(metrics["train/loss"]))
  assert set(metrics) >= {"train/loss", "train/lm", "train/contrastive", "train/grad_norm"}


def test_loss_decreases_on_a_fixed_batch(single):
  config, mesh, state, step, labels, batch = single
  state = jax.tree.map(lambda x: x.copy(), state)
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["train/lm"]))
  # A random frozen LLM (init std 0.02) gives nearly flat logits, so the gain is small.
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("accum", [4])
def test_gradient_accumulation_equals_one_large_batch(accum):
  """k micro-batches (with unequal label-token counts) give the whole batch's update."""
  config = tiny_config("mlp")
  mesh = sharding.make_mesh((2, 2, 2))
  batch = random_batch(config, config.batch_size, seed=3)   # label lengths differ per row
  state, step, _ = make(config, mesh)
  new1, m1 = step(state, sharding.global_batch(batch, mesh))
  with config.unlocked():
    config.grad_accum_steps = accum
  state, step_k, _ = make(config, mesh)
  new_k, m_k = step_k(state, sharding.global_batch(batch, mesh))
  assert float(m_k["train/loss"]) == pytest.approx(float(m1["train/loss"]), rel=1e-5)
  assert float(m_k["train/grad_norm"]) == pytest.approx(float(m1["train/grad_norm"]), rel=1e-4)
  for a, b in zip(jax.tree.leaves(new1.params["projector"]), jax.tree.leaves(new_k.params["projector"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
