"""LoRA adapters on the LLM (``models/lora.py``), per supported family: the function of
merged kernels, gradients, scan + remat, sharding names, dropout, and both exports
(a merged Hugging Face directory; a PEFT adapter that ``peft.PeftModel`` loads).

The tiny families are those of ``test_llm_families`` (transformers models saved to
tmp dirs, no network). Adapters are random with B nonzero, on every target.
"""
from __future__ import annotations

import dataclasses
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers.numerics import assert_close
from tests.test_llm_families import COMMON, FAMILIES, _hf_logits, _tiny_hf_model
from vsrllm_jax import sharding
from vsrllm_jax.formats import hf_llm, peft as peft_format
from vsrllm_jax.models import llm, lora

ALL = tuple(lora.TARGETS)
LENGTHS, SEQ = (29, 17, 6), 29        # right padded
# fp32 on both sides; the merged kernels differ from ours only by rounding (W + s A B),
# amplified by two layers of random (init range 0.3) weights: errors seen up to ~1.4e-5
# of the largest logit (|logit| <= 10).
RTOL, ATOL_FRAC = 1e-4, 5e-5

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _random_adapters(params, seed: int, scale: float = 0.3):
  """Every adapter random (B nonzero), everything else unchanged."""
  rng = np.random.default_rng(seed)
  def one(path, x):
    if lora.is_adapter(tuple(k.key for k in path)):
      return (scale * rng.standard_normal(x.shape)).astype(x.dtype)
    return np.asarray(x)
  return jax.tree_util.tree_map_with_path(one, jax.device_get(params))


def _with_lora(model, params, targets=ALL, seed=1, **kw):
  """(config with LoRA on ``targets``, params with random adapters added)."""
  cfg = dataclasses.replace(model.config, lora=lora.LoraConfig(targets=targets, rank=4,
                                                               alpha=8.0, **kw))
  params = lora.with_adapters(params, llm.LlamaModel(cfg), jax.random.key(0))
  return cfg, _random_adapters(params, seed)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, COMMON["vocab_size"], size=(len(LENGTHS), SEQ))
  mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return ids, mask


def _logits(cfg, params, ids, mask, **kw):
  return np.asarray(jax.jit(lambda p: llm.LlamaModel(cfg).apply(
      {"params": p}, ids, attention_mask=mask, **kw))(params))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """One family's HF model (saved), ours with random adapters on every target, and
  our fp32 logits on a right-padded batch."""
  name = request.param
  hf = _tiny_hf_model(name)
  path = tmp_path_factory.mktemp(name)
  hf.save_pretrained(path)
  model, base = hf_llm.from_pretrained(path, param_dtype="float32")
  cfg, params = _with_lora(model, base)
  ids, mask = _batch()
  return dict(name=name, path=path, hf=hf, base_config=model.config, base=base, config=cfg,
              params=params, ids=ids, mask=mask, ours=_logits(cfg, params, ids, mask))


