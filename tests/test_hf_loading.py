"""Loading Hugging Face checkpoints straight into their shardings (8 simulated devices).

Tiny random transformers models are saved to tmp dirs (one file, and sharded
with an index); the mesh load must give the same values as the host load, in
the shardings the logical axis rules ask for, each device holding its slice.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tests.helpers.tiny import tiny_config
from vsrllm_jax import sharding
from vsrllm_jax.run import pretrained
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.formats import hf_llm, tensor_map

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2,
            max_position_embeddings=128)
RULES = sharding.PRESETS["fsdp_tp"]
BIASES = {("layers", "self_attn", f"{n}_proj", "bias") for n in "qkv"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{'llama': one file, 'llama_sharded': index + shards, 'qwen2': q/k/v biases, tied head}."""
  torch.manual_seed(0)
  out = {}
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
  out["llama"] = tmp_path_factory.mktemp("llama")
  llama.save_pretrained(out["llama"])
  tokenizer_lib.build_word_tokenizer(out["llama"])  # for the experiment path
  out["llama_sharded"] = tmp_path_factory.mktemp("llama_sharded")
  llama.save_pretrained(out["llama_sharded"], max_shard_size="20KB")
  assert len(list(out["llama_sharded"].glob("model-*.safetensors"))) > 2
  qwen = transformers.Qwen2ForCausalLM(
      transformers.Qwen2Config(**TINY, tie_word_embeddings=True)).eval()
  out["qwen2"] = tmp_path_factory.mktemp("qwen2")
  qwen.save_pretrained(out["qwen2"])
  return out


@pytest.fixture(scope="module")
def host_params(checkpoints):
  return {k: hf_llm.from_pretrained(p)[1] for k, p in checkpoints.items()}


def _expected_shard_shape(shape, names, mesh):
  """RULES by hand: embed over fsdp; mlp, heads, kv_heads and vocab over tensor."""
  divisor = {"embed": mesh.shape["fsdp"]}
  divisor.update({k: mesh.shape["tensor"] for k in ("mlp", "heads", "kv_heads", "vocab")})
  return tuple(n // divisor.get(name, 1) for n, name in zip(shape, names))


@pytest.mark.parametrize("name", ["llama", "llama_sharded", "qwen2"])
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_mesh_load_matches_host_load(checkpoints, host_params, name, mesh_shape):
  mesh = sharding.make_mesh(mesh_shape)
  model, params = hf_llm.from_pretrained(checkpoints[name], mesh=mesh, rules=RULES)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 1), jnp.int32))["params"]
  expected = flax.traverse_util.flatten_dict(sharding.logical_shardings(boxed, mesh, RULES))
  boxed = flax.traverse_util.flatten_dict(boxed)
  host = flax.traverse_util.flatten_dict(host_params[name])
  got = flax.traverse_util.flatten_dict(params)
  assert set(got) == set(host) == set(boxed)
  assert (("lm_head", "kernel") in got) == (name != "qwen2")
  whole = set()
  for path, x in got.items():
    what = "/".join(path)
    assert isinstance(x, jax.Array) and x.dtype == host[path].dtype == np.float32, what
    assert x.sharding == expected[path], what
    shard_shape = _expected_shard_shape(x.shape, boxed[path].names, mesh)
    if shard_shape == x.shape:
      whole.add(path)
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      assert shard.data.shape == shard_shape, what
      np.testing.assert_array_equal(np.asarray(shard.data), host[path][shard.index], what)
    np.testing.assert_array_equal(np.asarray(x), host[path], what)
  # Every param is split, except q/k/v biases (heads, head_dim) without a tensor axis.
  assert whole == (BIASES if name == "qwen2" and mesh.shape["tensor"] == 1 else set())


