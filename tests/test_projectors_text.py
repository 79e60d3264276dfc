"""The text-aware projectors inside the composed model, and the visual_text loss."""
import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_projectors_query import _fast_compile_options, perturb
from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.models import contrastive
from vsrllm_jax.training import step as step_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import projectors

QUERY = dict(num_queries=3, num_layers=1, num_heads=2, mlp_ratio=2, time_embedding_dim=8)
FIELDS = {
    "text_cross_attention": QUERY,
    "text_perceiver": QUERY,
    "text_adaptive_query": QUERY,
    "text_fusion_refinement": dict(QUERY, num_layers=2),
    "text_gated_cross_attention": QUERY,
    "text_hierarchical_moe": dict(num_heads=2, num_experts=3, top_k=2, time_embedding_dim=8),
    "text_pevl_adapter": dict(num_adapters=2),
    "text_multiscale_contrastive": dict(scales=(1, 2), num_output_tokens=3, num_heads=2,
                                        time_embedding_dim=8),
}
NAMES = sorted(FIELDS)
WEIGHTS = {"text_hierarchical_moe": dict(routing=0.1),
           "text_multiscale_contrastive": dict(contrastive=0.1, visual_text=0.1)}
B, VOCAB = 4, 40
jit = functools.partial(jax.jit, compiler_options=_fast_compile_options())


def config_for(name):
  c = tiny_config(name, **FIELDS[name])
  c.loss_weights.update(WEIGHTS.get(name, {}))
  return c


def feature_batch(config, seed=0):
  """random_batch with cached encoder features in place of the video (no encoder
  compile); instructions of at most 3 real tokens, so that holes fit."""
  batch = random_batch(config, B, seed)
  rng = np.random.default_rng(seed + 1)
  t = batch.pop("video").shape[1]
  batch["features_mask"] = batch.pop("video_mask")
  batch["features"] = rng.normal(size=(B, t, config.encoder.hidden_dim)).astype(np.float32)
  li = batch["instruction_ids"].shape[1]
  batch["instruction_mask"] = np.arange(li)[None] < np.array([3, 2, 3, 1])[:, None]
  return batch


def holed_instruction(batch, seed=5):
  """The same real instruction tokens with masked holes between them and random
  ids on every masked position (same shape: one compile)."""
  out = dict(batch)
  ids, mask = batch["instruction_ids"], batch["instruction_mask"]
  rng = np.random.default_rng(seed)
  new_ids = rng.integers(0, VOCAB, ids.shape).astype(ids.dtype)
  new_mask = np.zeros_like(mask)
  for i in range(len(ids)):
    real = ids[i][mask[i]]
    new_ids[i, 2 * np.arange(len(real)) + 1] = real
    new_mask[i, 2 * np.arange(len(real)) + 1] = True
  out["instruction_ids"], out["instruction_mask"] = new_ids, new_mask
  return out


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
  """One jitted init and one jitted forward+backward per projector."""
  name = request.param
  config = config_for(name)
  model = build_lib.build_model(config)
  batch = feature_batch(config)
  variables = jit(model.init)(jax.random.key(0), batch)
  params = nn.meta.unbox(variables["params"])
  noisy = dict(params, projector=perturb(params["projector"]))

  @jit
  def step(params, batch):
    """(projector tokens, aux losses, grads of mean(tokens^2) + aux w.r.t. the projector)."""
    def loss(proj):
      out, state = model.apply({"params": dict(params, projector=proj)}, batch,
                               mutable=["intermediates"])
      tokens = state["intermediates"]["projector_tokens"][0]
      aux = out["projector"].aux_losses
      return jnp.mean(jnp.square(tokens)) + sum(aux.values()), (tokens, aux)
    (_, (tokens, aux)), grads = jax.value_and_grad(loss, has_aux=True)(params["projector"])
    return tokens, aux, grads

  return dict(name=name, config=config, model=model, batch=batch, variables=variables,
              params=params, noisy=noisy, step=step)


def test_registered_text_aware_and_need_text():
  assert [n for n in projectors.names() if n.startswith("text_")] == NAMES
  for name in NAMES:
    assert projectors.get_class(name).text_aware, name
    module = projectors.build(name, dict(FIELDS[name], output_dim=16))
    feats, mask = jnp.zeros((2, 8, 12)), jnp.ones((2, 8), bool)
    with pytest.raises(ValueError, match=f"{name}.*text-aware"):
      jax.eval_shape(module.init, jax.random.key(0), feats, mask)


def test_label_ids_do_not_reach_the_projector(setup):
  s = setup
  other = dict(s["batch"], label_ids=(s["batch"]["label_ids"] + 1) % VOCAB)
  np.testing.assert_array_equal(np.asarray(s["step"](s["noisy"], s["batch"])[0]),
                                np.asarray(s["step"](s["noisy"], other)[0]))