def test_logits_equal_those_of_the_merged_kernels(family):
  cfg, params, ids, mask = family["config"], family["params"], family["ids"], family["mask"]
  real = mask.astype(bool)
  merged = lora.merge(cfg.lora, params)
  assert set(flax.traverse_util.flatten_dict(merged)) == set(
      flax.traverse_util.flatten_dict(family["base"]))
  theirs = _logits(family["base_config"], merged, ids, mask)
  ours = family["ours"]
  base = _logits(family["base_config"], family["base"], ids, mask)
  assert np.abs(ours[real] - base[real]).max() > 0.1       # the adapters matter
  print(f"{family['name']}: ours vs merged kernels, max abs error "
        f"{np.abs(ours[real] - theirs[real]).max():.2e} (max |logit| "
        f"{np.abs(theirs[real]).max():.2f})")
  assert_close(ours[real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_merged_export_loads_in_transformers(family, tmp_path):
  """``hf_llm.save_pretrained`` of a LoRA model writes W + scale * A @ B."""
  hf_llm.save_pretrained(tmp_path, family["config"], family["params"])
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info
  real = family["mask"].astype(bool)
  theirs = _hf_logits(hf.eval(), family["ids"], family["mask"])
  print(f"{family['name']}: merged export in transformers, max abs error "
        f"{np.abs(family['ours'][real] - theirs[real]).max():.2e}")
  assert_close(family["ours"][real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_peft_adapter_loads_onto_the_base_model(family, tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  peft_format.save(tmp_path, family["config"], family["params"],
                   base_model_name_or_path=str(family["path"]))
  written = json.loads((tmp_path / peft_format.ADAPTER_CONFIG).read_text())
  assert (written["r"], written["lora_alpha"], written["task_type"]) == (4, 8, "CAUSAL_LM")
  assert written["target_modules"] == [m for _, m in lora.TARGETS.values()]
  base = transformers.AutoModelForCausalLM.from_pretrained(
      family["path"], dtype=torch.float32, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
  real = family["mask"].astype(bool)
  theirs = _hf_logits(model, family["ids"], family["mask"])
  print(f"{family['name']}: base + PEFT adapter, max abs error "
        f"{np.abs(family['ours'][real] - theirs[real]).max():.2e}")
  assert_close(family["ours"][real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)
  # And back: the adapter directory reads into exactly our adapters.
  back = peft_format.load(tmp_path, family["config"])
  want = flax.traverse_util.flatten_dict(lora.split_adapters(family["params"])[1])
  got = flax.traverse_util.flatten_dict(back)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


# --- training-side behaviour (the llama_gqa shape, random init) ----------------------

TINY = llm.LlmConfig(vocab_size=48, hidden_dim=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=48)


def _tiny(targets=ALL, seed=1, **fields):
  cfg = dataclasses.replace(TINY, **fields)
  ids = jnp.zeros((1, 1), jnp.int32)
  base = nn.meta.unbox(llm.LlamaModel(cfg).init(jax.random.key(0), ids)["params"])
  return _with_lora(llm.LlamaModel(cfg), base, targets, seed)


def _loss_and_grads(cfg, params, ids, mask, **kw):
  def loss(p):
    logits = llm.LlamaModel(cfg).apply({"params": p}, ids, attention_mask=mask, **kw)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_adapter_gradients_are_nonzero_and_the_same_under_remat_and_unrolling():
  cfg, params = _tiny()
  ids, mask = _batch()
  ids = ids % TINY.vocab_size
  value, grads = _loss_and_grads(cfg, params, ids, mask)
  flat = flax.traverse_util.flatten_dict(grads)
  adapters = {k: v for k, v in flat.items() if lora.is_adapter(k)}
  assert len(adapters) == 2 * len(ALL)
  for k, g in adapters.items():      # every layer of every target
    assert np.all(np.abs(np.asarray(g)).reshape(g.shape[0], -1).max(axis=1) > 0), k
  for fields in (dict(remat_policy="full"), dict(remat_policy="dots_with_no_batch_dims_saveable"),
                 dict(scan_unroll=3)):
    other = dataclasses.replace(cfg, **fields)
    v2, g2 = _loss_and_grads(other, params, ids, mask)
    assert_close(v2, value, rtol=1e-5, atol_frac=1e-6)
    # Another fusion order: gradients agree to ~1e-5 of their largest element.
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4, atol_frac=5e-5), g2, grads)


def test_a_fresh_adapter_changes_nothing_and_its_b_gets_a_gradient():
  cfg = dataclasses.replace(TINY, lora=lora.LoraConfig())
  ids, mask = _batch()
  ids = ids % TINY.vocab_size
  params = nn.meta.unbox(llm.LlamaModel(cfg).init(jax.random.key(0), ids[:1, :1])["params"])
  base, adapters = lora.split_adapters(params)
  flat = flax.traverse_util.flatten_dict(adapters)
  assert all(not np.any(v) for k, v in flat.items() if k[-1] == "lora_b")
  a = np.asarray(flat[("layers", "self_attn", "q_proj", "lora_a")])
  bound = 1 / np.sqrt(TINY.hidden_dim)                   # peft: U(-1/sqrt(in), 1/sqrt(in))
  assert a.shape == (3, 32, 16) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
  np.testing.assert_array_equal(_logits(cfg, params, ids, mask), _logits(TINY, base, ids, mask))
  _, grads = _loss_and_grads(cfg, params, ids, mask)
  g = flax.traverse_util.flatten_dict(grads)
  assert np.abs(np.asarray(g[("layers", "self_attn", "v_proj", "lora_b")])).max() > 0


def test_disabled_lora_leaves_the_model_as_it_was():
  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  assert not config.llm.lora.enabled and lora.from_config(config) is None
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: llm.LlamaModel(TINY).init(jax.random.key(0), ids))
  assert not [k for k in flax.traverse_util.flatten_dict(shapes["params"]) if lora.is_adapter(k)]


def test_dropout_only_in_training_and_from_the_dropout_rng():
  cfg, params = _tiny(targets=("q", "v"))
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.5))
  ids, mask = _batch()
  ids = ids % TINY.vocab_size
  evaluated = _logits(cfg, params, ids, mask)
  np.testing.assert_array_equal(_logits(cfg, params, ids, mask, train=False), evaluated)
  train = lambda seed: _logits(cfg, params, ids, mask, train=True,
                               rngs={"dropout": jax.random.key(seed)})
  assert np.abs(train(0) - evaluated).max() > 1e-3
  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(train(0) - train(1)).max() > 1e-3
  no_dropout = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
  np.testing.assert_array_equal(_logits(no_dropout, params, ids, mask, train=True), evaluated)
  with pytest.raises(Exception, match="dropout"):
    _logits(cfg, params, ids, mask, train=True)          # no 'dropout' rng given


def test_adapters_are_named_and_sharded_like_the_kernels_they_adapt():
  cfg = dataclasses.replace(TINY, lora=lora.LoraConfig(targets=ALL, rank=4))
  ids = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: llm.LlamaModel(cfg).init(jax.random.key(0), ids))["params"]
  names = {k: v.names for k, v in flax.traverse_util.flatten_dict(boxed).items()}
  for block, module in lora.TARGETS.values():
    kernel = names[("layers", block, module, "kernel")]
    n_in = 2 if module == "o_proj" else 1
    assert names[("layers", block, module, "lora_a")] == kernel[:1 + n_in] + (None,)
    assert names[("layers", block, module, "lora_b")] == ("layers", None) + kernel[1 + n_in:]
  mesh = sharding.make_mesh((1, 4, 2), jax.devices()[:8])
  specs = flax.traverse_util.flatten_dict(jax.tree.map(
      lambda s: s.spec, sharding.logical_shardings(boxed, mesh, sharding.PRESETS["fsdp_tp"])))
  P = jax.sharding.PartitionSpec
  assert specs[("layers", "self_attn", "q_proj", "lora_a")] == P(None, "fsdp", None)
  assert specs[("layers", "self_attn", "q_proj", "lora_b")] == P(None, None, "tensor", None)
  assert specs[("layers", "self_attn", "o_proj", "lora_a")] == P(None, "tensor", None, None)
  assert specs[("layers", "mlp", "down_proj", "lora_b")] == P(None, None, "fsdp")


@pytest.mark.parametrize("field,value,message", [
    ("targets", ("q", "w"), r"config.llm.lora.targets=\('q', 'w'\)"),
    ("targets", (), "config.llm.lora.targets"), ("rank", 0, "config.llm.lora.rank=0"),
    ("dropout", 1.0, "config.llm.lora.dropout=1.0")])
def test_bad_lora_configs_name_the_key(field, value, message):
  with pytest.raises(ValueError, match=message):
    lora.LoraConfig(**{field: value})


def test_enabled_lora_with_frozen_adapters_is_an_error():
  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  config.llm.lora.enabled = True
  assert lora.from_config(config) == lora.LoraConfig(("q", "k", "v"), 16, 32.0, 0.05)
  config.optim.param_groups = (("^projector/", "main"), (".*", None))
  with pytest.raises(ValueError, match="config.optim.param_groups freezes the adapters"):
    lora.from_config(config)


# --- the composed model: what trains, what has optimizer state -------------------------


def _layout(config):
  from vsrllm_jax.models import build  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import state as state_lib  # pylint: disable=g-import-not-at-top
  model = build.build_model(config)
  return state_lib.layout(model, config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))


