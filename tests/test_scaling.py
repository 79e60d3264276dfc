"""Scale behaviour on 8 simulated devices: meshes agree, presets shard as named,
one compilation, bf16 frozen storage, no weight-gradient matmuls, FLOP counting."""
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.training import losses, optim, step as step_lib
from vsrllm_jax import sharding
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run import throughput
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import layers

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


def _setup(config, shape):
  devices = jax.devices()[:int(np.prod(shape))]
  mesh = sharding.make_mesh(shape, devices)
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  batch = sharding.global_batch(random_batch(config, config.batch_size, seed=5), mesh)
  return mesh, model, layout, state, batch


def _loss_and_grads(config, model, labels, mesh):
  """Jitted (loss, trainable grads) of the train objective under the run's sharding rules."""
  weights, rules = dict(config.loss_weights), sharding.rules(config)

  def f(params, model_state, batch):
    with sharding.activation_sharding(mesh, rules):
      trainable, frozen = optim.split(params, labels)

      def loss(t):
        named, _ = step_lib.compute_losses(model, optim.merge(t, jax.lax.stop_gradient(frozen)),
                                             model_state, batch, train=True,
                                             rng=jax.random.key(1))
        return losses.weighted_total(named, weights)
      return jax.value_and_grad(loss)(trainable)
  return jax.jit(f)


@pytest.fixture(scope="module")
def per_mesh():
  """Loss and trainable gradients of one batch on each mesh (same init everywhere)."""
  config = tiny_config("multiscale_contrastive")
  out = {}
  for shape in MESHES:
    mesh, model, layout, state, batch = _setup(config, shape)
    loss, grads = _loss_and_grads(config, model, layout.labels, mesh)(
        state.params, state.model_state, batch)
    out[shape] = (float(loss), jax.tree.map(np.asarray, grads), state)
  return out


@pytest.mark.parametrize("shape", MESHES[1:])
def test_loss_and_trainable_grads_agree_across_meshes(per_mesh, shape):
  loss1, grads1, state1 = per_mesh[(1, 1, 1)]
  loss, grads, state = per_mesh[shape]
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the same init
  assert loss == pytest.approx(loss1, rel=1e-5)
  flat1, flat = (flax.traverse_util.flatten_dict(g) for g in (grads1, grads))
  assert flat1.keys() == flat.keys() and len(flat) > 4
  for k in flat1:
    np.testing.assert_allclose(flat[k], flat1[k], atol=1e-5, err_msg="/".join(k))


def _spec_axes(x):
  return {a for part in x.sharding.spec if part for a in ((part,) if isinstance(part, str)
                                                          else part)}


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_presets_shard_params_as_their_rules_say(preset):
  config = tiny_config("mlp")
  config.sharding = preset
  mesh = sharding.make_mesh((2, 2, 2))
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  labels, tx = layout.labels, layout.tx
  llm = flax.traverse_util.flatten_dict(state.params["llm"])
  axes = {"/".join(k): _spec_axes(v) for k, v in llm.items()}
  q = state.params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]   # [L, E, H, D]
  if preset == "dp":
    assert all(not a for a in axes.values()), axes
    return
  # fsdp splits every matrix on its model (embed) dimension; norms too.
  assert q.sharding.spec[1] == "fsdp"
  assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 2
  matrices = [k for k, v in llm.items() if v.ndim >= 2]
  assert all("fsdp" in axes[k] for k in ("/".join(m) for m in matrices)), axes
  if preset == "fsdp":
    assert all("tensor" not in a for a in axes.values()), axes
  else:
    assert q.sharding.spec[2] == "tensor"                               # heads
    down = state.params["llm"]["layers"]["mlp"]["down_proj"]["kernel"]  # [L, M, E]
    assert down.sharding.spec[1:] == ("tensor", "fsdp")
  # AdamW moments live where their params live.
  trainable, _ = optim.split(state.params, labels)
  same = optax.tree_map_params(tx, lambda m, p: m.sharding.is_equivalent_to(p.sharding, p.ndim),
                               state.opt_state, trainable, transform_non_params=lambda _: True)
  assert all(jax.tree.leaves(same))


def test_unknown_preset_is_an_error_naming_the_key():
  config = tiny_config("mlp")
  config.sharding = "zero3"
  with pytest.raises(ValueError, match="config.sharding='zero3'"):
    sharding.rules(config)


def test_step_compiles_once_over_five_steps():
  config = tiny_config("mlp")
  mesh, model, layout, state, _ = _setup(config, (2, 2, 2))
  step = step_lib.make_train_step(model, config, layout)
  for i in range(5):   # new data every step, same shapes
    batch = sharding.global_batch(random_batch(config, config.batch_size, seed=10 + i), mesh)
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["train/loss"]))
  assert step._cache_size() == 1   # pylint: disable=protected-access


def test_bf16_frozen_storage_keeps_trainables_and_optimizer_state_in_fp32():
  config = tiny_config("mlp")
  config.dtype, config.frozen_param_dtype = "bfloat16", "bfloat16"
  _, model, layout, state, batch = _setup(config, (2, 2, 2))
  flat = flax.traverse_util.flatten_dict(state.params)
  for k, v in flat.items():
    want = jnp.float32 if k[0] == "projector" else jnp.bfloat16
    assert v.dtype == want, ("/".join(k), v.dtype)
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype("float32")}
  step = step_lib.make_train_step(model, config, layout)
  new, metrics = step(state, batch)
  assert all(v.dtype == flat[k].dtype
             for k, v in flax.traverse_util.flatten_dict(new.params).items())
  # Same objective as fp32 to bf16 accuracy.
  config32 = tiny_config("mlp")
  _, model32, layout32, state32, batch32 = _setup(config32, (2, 2, 2))
  _, m32 = step_lib.make_train_step(model32, config32, layout32)(state32, batch32)
  assert float(metrics["train/lm"]) == pytest.approx(float(m32["train/lm"]), rel=2e-2)


