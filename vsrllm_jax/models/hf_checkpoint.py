"""Hugging Face checkpoint directories <-> our LLM params (safetensors, key map, layouts).

HF stores one tensor per layer with torch ``Linear`` layouts ([out, in]) and
heads flattened; we keep layers stacked on a leading axis (``nn.scan``) and
heads as their own axis. Tensors are read lazily, one at a time, so peak host
memory stays near the size of the converted params.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from vsrllm_jax.models.layers import dtype_from_name
from vsrllm_jax.models.llm import LlamaModel, LlmConfig


def _hf_layer_map(cfg: LlmConfig) -> list[tuple[str, tuple[str, ...], str]]:
  """(HF suffix, our path under 'layers', how to convert) per per-layer tensor."""
  attn = ("self_attn",)
  rows = [("input_layernorm.weight", ("input_layernorm", "scale"), "copy"),
          ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "copy"),
          ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), "linear"),
          ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), "linear"),
          ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), "linear"),
          ("self_attn.o_proj.weight", attn + ("o_proj", "kernel"), "out")]
  for name in ("q_proj", "k_proj", "v_proj"):
    rows.append((f"self_attn.{name}.weight", attn + (name, "kernel"), "heads"))
    if cfg.attention_bias:
      rows.append((f"self_attn.{name}.bias", attn + (name, "bias"), "heads_bias"))
  if cfg.attention_out_bias:
    rows.append(("self_attn.o_proj.bias", attn + ("o_proj", "bias"), "copy"))
  return rows


_TRANSPOSED = ("linear", "heads", "out")  # torch Linear weights are [out, in]


def _hf_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
  """The HF shape of a tensor whose shape is ``shape`` in our layout."""
  size = int(np.prod(shape))
  return {"heads": (size // shape[0], shape[0]), "out": (shape[-1], size // shape[-1]),
          "linear": tuple(shape[::-1]), "heads_bias": (size,)}.get(how, tuple(shape))


def _to_hf(w: np.ndarray, how: str) -> np.ndarray:
  """One of our tensors -> the HF layout (heads flattened, Linear transposed)."""
  if how == "heads":  # [E, H, D] -> [H*D, E]
    return w.reshape(w.shape[0], -1).T
  if how == "out":  # [H, D, E] -> [E, H*D]
    return w.reshape(-1, w.shape[-1]).T
  return w.T if how == "linear" else w.reshape(-1) if how == "heads_bias" else w


def from_hf_state_dict(config: LlmConfig, tensors: Mapping[str, np.ndarray], *,
                       source: str = "state dict") -> dict:
  """HF tensor names -> our nested params (numpy, param_dtype, layers stacked)."""
  pdt = dtype_from_name(config.param_dtype)
  used, missing = set(), []

  def get(name, shape, how="copy"):
    """The converted tensor checked against ``shape`` (zeros if missing; reported below)."""
    if name not in tensors:
      missing.append(name)
      return np.zeros(shape, pdt)
    used.add(name)
    w = np.asarray(tensors[name])
    if w.shape != _hf_shape(shape, how):
      raise ValueError(f"{source}: tensor {name!r} has shape {w.shape}, expected "
                       f"{_hf_shape(shape, how)} for this config.json")
    return np.asarray((w.T if how in _TRANSPOSED else w).reshape(shape), pdt)

  c = config
  e, v = c.hidden_dim, c.vocab_size
  params: dict = {"embed_tokens": {"embedding": get("model.embed_tokens.weight", (v, e))},
                  "final_norm": {"scale": get("model.norm.weight", (e,))}}
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight", (e, v), "linear")}
  elif "lm_head.weight" in tensors:
    used.add("lm_head.weight")  # tied: a stored copy of the table is redundant
  expected = jax.tree.map(lambda x: x.shape[1:], _param_shapes(c)["layers"])
  layers: dict = {}
  for suffix, path, how in _hf_layer_map(c):
    shape = functools.reduce(lambda d, k: d[k], path, expected)
    per_layer = [get(f"model.layers.{i}.{suffix}", shape, how) for i in range(c.num_layers)]
    node = layers
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.stack(per_layer)
  params["layers"] = layers
  unexpected = sorted(k for k in tensors if k not in used and not k.endswith("rotary_emb.inv_freq"))
  if missing or unexpected:
    raise ValueError(f"{source}: checkpoint does not match config.json: missing keys "
                     f"{missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected keys "
                     f"{unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
  return params


def to_hf_state_dict(config: LlmConfig, params) -> dict[str, np.ndarray]:
  """Our params -> HF tensor names and layouts (numpy, contiguous)."""
  p = jax.device_get(nn.meta.unbox(params))
  out = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"],
         "model.norm.weight": p["final_norm"]["scale"]}
  if not config.tie_word_embeddings:
    out["lm_head.weight"] = np.asarray(p["lm_head"]["kernel"]).T
  for suffix, path, how in _hf_layer_map(config):
    stacked = functools.reduce(lambda d, k: d[k], path, p["layers"])
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{suffix}"] = _to_hf(np.asarray(stacked[i]), how)
  return {k: np.ascontiguousarray(np.asarray(w)) for k, w in out.items()}


def _param_shapes(config: LlmConfig) -> dict:
  """Unboxed param shapes of a model, without allocating anything."""
  model = LlamaModel(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.meta.unbox(shapes["params"])


class _LazyTensors(Mapping):
  """name -> numpy tensor, read from the safetensors files only when asked (low peak memory)."""

  def __init__(self, files):
    self._readers = {}
    for f in files:
      reader = safe_open(str(f), framework="numpy")
      self._readers.update({name: reader for name in reader.keys()})

  def __getitem__(self, name):
    return self._readers[name].get_tensor(name)

  def __contains__(self, name):  # Mapping's default would read the tensor
    return name in self._readers

  def __iter__(self):
    return iter(self._readers)

  def __len__(self):
    return len(self._readers)


def _open_safetensors(path: pathlib.Path) -> _LazyTensors:
  """model.safetensors, or the shards listed by model.safetensors.index.json."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    return _LazyTensors([single])
  if not index.is_file():
    raise FileNotFoundError(f"neither {single} nor {index} found: expected a Hugging Face "
                            "safetensors checkpoint directory")
  files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"{f} not found (listed in {index})")
  return _LazyTensors(files)


def from_pretrained(path, *, dtype: str = "float32", param_dtype: str | None = None):
  """(LlamaModel, params) from a local HF checkpoint directory.

  params are host numpy arrays (so sharding code places them without a
  detour through one device). ``param_dtype=None`` keeps the stored dtype.
  """
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face checkpoint directory")
  hf = json.loads(cfg_file.read_text())
  tensors = _open_safetensors(path)
  if param_dtype is None:
    stored = str(tensors["model.norm.weight"].dtype) if "model.norm.weight" in tensors else ""
    param_dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
  config = LlmConfig.from_hf_config(hf, source=str(cfg_file), dtype=dtype, param_dtype=param_dtype)
  return LlamaModel(config), from_hf_state_dict(config, tensors, source=str(path))


def save_pretrained(path, config: LlmConfig, params) -> None:
  """Writes config.json + model.safetensors that transformers can load."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
  save_file(to_hf_state_dict(config, params), str(path / "model.safetensors"),
            metadata={"format": "pt"})