def _state_paths(tree) -> set[str]:
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_adapters_and_the_projector_have_optimizer_state():
  from tests.helpers.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.training import optim  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.llm.lora.enabled = True
  config.llm.lora.targets = ("q", "v", "down")
  lay = _layout(config)
  trainable = sorted("/".join(k) for k, v in lay.labels.items() if v is not optim.FROZEN)
  assert trainable and all(k.startswith("projector/") or k.endswith(("/lora_a", "/lora_b"))
                           for k in trainable), trainable
  assert sum(k.startswith("llm/") for k in trainable) == 6     # A and B of q, v, down
  paths = _state_paths(lay.opt_state)
  llm_paths = {p for p in paths if "'llm'" in p}
  assert llm_paths and all(p.endswith(("['lora_a']", "['lora_b']")) for p in llm_paths)
  assert not [p for p in paths if "'encoder'" in p or "'kernel']" in p and "'llm'" in p]
  # mu and nu per trainable param (AdamW), nothing for the frozen LLM and encoder
  n_trainable = len(trainable)
  assert len([p for p in paths if "mu" in p]) == n_trainable

  # Their own learning rate: a schedule name of their own.
  config.optim.param_groups = (("^projector/", "main"), ("/lora_[ab]$", "lora"), (".*", None))
  config.optim.schedules.lora = dict(config.optim.schedules.main.to_dict(), peak_lr=1e-4)
  lay = _layout(config)
  assert sorted(lay.schedules) == ["lora", "main"]
  assert {v for k, v in lay.labels.items() if lora.is_adapter(k)} == {"lora"}
  assert lay.schedules["lora"](1000) < lay.schedules["main"](1000)


