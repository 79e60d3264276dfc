"""The Flax Llama decoder against transformers (PyTorch): logits, generation, I/O.

Tiny random models are built with transformers and saved to tmp dirs; no
network. Compiled functions are shared through module fixtures.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from vsrllm_jax.configs.common import get_base_config
from tests.helpers.hf_models import saved_llama
from tests.helpers.numerics import assert_close
from vsrllm_jax.inference import generation
from vsrllm_jax.formats import hf_llm
from vsrllm_jax.models import llm, rope

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
            max_position_embeddings=512)


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _hf_logits(hf, ids, mask=None, positions=None):
  t = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    return hf(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()


def _positions(mask):
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """A tiny LlamaForCausalLM and the directory it was saved to (safetensors)."""
  path = tmp_path_factory.mktemp("llama")
  return saved_llama(path, **TINY), path


@pytest.fixture(scope="module")
def ours(hf_llama):
  """(model, params, jitted forward) loaded with our from_pretrained."""
  model, params = hf_llm.from_pretrained(hf_llama[1])

  @jax.jit
  def forward(params, ids, mask, logit_positions=None):
    return model.apply({"params": params}, ids, attention_mask=mask,
                       logit_positions=logit_positions)

  return model, params, forward


def _padded_batch(rng, lengths, seq_len, vocab=TINY["vocab_size"]):
  ids = rng.integers(3, vocab, size=(len(lengths), seq_len))
  mask = (np.arange(seq_len)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids, mask


def test_logits_match_transformers_right_padded(hf_llama, ours):
  hf, _ = hf_llama
  _, params, forward = ours
  ids, mask = _padded_batch(np.random.default_rng(0), [12, 7, 3], 12)
  expected = _hf_logits(hf, ids, mask, _positions(mask))
  got = np.asarray(forward(params, ids, mask))
  assert got.shape == expected.shape and got.dtype == np.float32
  real = mask.astype(bool)
  assert np.abs(expected[real]).max() > 0.3  # logits O(1): the tolerance means something
  assert_close(got[real], expected[real], rtol=1e-4, atol_frac=1e-5)


def test_logits_match_transformers_long_sequence(hf_llama, ours):
  hf, _ = hf_llama
  _, params, forward = ours
  ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(1, 300))
  got = np.asarray(forward(params, ids, np.ones_like(ids)))
  assert_close(got, _hf_logits(hf, ids), rtol=1e-4, atol_frac=1e-5)


def test_param_tree_matches_init(ours):
  model, params, _ = ours
  init = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                      jnp.zeros((1, 2), jnp.int32))["params"])
  assert jax.tree.structure(init) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_every_param_has_logical_axes():
  for tie, bias in ((False, False), (True, True)):
    cfg = llm.LlmConfig(vocab_size=32, hidden_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=8, mlp_dim=24, tie_word_embeddings=tie, attention_bias=bias,
                        attention_out_bias=bias)
    # eval_shape keeps the boxes; compiling init (threefry) costs seconds on CPU.
    boxed = jax.eval_shape(llm.LlamaModel(cfg).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 3), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    assert ("lm_head" in boxed) != tie
    for path, leaf in leaves:
      name = jax.tree_util.keystr(path)
      assert isinstance(leaf, nn.LogicallyPartitioned), name
      assert len(leaf.names) == len(leaf.value.shape) and all(leaf.names), name
      assert (leaf.names[0] == "layers") == name.startswith("['layers']"), name


def test_logit_positions_gather(ours):
  _, params, forward = ours
  ids, mask = _padded_batch(np.random.default_rng(2), [12, 7, 3], 12)
  pos = np.array([[0, 5, 11], [6, 6, 2], [2, 0, 1]])
  full = np.asarray(forward(params, ids, mask))
  got = np.asarray(forward(params, ids, mask, pos))
  assert got.shape == (3, 3, TINY["vocab_size"])
  assert_close(got, np.take_along_axis(full, pos[..., None], axis=1), rtol=1e-5, atol_frac=1e-6)


def test_padding_gap_changes_nothing(ours):
  _, params, forward = ours
  rng = np.random.default_rng(3)
  seq = rng.integers(3, TINY["vocab_size"], size=6)
  ids = np.zeros((2, 9), np.int64)
  ids[0, :6] = seq                                   # [a b c d e f _ _ _]
  ids[1] = np.concatenate([seq[:3], rng.integers(3, 96, 3), seq[3:]])  # [a b c X X X d e f]
  mask = np.array([[1] * 6 + [0] * 3, [1, 1, 1, 0, 0, 0, 1, 1, 1]], np.int32)
  logits = np.asarray(forward(params, ids, mask))
  assert_close(logits[1, [0, 1, 2, 6, 7, 8]], logits[0, :6], rtol=1e-5, atol_frac=1e-6)


def test_cached_decoding_matches_full_forward(ours):
  model, params, forward = ours
  rng = np.random.default_rng(4)
  ids = rng.integers(3, TINY["vocab_size"], size=(2, 10))
  mask = np.array([[1] * 10, [0, 1, 1, 0, 0, 1, 1, 1, 1, 1]], np.int32)  # left pad + gap
  full = np.asarray(forward(params, ids, mask))

  @jax.jit
  def step(params, ids, mask, cache):
    return model.apply({"params": params}, ids, attention_mask=mask, cache=cache)

  cache = llm.init_cache(model.config, 2, 10)
  logits, cache = step(params, ids[:, :4], mask[:, :4], cache)  # prefill, padded inside
  pieces = [np.asarray(logits)]
  for t in range(4, 10):
    logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  real = mask.astype(bool)
  assert_close(cached[real], full[real], rtol=1e-5, atol_frac=1e-6)
  assert int(cache["index"]) == 10
  np.testing.assert_array_equal(np.asarray(cache["positions"]), mask.sum(1))
  np.testing.assert_array_equal(np.asarray(cache["mask"]), real)


def test_remat_and_embeds_path_give_same_gradients(ours):
  """Training feeds inputs_embeds and asks for logits at label positions only."""
  model, params, _ = ours
  ids, mask = _padded_batch(np.random.default_rng(7), [8, 5], 8)
  embeds = model.apply({"params": params}, ids, method=llm.LlamaModel.embed)
  label_pos = np.array([[6, 7], [3, 4]])

  def loss(embeds, model):
    logits = model.apply({"params": params}, inputs_embeds=embeds, attention_mask=mask,
                         logit_positions=label_pos)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5])

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  base = np.asarray(grad(embeds, model))
  assert np.abs(base).max() > 0
  remat = llm.LlamaModel(dataclasses.replace(model.config, remat_policy="full"))
  assert_close(grad(embeds, remat), base, rtol=1e-5, atol_frac=2e-6)


@pytest.fixture(scope="module")
def hf_greedy(hf_llama):
  """32 greedy tokens from transformers for an unpadded batch (EOS disabled)."""
  hf, _ = hf_llama
  ids = np.random.default_rng(5).integers(3, TINY["vocab_size"], size=(2, 6))
  eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
  try:
    with torch.no_grad():
      out = hf.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                        do_sample=False, max_new_tokens=32, pad_token_id=0)
  finally:
    hf.generation_config.eos_token_id = eos
  assert out.shape == (2, 6 + 32)
  return ids, out[:, 6:].numpy()


def test_greedy_generation_matches_transformers(ours, hf_greedy):
  model, params, _ = ours
  ids, expected = hf_greedy
  gen = jax.jit(functools.partial(generation.greedy_generate_from_ids, model, max_new_tokens=32,
                                  eos_id=-1, pad_id=0))
  got = np.asarray(gen(params, ids, np.ones_like(ids)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, expected)


def test_greedy_generation_stops_at_eos(ours, hf_greedy):
  model, params, _ = ours
  ids, reference = hf_greedy
  eos = int(reference[0, 5])  # a token row 0 emits at step 5 (row 1 may or may not)
  expected = np.full_like(reference, -7)
  for r in range(2):
    hits = np.flatnonzero(reference[r] == eos)
    stop = hits[0] + 1 if len(hits) else reference.shape[1]
    expected[r, :stop] = reference[r, :stop]
  # Pad row 1 in the middle of its prompt: the continuation must not change.
  ids_gap = np.concatenate([ids[:, :3], np.full((2, 2), 50), ids[:, 3:]], axis=1)
  mask_gap = np.array([[1] * 3 + [0, 0] + [1] * 3] * 2, np.int32)
  gen = jax.jit(functools.partial(generation.greedy_generate_from_ids, model, max_new_tokens=32,
                                  eos_id=(eos, 1000), pad_id=-7))
  np.testing.assert_array_equal(np.asarray(gen(params, ids_gap, mask_gap)), expected)


def _random_params(model, seed):
  """O(1) random weights (our init gives logits ~0), built without compiling model.init."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, 2), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: np.float32(jax.tree_util.keystr(path).endswith("['scale']"))
      + rng.normal(0, 0.15, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("variant", ["llama_tied_bias_llama3", "qwen2"])
def test_save_pretrained_round_trip_through_transformers(tmp_path, variant):
  extra = (dict(tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64))
           if variant != "qwen2" else dict(attention_bias=True, rope_theta=1e6))
  cfg = llm.LlmConfig(vocab_size=80, hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=48, max_position_embeddings=256, **extra)
  model = llm.LlamaModel(cfg)
  params = _random_params(model, 2)
  hf_llm.save_pretrained(tmp_path, cfg, params)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert hf.config.model_type == ("qwen2" if variant == "qwen2" else "llama")
  ids, mask = _padded_batch(np.random.default_rng(6), [200, 120], 200, cfg.vocab_size)
  got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask))(params))
  expected = _hf_logits(hf, ids, mask, _positions(mask))
  real = mask.astype(bool)
  assert_close(got[real], expected[real], rtol=1e-4, atol_frac=1e-5)
  # ... and back through our loader unchanged.
  model2, params2 = hf_llm.from_pretrained(tmp_path)
  assert model2.config == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_loads(hf_llama, ours, tmp_path):
  hf, _ = hf_llama
  hf.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  _, params = hf_llm.from_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params, ours[1])
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    hf_llm.from_pretrained(tmp_path)