def _compiled_step(config):
  _, model, layout, state, batch = _setup(config, (1, 1, 1))
  with layers.unrolled_scans():   # XLA counts a loop body once; unrolled, it counts all
    step = step_lib.make_train_step(model, config, layout)
    compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, float(cost["flops"]), model, state, batch


def test_frozen_llm_runs_no_weight_gradient_matmuls():
  """From the compiled HLO: training the LLM adds exactly its weight-gradient dots
  and their FLOPs; frozen, they are absent. (The embedding table stays frozen: its
  gradient is a scatter-add, not a matmul; test_freezing.py trains it.)"""
  config = tiny_config("mlp")
  config.llm.num_layers = 2
  frozen, frozen_flops, model, state, batch = _compiled_step(config)
  config.optim.param_groups = (("^projector/", "main"), ("^llm/embed_tokens/", None),
                               ("^llm/", "main"), (".*", None))
  trained, trained_flops, *_ = _compiled_step(config)
  dots = lambda c: len(re.findall(r"\bdot\(", c.as_text()))
  cfg = model.llm_config
  # Per layer: q, k, v, o, gate, up, down; plus the LM head.
  weight_matmuls = 7 * cfg.num_layers + (0 if cfg.tie_word_embeddings else 1)
  assert dots(trained) - dots(frozen) == weight_matmuls
  b = batch["label_ids"].shape[0]
  mf = throughput.model_flops(model, state.params, state.model_state, batch)
  seq = mf["llm_tokens"] / b
  analytic = throughput.llm_step_flops(cfg, b, int(seq), batch["label_ids"].shape[1],
                                       weight_grads=True)
  # The rest of the difference is AdamW's elementwise update of the LLM's params.
  n_llm = sum(leaf.size for name, sub in state.params["llm"].items() if name != "embed_tokens"
              for leaf in jax.tree.leaves(sub))
  extra = trained_flops - frozen_flops - analytic["weight_grad"]
  assert 0 <= extra <= 40 * n_llm, (extra, n_llm)


def test_model_flops_of_the_llm_follow_the_formula():
  config = tiny_config("mlp")
  _, model, _, state, batch = _setup(config, (1, 1, 1))
  cfg = model.llm_config
  mf = throughput.model_flops(model, state.params, state.model_state, batch)
  b, li, ll = (batch["instruction_ids"].shape[0], batch["instruction_ids"].shape[1],
               batch["label_ids"].shape[1])
  seq = li + config.data.max_frames + ll        # mlp: one token per frame
  assert mf["llm_tokens"] == b * seq
  per_layer = (cfg.hidden_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
               + 3 * cfg.hidden_dim * cfg.mlp_dim)
  dense = 2 * b * seq * cfg.num_layers * per_layer
  attention = 4 * b * cfg.num_layers * seq * seq * cfg.num_heads * cfg.head_dim
  head = 2 * b * ll * cfg.hidden_dim * cfg.vocab_size
  assert mf["llm"] == pytest.approx(2 * dense + 3 * attention + 2 * head)
  assert mf["encoder"] > 0 and mf["projector"] > 0   # the encoder runs on raw video here


def test_meter_reports_mfu_against_the_peak():
  meter = throughput.Meter(num_devices=2, peak_per_device=1e9)
  meter.pause()
  meter.resume()
  for _ in range(3):
    meter.count({"model_flops": 1e6, "hardware_flops": 2e6, "llm_tokens": 10})
  out = meter.report()
  assert out["perf/hfu"] == pytest.approx(2 * out["perf/mfu"])
  assert out["perf/model_flops_per_s"] == pytest.approx(out["perf/mfu"] * 2e9)
  assert out["perf/tokens_per_s"] * out["perf/step_time_s"] == pytest.approx(10)
  assert throughput.peak_flops_per_device(override=5.0) == 5.0


def test_packed_sequences_for_fused_attention_give_the_same_logits(monkeypatch):
  """attention_impl='cudnn' packs padding to the end and runs causal attention with
  sequence lengths; with cuDNN's kernel swapped for XLA's (no GPU here) the logits
  equal the masked model's on a batch with padding inside every segment."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = tiny_config("mlp")
  model = build_lib.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 4, seed=2).items()}
  variables = model.init({"params": jax.random.key(0)}, batch)
  want = model.apply(variables, batch)["logits"]
  calls = []
  fused = jax.nn.dot_product_attention

  def as_xla(*args, implementation=None, **kwargs):
    calls.append((implementation, kwargs.get("is_causal"), kwargs.get("mask") is None))
    return fused(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  packed = model.clone(llm_config=dataclasses.replace(model.llm_config, attention_impl="cudnn"))
  got = packed.apply(variables, batch)["logits"]
  assert calls and all(c == ("cudnn", True, True) for c in calls)   # causal + lengths, no mask
  real = np.asarray(batch["label_mask"])
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
