"""Freezing is decided by config.optim.param_groups alone: a trainable encoder gets its
true gradient, a frozen one no backward pass, a trainable param the loss cannot reach is
an error before training; deduplication needs a projector with one token per frame.

The encoder unfreezing at step N (freeze_finetune_updates): test_freeze_finetune.py."""
import re
from types import SimpleNamespace

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax import sharding
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import layers
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.training import losses, reachability
from vsrllm_jax.training import step as step_lib

ENCODER_TRAINS = (("^(projector|encoder)/", "main"), (".*", None))


def _config(param_groups=ENCODER_TRAINS):
  """Tiny shapes, raw video (the encoder runs in the step)."""
  config = tiny_config("mlp")
  config.batch_size = 2
  config.data.max_frames = 4
  config.data.cache_features = False
  config.optim.param_groups = param_groups
  return config


def _step(config, *, run: bool):
  """The train step of ``config`` lowered (scans unrolled: every layer's ops appear) and
  compiled; with ``run``, also a fresh state and a batch."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  batch = sharding.global_batch(random_batch(config, config.batch_size, seed=5), mesh)
  state = state_lib.create(model, config, layout) if run else layout.abstract()
  with layers.unrolled_scans():
    lowered = step_lib.make_train_step(model, config, layout).lower(state, batch)
  return SimpleNamespace(config=config, model=model, layout=layout, state=state, batch=batch,
                         lowered=lowered, compiled=lowered.compile())


@pytest.fixture(scope="module")
def trained():
  """Encoder and projector trainable. AdamW with eps = 1 (far above every gradient) and
  lr = 100 updates each param by lr * g / (|g| + 1), nearly proportional to its gradient,
  so equal params after a step mean equal gradients, not only equal signs; no clipping
  or weight decay, so nothing else moves a param."""
  config = _config()
  config.optim.update(dict(eps=1.0, weight_decay=0.0, clip_grad_norm=0.0))
  config.optim.schedules.main.peak_lr = 100.0   # warmup_steps=1: lr(0) = peak
  return _step(config, run=True)


def _conv_kernels(params) -> int:
  """The encoder's convolutions (3-D stem, ResNet convs and downsamplings)."""
  flat = flax.traverse_util.flatten_dict(params["encoder"])
  return sum(1 for k in flat if k[-1] == "kernel" and re.match(r"(stem_)?conv|downsample", k[-2]))


def test_frozen_encoder_runs_no_backward_pass(trained):
  """From the HLO: frozen, the step runs the encoder's convolutions forward only;
  trainable, it adds one weight-gradient convolution per kernel and one input-gradient
  convolution per kernel but the stem's (its input is the video)."""
  frozen = _step(_config(param_groups=(("^projector/", "main"), (".*", None))), run=False)
  n = _conv_kernels(trained.state.params)
  assert n == 12   # stem + 4 stages: 2 convs each, + 3 downsamplings
  convs = lambda text, op: len(re.findall(op, text))
  assert convs(frozen.compiled.as_text(), r"\bconvolution\(") == n
  assert convs(frozen.lowered.as_text(), r"stablehlo\.convolution") == n
  assert convs(trained.lowered.as_text(), r"stablehlo\.convolution") == 3 * n - 1
  assert convs(trained.compiled.as_text(), r"\bconvolution\(") >= 2 * n
  # The encoder's Transformer and projections: their weight-gradient matmuls too.
  flat = flax.traverse_util.flatten_dict(trained.state.params["encoder"])
  dense = sum(1 for k in flat if k[-1] == "kernel" and k[-2] not in
              ("stem_conv", "conv1", "conv2", "downsample"))
  dots = lambda c: len(re.findall(r"\bdot\(", c.as_text()))
  assert dots(trained.compiled) - dots(frozen.compiled) >= dense


def test_trainable_encoder_gets_its_true_gradient(trained):
  """One train step moves encoder and projector params exactly as AdamW moves them with
  the gradient ``jax.grad`` takes of the loss, on all params, nothing split or stopped."""
  t = trained
  params, model_state = jax.device_get(t.state.params), jax.device_get(t.state.model_state)
  new, metrics = t.compiled(jax.tree.map(lambda x: x.copy(), t.state), t.batch)
  rng = jax.random.fold_in(jax.random.key(t.config.seed), 0)   # the step's rng at step 0

  def loss(p):
    out = t.model.apply({"params": p, **t.state.model_state}, t.batch, train=True,
                        rngs={"dropout": rng})
    return losses.lm_cross_entropy(out["logits"], t.batch["label_ids"],
                                   losses.label_weights(t.batch))

  grads = jax.device_get(jax.jit(jax.grad(loss))(t.state.params))
  opt = t.config.optim
  lr = float(t.layout.schedules["main"](0))

  def adamw_first_step(p, g):   # zero moments, count 1, no decay
    mu_hat = (1 - opt.b1) * g / (1 - opt.b1)
    nu_hat = (1 - opt.b2) * g * g / (1 - opt.b2)
    return p - lr * mu_hat / (np.sqrt(nu_hat) + opt.eps)

  flat = lambda tree: {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      {part: tree[part] for part in ("encoder", "projector")}).items()}
  before, got = flat(params), flat(jax.device_get(new.params))
  want = {k: adamw_first_step(p, g) for (k, p), g in zip(before.items(), flat(grads).values())}
  # Gradients that are zero in exact arithmetic (attention's key bias: softmax ignores a
  # shift) are rounding noise: the floor is a millionth of the largest update.
  floor = 1e-6 * max(float(np.max(np.abs(want[k] - before[k]))) for k in want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=floor, err_msg="/".join(k))
  moved = max(float(np.max(np.abs(got[k] - before[k]))) for k in want if k[0] == "encoder")
  assert moved > 0.1   # the encoder's gradient moved it
  assert float(metrics["train/lm"]) == pytest.approx(float(loss(t.state.params)), rel=1e-5)
  # Batch norm keeps its running statistics while the encoder trains (vsr_model.encode).
  for a, b in zip(jax.tree.leaves(model_state), jax.tree.leaves(jax.device_get(new.model_state))):
    np.testing.assert_array_equal(a, b)