def test_a_pretrained_llm_gains_fresh_adapters_in_their_shardings(tmp_path):
  from tests.helpers.hf_models import saved_llama  # pylint: disable=g-import-not-at-top
  from tests.helpers.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models import build  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import pretrained, state as state_lib  # pylint: disable=g-import-not-at-top
  saved_llama(tmp_path, vocab_size=40, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  config = tiny_config()
  config.llm.path = str(tmp_path)
  config.llm.lora.enabled = True
  model = build.build_model(config)
  mesh = sharding.make_mesh((1, 2, 4), jax.devices()[:8])
  lay = state_lib.layout(model, config, mesh)
  params, model_state = pretrained.load(config, mesh)
  state = state_lib.create(model, config, lay, pretrained_params=params,
                           pretrained_model_state=model_state)
  got = flax.traverse_util.flatten_dict(state.params["llm"])
  want = flax.traverse_util.flatten_dict(lay.params["llm"])
  _, base = hf_llm.from_pretrained(tmp_path)
  for k, v in got.items():
    assert v.sharding.is_equivalent_to(want[k].sharding, v.ndim) and v.dtype == want[k].dtype, k
    if k[-1] == "lora_b":
      assert not np.any(np.asarray(v)), k
    elif k[-1] == "lora_a":
      assert np.abs(np.asarray(v)).max() > 0, k
    else:
      np.testing.assert_array_equal(np.asarray(v), flax.traverse_util.flatten_dict(base)[k])
  assert sum(lora.is_adapter(k) for k in got) == 6                  # q, k, v: A and B
  assert got[("layers", "self_attn", "q_proj", "lora_a")].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", None)