def test_missing_files_are_named(hf_llama, tmp_path):
  shutil.copytree(hf_llama[1], tmp_path / "ckpt")
  (tmp_path / "ckpt" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf_llm.from_pretrained(tmp_path / "ckpt")
  (tmp_path / "ckpt" / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_llm.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_key_mismatch_is_reported(hf_llama):
  from safetensors.numpy import load_file
  tensors = load_file(str(hf_llama[1] / "model.safetensors"))
  cfg = llm.LlmConfig.from_hf_config(json.loads((hf_llama[1] / "config.json").read_text()))
  tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
  with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"
                     r".*unexpected keys \['model.layers.0.mlp.extra.weight'\]"):
    hf_llm.from_hf_state_dict(cfg, tensors)


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("mlp_bias", True), ("model_type", "gemma2"),
    ("sliding_window", 4096), ("rope_parameters", {"rope_type": "yarn", "factor": 4.0})])
def test_unsupported_config_fields_raise(field, value):
  hf = transformers.LlamaConfig(**TINY).to_dict()
  hf[field] = value
  with pytest.raises(ValueError, match=f"my/config.json: field '{field}'"):
    llm.LlmConfig.from_hf_config(hf, source="my/config.json")


def test_rope_frequencies_match_transformers():
  for scaling in (None, dict(rope_type="linear", factor=4.0),
                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)):
    hf_cfg = transformers.LlamaConfig(**TINY, rope_parameters=dict(
        scaling or dict(rope_type="default"), rope_theta=10000.0))
    kind = rope.rope_type(scaling)
    init = (transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
            .compute_default_rope_parameters if kind == "default"
            else transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind])
    expected = init(hf_cfg)[0].numpy()
    np.testing.assert_allclose(rope.inverse_frequencies(16, 10000.0, scaling), expected, rtol=1e-6)
  with pytest.raises(NotImplementedError, match="yarn"):
    rope.inverse_frequencies(16, 1e4, dict(rope_type="yarn"))