def test_instruction_changes_the_output(setup):
  s = setup
  ids = s["batch"]["instruction_ids"]
  other = dict(s["batch"], instruction_ids=(ids - 4 + 7) % (VOCAB - 4) + 4)
  base = np.asarray(s["step"](s["noisy"], s["batch"])[0])
  changed = np.asarray(s["step"](s["noisy"], other)[0])
  for i in range(B):   # every clip's tokens depend on its own instruction
    assert np.max(np.abs(base[i] - changed[i])) > 1e-4, (s["name"], i)


def test_instruction_padding_changes_nothing(setup):
  s = setup
  base = s["step"](s["noisy"], s["batch"])[0]
  holed = s["step"](s["noisy"], holed_instruction(s["batch"]))[0]
  np.testing.assert_allclose(np.asarray(holed), np.asarray(base), atol=1e-5, rtol=1e-5)


def test_every_param_gets_a_gradient_and_aux_losses_are_finite(setup):
  s = setup
  _, aux, grads = s["step"](s["noisy"], s["batch"])
  assert set(aux) == set(WEIGHTS.get(s["name"], {})) - {"visual_text"}
  for k, v in aux.items():
    assert np.isfinite(float(v)), k
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dead = [jax.tree_util.keystr(p) for p, g in flat
          if not np.all(np.isfinite(g)) or not np.any(np.asarray(g) != 0)]
  assert not dead, f"{s['name']}: params without a finite non-zero gradient: {dead}"


def test_every_param_has_logical_axis_names(setup):
  leaves = jax.tree.leaves(setup["variables"]["params"]["projector"],
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x.shape for x in leaves if not isinstance(x, nn.Partitioned)]
  assert leaves and not unnamed, f"{setup['name']}: params without axis names: {unnamed}"


def _numpy_visual_text(pooled, embeds, mask, temperature, valid):
  m = mask.astype(np.float64)
  text = (embeds * m[..., None]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
  keep = np.flatnonzero(valid & mask.any(1))
  a = pooled[keep] / np.linalg.norm(pooled[keep], axis=1, keepdims=True)
  b = text[keep] / np.linalg.norm(text[keep], axis=1, keepdims=True)
  sim = a @ b.T / temperature
  lse = lambda x, ax: np.log(np.exp(x).sum(ax))
  return float(np.mean(0.5 * (lse(sim, 1) - np.diag(sim) + lse(sim, 0) - np.diag(sim))))


def test_visual_text_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  pooled = rng.normal(size=(5, 6))
  embeds = rng.normal(size=(5, 4, 6))
  mask = np.arange(4)[None] < np.array([4, 2, 0, 1, 3])[:, None]    # row 2 has no label
  valid = np.array([1, 1, 1, 1, 0], bool)                           # row 4 is a filler
  got = contrastive.visual_text_info_nce(jnp.asarray(pooled, jnp.float32),
                                         jnp.asarray(embeds, jnp.float32), mask, 0.2, valid)
  np.testing.assert_allclose(float(got), _numpy_visual_text(pooled, embeds, mask, 0.2, valid),
                             rtol=1e-5)


def test_compute_losses_adds_visual_text_and_check_loss_weights_lists_it():
  name = "text_multiscale_contrastive"
  config = config_for(name)
  config.projector.visual_text_temperature = 0.3
  model = build_lib.build_model(config)
  batch = feature_batch(config, seed=3)
  params = nn.meta.unbox(jit(model.init)(jax.random.key(0), batch)["params"])
  named, _ = jit(lambda p, b: step_lib.compute_losses(model, p, {}, b, train=False))(
      params, batch)
  out = jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
  pooled = np.asarray(out["projector"].embeddings["pooled"], np.float64)
  table = np.asarray(params["llm"]["embed_tokens"]["embedding"], np.float64)
  expected = _numpy_visual_text(pooled, table[batch["label_ids"]], batch["label_mask"], 0.3,
                                np.ones(B, bool))
  np.testing.assert_allclose(float(named["visual_text"]), expected, rtol=1e-4)

  state = types.SimpleNamespace(params=params, model_state={})
  assert step_lib.check_loss_weights(model, state, config, batch) == [
      "contrastive", "lm", "visual_text"]
  del config.loss_weights["visual_text"]
  with pytest.raises(ValueError, match="visual_text"):
    step_lib.check_loss_weights(model, state, config, batch)


def test_only_visual_text_projectors_produce_the_loss():
  """Declared through the projector interface (``label_losses``), read by the registry."""
  assert "visual_text" in projectors.loss_names(dict(name="text_multiscale_contrastive"))
  for name in NAMES + ["multiscale_contrastive", "qformer"]:
    if name != "text_multiscale_contrastive":
      assert "visual_text" not in projectors.loss_names(dict(name=name)), name