def test_trainable_embedding_table_gets_gradient_at_the_rows_it_looks_up():
  """The LLM's table trains when its group says so (the model stops no gradient): one step
  moves the rows of the real instruction tokens and no row the batch does not look up."""
  t = _step(_config(param_groups=(("^(projector|llm/embed_tokens)/", "main"), (".*", None))),
            run=True)
  table = np.asarray(t.state.params["llm"]["embed_tokens"]["embedding"])
  new, _ = t.compiled(jax.tree.map(lambda x: x.copy(), t.state), t.batch)
  moved = np.flatnonzero(np.any(np.asarray(new.params["llm"]["embed_tokens"]["embedding"])
                                != table, axis=1))
  ids = {k: np.asarray(t.batch[f"{k}_ids"]) for k in ("instruction", "label")}
  real_instruction = set(ids["instruction"][np.asarray(t.batch["instruction_mask"])].tolist())
  assert real_instruction <= set(moved.tolist())
  assert set(moved.tolist()) <= set(np.concatenate([v.ravel() for v in ids.values()]).tolist())
  step_lib.check_trainable_reachable(t.model, t.layout, t.config)   # reached: no error


def _check(config):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model = build_lib.build_model(config)
  step_lib.check_trainable_reachable(model, state_lib.layout(model, config, mesh), config)
  return model


def test_trainable_encoder_on_cached_features_is_an_error_naming_its_params():
  config = _config()
  config.data.cache_features = True            # the encoder never runs in the step
  with pytest.raises(ValueError, match=r"config\.optim\.param_groups labels (\d+) param\(s\) "
                     r"trainable that the loss never reaches .*cached encoder features.*"
                     r"'encoder/final_norm/bias'") as err:
    _check(config)
  model = build_lib.build_model(config)
  n = len(jax.tree.leaves(jax.eval_shape(lambda: model.init(
      jax.random.key(0), batch_lib.dummy_batch(config)))["params"]["encoder"]))
  assert f"labels {n} param(s)" in str(err.value)
  assert "projector/" not in str(err.value)
  config.optim.freeze_finetune_updates = 5     # trained from step 5 on: the same error
  with pytest.raises(ValueError, match=r"never reaches .*'encoder/final_norm/bias'"):
    _check(config)
  config.optim.freeze_finetune_updates = 0
  config.data.cache_features = False           # on raw video every one is reached
  _check(config)
  config.data.cache_features = True            # the default groups: the projector alone
  config.optim.param_groups = (("^(projector|ctc_head)/", "main"), (".*", None))
  _check(config)


class _Toy(nn.Module):
  """Params the loss reaches, and ones it does not (unused, stopped, integer-only,
  a scanned layer's unused slice)."""

  @nn.compact
  def __call__(self, x):
    p = lambda name, shape=(3,): self.param(name, nn.initializers.ones, shape)
    used, stopped, argmax_only = p("used"), p("stopped"), p("argmax_only")
    p("unused")
    stacked, stacked_unused = p("stacked", (2, 3)), p("stacked_unused", (2, 4))

    def body(h, layer):
      w, v = layer
      return jnp.tanh(h * w) + 0.0 * jax.lax.stop_gradient(v).sum(), None

    h, _ = jax.lax.scan(body, x * used, (stacked, stacked_unused))
    h = jax.jit(lambda a, b: a * jax.lax.stop_gradient(b))(h, stopped)
    return jnp.sum(h) + jnp.argmax(argmax_only).astype(jnp.float32)


def test_unreachable_params_are_found_in_the_traced_gradient():
  model = _Toy()
  x = jax.ShapeDtypeStruct((3,), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  loss = lambda p, x: model.apply({"params": p}, x)
  assert reachability.unreachable(loss, params, x) == [
      "argmax_only", "stacked_unused", "stopped", "unused"]
  # A gradient that is zero on some batch is still reached: decided by tracing, not values.
  concrete = model.init(jax.random.key(0), jnp.zeros(3))["params"]
  assert not np.any(jax.grad(loss)(concrete, jnp.zeros(3))["used"])
  assert "used" not in reachability.unreachable(loss, concrete, jnp.zeros(3))


@pytest.mark.parametrize("projector", ["qformer", "perceiver"])
def test_deduplication_with_a_projector_without_one_token_per_frame_is_an_error(projector):
  config = tiny_config(projector)
  config.data.use_cluster_counts = True
  with pytest.raises(ValueError, match=rf"config\.data\.use_cluster_counts=True .*"
                     rf"projector {projector!r} is not"):
    build_lib.build_model(config)
  # Counts in a batch reach no such projector silently either.
  config.data.use_cluster_counts = False
  model = build_lib.build_model(config)
  batch = batch_lib.dummy_batch(config)
  batch["cluster_counts"] = jnp.ones(batch["video_mask"].shape, jnp.int32)
  with pytest.raises(ValueError, match="config.data.use_cluster_counts"):
    jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)


def test_deduplication_with_a_sequence_preserving_projector_builds():
  config = tiny_config("linear")
  config.data.use_cluster_counts = True
  assert build_lib.build_model(config).projector_config["name"] == "linear"
