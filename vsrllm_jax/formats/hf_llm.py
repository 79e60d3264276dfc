"""Hugging Face LLM directories (config.json + safetensors, single or sharded) <-> our
LLM params.

HF stores one tensor per layer with torch ``Linear`` layouts ([out, in]) and
heads flattened; we keep layers stacked on a leading axis (``nn.scan``) and
heads as their own axis: the key map below says which is which
(``tensor_map``). LoRA adapters are not part of this format: writing merges them
into the kernels (``lora.merge``), reading gives the base model (``formats/peft.py``
reads and writes adapters on their own). Loading reads the safetensors files one param at a time and in
chunks of rows; given a mesh, each param is assembled shard by shard straight
into its ``NamedSharding``, so neither a device nor the host ever holds the
whole model, and the host holds at most one param's slices at a time.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vsrllm_jax import sharding as sharding_lib
from vsrllm_jax.formats import safetensors_io, tensor_map
from vsrllm_jax.formats.tensor_map import SAME, FLATTEN, Rule, linear
from vsrllm_jax.models import lora as lora_lib
from vsrllm_jax.models.layers import dtype_from_name
from vsrllm_jax.models.llm import LlamaModel, LlmConfig

_HEADS, _OUT = linear(1), linear(2)     # [E, H, D] <- [H*D, E];  [H, D, E] <- [E, H*D]


def key_map(config: LlmConfig) -> list[Rule]:
  """Our LLM param paths <-> HF tensor names."""
  rules = [Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight"),
           Rule(("final_norm", "scale"), "model.norm.weight")]
  if not config.tie_word_embeddings:
    rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", linear()))
  layer = lambda ours, theirs, how=SAME: Rule(("layers",) + ours,
                                              f"model.layers.{{i}}.{theirs}", how)
  rules += [layer(("input_layernorm", "scale"), "input_layernorm.weight"),
            layer(("post_attention_layernorm", "scale"), "post_attention_layernorm.weight"),
            layer(("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", _OUT)]
  rules += [layer(("mlp", m, "kernel"), f"mlp.{m}.weight", linear())
            for m in ("gate_proj", "up_proj", "down_proj")]
  for name in ("q_proj", "k_proj", "v_proj"):
    rules.append(layer(("self_attn", name, "kernel"), f"self_attn.{name}.weight", _HEADS))
    if config.attention_bias:
      rules.append(layer(("self_attn", name, "bias"), f"self_attn.{name}.bias", FLATTEN))
  if config.attention_out_bias:
    rules.append(layer(("self_attn", "o_proj", "bias"), "self_attn.o_proj.bias"))
  return rules


def param_shapes(config: LlmConfig, boxed: bool = False) -> dict:
  """Param shapes of a model (with logical axis names if ``boxed``), allocating nothing."""
  model = LlamaModel(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return shapes["params"] if boxed else nn.meta.unbox(shapes["params"])


def _tolerated(config: LlmConfig):
  def tolerated(name: str) -> bool:
    # A tied model's stored copy of the table is redundant; rotary buffers are recomputed.
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")
  return tolerated


def base_config(config: LlmConfig) -> LlmConfig:
  """The model this format stores: ``config`` without LoRA adapters."""
  return dataclasses.replace(config, lora=None)


def _plan(config: LlmConfig, reader, source: str) -> list[tensor_map.ParamSpec]:
  shapes = flax.traverse_util.flatten_dict(param_shapes(base_config(config)))
  return tensor_map.plan(key_map(config), shapes, reader, source, tolerated=_tolerated(config))


def default_param_dtype(stored: str) -> str:
  """bfloat16 on accelerators; on CPU the stored dtype (float32 unless bf16/fp16)."""
  if jax.default_backend() != "cpu":
    return "bfloat16"
  return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def read_config(path, **dtypes) -> LlmConfig:
  """The LLM's config from ``path/config.json`` (weights are not read)."""
  cfg_file = pathlib.Path(path) / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face checkpoint directory")
  return LlmConfig.from_hf_config(json.loads(cfg_file.read_text()), source=str(cfg_file), **dtypes)


def from_pretrained(path, *, dtype: str = "float32", param_dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules=None):
  """(LlamaModel, params) from a local HF checkpoint directory.

  ``param_dtype=None``: bfloat16 when ``jax.default_backend()`` is an
  accelerator, else the checkpoint's stored dtype. Without ``mesh``, params
  are host numpy arrays. With ``mesh`` and ``rules`` (logical axis -> mesh
  axes, as ``sharding.rules(config)``), they are ``jax.Array``s already in their
  ``NamedSharding``; each device's slice is read and converted on its own.
  """
  path = pathlib.Path(path)
  read_config(path)   # a clear error before the weights are looked at
  if mesh is not None and rules is None:
    raise ValueError("from_pretrained: mesh given without rules (logical axis -> mesh axes, "
                     "e.g. sharding.PRESETS)")
  tensors = safetensors_io.open_dir(path)
  if param_dtype is None:
    norm = "model.norm.weight"
    param_dtype = default_param_dtype(str(tensors.dtype(norm)) if norm in tensors else "")
  config = read_config(path, dtype=dtype, param_dtype=param_dtype)
  specs = _plan(config, tensors, str(path))
  shardings = None
  if mesh is not None:
    shardings = flax.traverse_util.flatten_dict(
        sharding_lib.logical_shardings(param_shapes(config, boxed=True), mesh, rules))
  params = tensor_map.read_params(specs, tensors, dtype_from_name(config.param_dtype), shardings)
  return LlamaModel(config), params


def from_hf_state_dict(config: LlmConfig, tensors: Mapping[str, np.ndarray], *,
                       source: str = "state dict") -> dict:
  """HF tensor names -> our nested params (numpy, param_dtype, layers stacked; no
  adapters)."""
  reader = safetensors_io.InMemory(tensors)
  return tensor_map.read_params(_plan(config, reader, source), reader,
                                dtype_from_name(config.param_dtype))


def to_hf_state_dict(config: LlmConfig, params) -> dict[str, np.ndarray]:
  """Our params -> HF tensor names and layouts (numpy, contiguous); with ``config.lora``,
  of the merged model (kernels W + scale * A @ B)."""
  params = nn.meta.unbox(params)
  if config.lora is not None:
    params = lora_lib.merge(config.lora, params)
  return tensor_map.to_theirs(params, key_map(config))


def save_pretrained(path, config: LlmConfig, params) -> None:
  """Writes config.json + model.safetensors that transformers can load (LoRA merged)."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
  safetensors_io.write(path / safetensors_io.SINGLE, to_hf_state_dict(config, params))