def test_bfloat16_and_small_chunks(checkpoints, host_params, monkeypatch):
  """bf16 storage equals the fp32 load cast; row chunking changes nothing."""
  monkeypatch.setattr(tensor_map, "CHUNK_BYTES", 40)  # a few rows per read
  mesh = sharding.make_mesh((1, 4, 2))
  model, params = hf_llm.from_pretrained(checkpoints["qwen2"], param_dtype="bfloat16", mesh=mesh,
                                      rules=RULES)
  assert model.config.param_dtype == "bfloat16"
  for x, h in zip(jax.tree.leaves(params), jax.tree.leaves(host_params["qwen2"])):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x), h.astype(jnp.bfloat16))
  _, again = hf_llm.from_pretrained(checkpoints["llama_sharded"])
  jax.tree.map(np.testing.assert_array_equal, again, host_params["llama"])


def test_stored_bfloat16_checkpoint(checkpoints, host_params, tmp_path):
  """BF16 safetensors load as stored on CPU (param_dtype None), and as fp32 when asked."""
  hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
  hf.to(torch.bfloat16).save_pretrained(tmp_path)
  mesh = sharding.make_mesh((1, 8, 1))
  model, params = hf_llm.from_pretrained(tmp_path, mesh=mesh, rules=RULES)
  assert model.config.param_dtype == "bfloat16"
  _, as_fp32 = hf_llm.from_pretrained(tmp_path, param_dtype="float32")
  for x, f, h in zip(*map(jax.tree.leaves, (params, as_fp32, host_params["llama"]))):
    assert x.dtype == jnp.bfloat16 and f.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(x), h.astype(jnp.bfloat16))
    np.testing.assert_array_equal(f, h.astype(jnp.bfloat16).astype(np.float32))


def test_default_param_dtype(monkeypatch):
  assert hf_llm.default_param_dtype("float32") == "float32"  # CPU: as stored
  assert hf_llm.default_param_dtype("bfloat16") == "bfloat16"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert hf_llm.default_param_dtype("float32") == "bfloat16"


def test_mesh_without_rules_is_an_error(checkpoints):
  with pytest.raises(ValueError, match="without rules"):
    hf_llm.from_pretrained(checkpoints["llama"], mesh=sharding.make_mesh((1, 8, 1)))


def test_fresh_state_matches_host_placement(checkpoints, host_params, tmp_path):
  """A fresh run's state (``pretrained.load`` into ``state.create``) = random init with the
  LLM replaced by the host load: the LLM read straight into its shardings and its random
  init skipped; other submodules' random values are unchanged."""
  c = tiny_config()
  c.llm.path = str(checkpoints["llama"])
  c.data.cache_features = False
  c.data.data_dir = str(tmp_path)
  c.mesh.shape = (1, 4, 2)
  setup = setup_lib.make(c)
  layout = state_lib.layout(setup.model, setup.config, setup.mesh)
  params, model_state = pretrained.load(setup.config, setup.mesh)
  state = state_lib.create(setup.model, setup.config, layout, pretrained_params=params,
                           pretrained_model_state=model_state)
  mesh = sharding.make_mesh(setup.config.mesh.shape)
  ref_model = build_lib.build_model(setup.config)
  ref = state_lib.create(ref_model, setup.config,
                         state_lib.layout(ref_model, setup.config, mesh))
  ref = ref.replace(params=dict(ref.params, llm=host_params["llama"]))
  assert jax.tree.structure(state) == jax.tree.structure(ref)
  for a, b, s in zip(jax.tree.leaves(state), jax.tree.leaves(ref),
                     jax.tree.leaves(layout.shardings())):
    assert a.sharding.is_equivalent_to(s, a.ndim) and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  embedding = state.params["llm"]["embed_tokens"]["embedding"]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_pretrained_shape_mismatch_is_named(host_params):
  c = tiny_config()
  c.llm.vocab_size = 64
  c.llm.num_layers = 2
  c.llm.mlp_dim = 32  # the checkpoint has 64
  mesh = sharding.make_mesh((1, 8, 1))
  with pytest.raises(ValueError, match=r"params/llm\['layers'\]\['mlp'\]\['down_proj'\]"):
    model = build_lib.build_model(c)
    state_lib.create(model, c, state_lib.layout(model, c, mesh),
                     pretrained_params={"llm": host_params["llama"]})