def test_config_from_common_config_dict():
  c = get_base_config()
  cfg = llm.LlmConfig.from_config_dict(c.llm, vocab_size=40, dtype="bfloat16")
  assert (cfg.hidden_dim, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.dtype) == (
      c.llm.hidden_dim, c.llm.num_kv_heads, c.llm.head_dim, 40, "bfloat16")
  hash(cfg)  # static-arg friendly
  back = llm.LlmConfig.from_hf_config(cfg.to_hf_config(), dtype="bfloat16")
  assert back == cfg


def test_old_style_hf_config_fields():
  """Pre-v5 config.json files carry rope_theta and rope_scaling at top level."""
  hf = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=48,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, rope_theta=5e5,
            max_position_embeddings=1024, rope_scaling=dict(
                rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=256), tie_word_embeddings=True)
  cfg = llm.LlmConfig.from_hf_config(hf)
  assert (cfg.rope_theta, cfg.head_dim, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
      5e5, 8, 1, True)
  assert dict(cfg.rope_scaling)["factor"] == 32.0
  assert llm.LlmConfig.from_hf_config(cfg.to_hf_config()) == cfg
  linear = llm.LlmConfig.from_hf_config(dict(hf, rope_scaling=dict(type="linear", factor=2.0)))
  assert dict(linear.rope_scaling) == dict(rope_type="linear", factor=2.0)
