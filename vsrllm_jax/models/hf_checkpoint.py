"""Hugging Face checkpoint directories <-> our LLM params (safetensors, key map, layouts).

HF stores one tensor per layer with torch ``Linear`` layouts ([out, in]) and
heads flattened; we keep layers stacked on a leading axis (``nn.scan``) and
heads as their own axis. Loading reads the safetensors files with plain reads
(an mmap's touched pages would count as a second copy of the checkpoint in
host memory), one param at a time and in chunks of rows. Given a mesh, each
param is assembled shard by shard straight into its ``NamedSharding``: every
device's slice is read from the files and converted on its own, so neither a
device nor the host ever holds the whole model, and the host holds at most one
param's slices at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from vsrllm_jax import sharding as sharding_lib
from vsrllm_jax.models.layers import dtype_from_name
from vsrllm_jax.models.llm import LlamaModel, LlmConfig

_CHUNK_BYTES = 32 << 20  # the most of one stored tensor read (and converted) at once
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


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


def hf_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
  """The HF shape of a tensor whose shape is ``shape`` in our layout."""
  size = int(np.prod(shape))
  return {"heads": (size // shape[0], shape[0]), "out": (shape[-1], size // shape[-1]),
          "linear": tuple(shape[::-1]), "heads_bias": (size,)}.get(how, tuple(shape))


def to_hf(w: np.ndarray, how: str) -> np.ndarray:
  """One of our tensors -> the HF layout (heads flattened, Linear transposed)."""
  if how == "heads":  # [E, H, D] -> [H*D, E]
    return w.reshape(w.shape[0], -1).T
  if how == "out":  # [H, D, E] -> [E, H*D]
    return w.reshape(-1, w.shape[-1]).T
  return w.T if how == "linear" else w.reshape(-1) if how == "heads_bias" else w


# Which axis of our (per-layer) layout is the first axis of the HF tensor, so
# that a slice of it is a contiguous range of rows in the file.
_ROW_AXIS = {"copy": 0, "linear": 1, "heads": 1, "out": 2, "heads_bias": 0}


def _convert(tensors, name: str, how: str, shape: tuple[int, ...], idx: tuple[slice, ...]):
  """Our layout's ``[idx]`` of the HF tensor ``name`` (``shape``: our per-layer shape)."""
  if how == "copy":
    return tensors.rows(name, idx[0].start, idx[0].stop)[(slice(None),) + idx[1:]]
  if how == "linear":  # ours [in, out] <- HF [out, in]
    return tensors.rows(name, idx[1].start, idx[1].stop)[:, idx[0]].T
  d = shape[-1] if how in ("heads", "heads_bias") else shape[1]  # head_dim
  if how == "heads":  # ours [E, H, D] <- HF [H*D, E]
    h = idx[1]
    w = tensors.rows(name, h.start * d, h.stop * d).reshape(h.stop - h.start, d, -1)
    return w[:, idx[2], idx[0]].transpose(2, 0, 1)
  if how == "heads_bias":  # ours [H, D] <- HF [H*D]
    h = idx[0]
    return tensors.rows(name, h.start * d, h.stop * d).reshape(-1, d)[:, idx[1]]
  if how == "out":  # ours [H, D, E] <- HF [E, H*D]
    h = idx[0]
    w = tensors.rows(name, idx[2].start, idx[2].stop)[:, h.start * d:h.stop * d]
    return w.reshape(w.shape[0], -1, d)[:, :, idx[1]].transpose(1, 2, 0)
  raise ValueError(f"unknown conversion {how!r}")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One of our params and the HF tensors it is read from (one per layer if stacked)."""
  path: tuple[str, ...]
  shape: tuple[int, ...]  # ours; a stacked param leads with the layers axis
  names: tuple[str, ...]
  how: str
  stacked: bool

  def read(self, tensors, index, dtype) -> np.ndarray:
    """``self[index]`` as ``dtype`` (index: slices over ``shape``), read piece by piece."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
    out = np.empty(tuple(s.stop - s.start for s in index), dtype)
    if self.stacked:
      layers, index = index[0], index[1:]
      targets = [(out[j], self.names[i]) for j, i in enumerate(range(layers.start, layers.stop))]
    else:
      targets = [(out, self.names[0])]
    shape = self.shape[1:] if self.stacked else self.shape
    axis = _ROW_AXIS[self.how]
    for dest, name in targets:
      unit = math.prod(shape) // shape[axis] * tensors.dtype(name).itemsize  # bytes per row
      step = max(1, _CHUNK_BYTES // max(unit, 1))
      rows = index[axis]
      for a in range(rows.start, rows.stop, step):
        b = min(a + step, rows.stop)
        sub = index[:axis] + (slice(a, b),) + index[axis + 1:]
        dest[(slice(None),) * axis + (slice(a - rows.start, b - rows.start),)] = _convert(
            tensors, name, self.how, shape, sub)
    return out


def _plan(config: LlmConfig, shapes, tensors, source: str) -> list[ParamSpec]:
  """Every param (``shapes``: the model's) with its HF tensors, checked against ``tensors``."""
  c = config
  shapes = flax.traverse_util.flatten_dict(nn.meta.unbox(shapes))
  top = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", "copy"),
         (("final_norm", "scale"), "model.norm.weight", "copy")]
  if not c.tie_word_embeddings:
    top.append((("lm_head", "kernel"), "lm_head.weight", "linear"))
  plan = [ParamSpec(path, tuple(shapes[path].shape), (name,), how, False)
          for path, name, how in top if path in shapes]
  for suffix, path, how in _hf_layer_map(c):
    path = ("layers",) + path
    if path in shapes:
      plan.append(ParamSpec(path, tuple(shapes[path].shape),
                         tuple(f"model.layers.{i}.{suffix}" for i in range(c.num_layers)),
                         how, True))
  unmapped = sorted("/".join(p) for p in set(shapes) - {p.path for p in plan})
  if unmapped:
    raise ValueError(f"{source}: no Hugging Face tensor maps to the params {unmapped} of this "
                     "LlmConfig (extend hf_checkpoint._hf_layer_map)")
  used, missing = set(), []
  for p in plan:
    want = hf_shape(p.shape[1:] if p.stacked else p.shape, p.how)
    for name in p.names:
      if name not in tensors:
        missing.append(name)
        continue
      used.add(name)
      if tuple(tensors.shape(name)) != want:
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensors.shape(name))}, "
                         f"expected {want} for this config.json")
  if c.tie_word_embeddings and "lm_head.weight" in tensors:
    used.add("lm_head.weight")  # tied: a stored copy of the table is redundant
  unexpected = sorted(k for k in tensors.names()
                      if k not in used and not k.endswith("rotary_emb.inv_freq"))
  if missing or unexpected:
    raise ValueError(f"{source}: checkpoint does not match config.json: missing keys "
                     f"{missing[:10]}{'...' if len(missing) > 10 else ''}, unexpected keys "
                     f"{unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
  return plan


def param_tree(plan: list[ParamSpec], leaves) -> dict:
  return flax.traverse_util.unflatten_dict({p.path: leaf for p, leaf in zip(plan, leaves)})


class _InMemory:
  """A name -> array mapping behind the row-reading interface of ``_SafetensorsFiles``."""

  def __init__(self, tensors: Mapping[str, Any]):
    self._tensors = tensors

  def __contains__(self, name):
    return name in self._tensors

  def names(self):
    return self._tensors.keys()

  def shape(self, name):
    return np.shape(self._tensors[name])

  def dtype(self, name):
    return np.asarray(self._tensors[name]).dtype

  def rows(self, name, start, stop):
    return np.asarray(self._tensors[name])[start:stop]


def from_hf_state_dict(config: LlmConfig, tensors: Mapping[str, np.ndarray], *,
                       source: str = "state dict") -> dict:
  """HF tensor names -> our nested params (numpy, param_dtype, layers stacked)."""
  tensors = _InMemory(tensors)
  plan = _plan(config, _param_shapes(config), tensors, source)
  pdt = dtype_from_name(config.param_dtype)
  return param_tree(plan, [p.read(tensors, (), pdt) for p in plan])


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
      out[f"model.layers.{i}.{suffix}"] = to_hf(np.asarray(stacked[i]), how)
  return {k: np.ascontiguousarray(np.asarray(w)) for k, w in out.items()}


def _param_shapes(config: LlmConfig, boxed: bool = False) -> dict:
  """Param shapes of a model (with logical axis names if ``boxed``), allocating nothing."""
  model = LlamaModel(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  return shapes["params"] if boxed else nn.meta.unbox(shapes["params"])


class _SafetensorsFiles:
  """The tensors of .safetensors files: headers parsed once, row ranges read on demand."""

  def __init__(self, files):
    self._index = {}  # name -> (file, byte offset, shape, numpy dtype)
    for f in files:
      with open(f, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= size - 8:
          raise ValueError(f"{f}: not a safetensors file (header length {n}, file size {size})")
        header = json.loads(fh.read(n))
      for name, meta in header.items():
        if name == "__metadata__":
          continue
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
          raise ValueError(f"{f}: tensor {name!r} has dtype {meta['dtype']!r}; supported: "
                           f"{sorted(_SAFETENSORS_DTYPES)}")
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]]), tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
          raise ValueError(f"{f}: tensor {name!r} (shape {shape}, {meta['dtype']}) has "
                           f"data_offsets {meta['data_offsets']} that do not fit (corrupt or "
                           "truncated file)")
        self._index[name] = (f, 8 + n + begin, shape, dtype)

  def __contains__(self, name):
    return name in self._index

  def names(self):
    return self._index.keys()

  def shape(self, name):
    return self._index[name][2]

  def dtype(self, name):
    return self._index[name][3]

  def rows(self, name, start, stop) -> np.ndarray:
    """Rows [start, stop) along the first axis, read into a fresh array (no mmap)."""
    f, offset, shape, dtype = self._index[name]
    out = np.empty((stop - start,) + shape[1:], dtype)
    buf = out.reshape(-1).view(np.uint8)
    with open(f, "rb", buffering=0) as fh:
      fh.seek(offset + start * math.prod(shape[1:]) * dtype.itemsize)
      done = 0
      while done < buf.size:  # one read() returns at most ~2 GiB on Linux
        got = fh.readinto(buf[done:])
        if not got:
          raise ValueError(f"{f}: unexpected end of file reading tensor {name!r}")
        done += got
    return out


def open_safetensors(path: pathlib.Path) -> _SafetensorsFiles:
  """model.safetensors, or the shards listed by model.safetensors.index.json."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    return _SafetensorsFiles([single])
  if not index.is_file():
    raise FileNotFoundError(f"neither {single} nor {index} found: expected a Hugging Face "
                            "safetensors checkpoint directory")
  files = [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"{f} not found (listed in {index})")
  return _SafetensorsFiles(files)


def default_param_dtype(stored: str) -> str:
  """bfloat16 on accelerators; on CPU the stored dtype (float32 unless bf16/fp16)."""
  if jax.default_backend() != "cpu":
    return "bfloat16"
  return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def from_pretrained(path, *, dtype: str = "float32", param_dtype: str | None = None,
                    mesh: jax.sharding.Mesh | None = None, rules=None):
  """(LlamaModel, params) from a local HF checkpoint directory.

  ``param_dtype=None``: bfloat16 when ``jax.default_backend()`` is an
  accelerator, else the checkpoint's stored dtype. Without ``mesh``, params
  are host numpy arrays. With ``mesh`` and ``rules`` (logical axis -> mesh
  axes, as ``sharding.rules(config)``), they are ``jax.Array``s already in their
  ``NamedSharding`` (``sharding.logical_shardings``); each device's slice is
  read and converted on its own, so no full copy of a param exists anywhere.
  """
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face checkpoint directory")
  if mesh is not None and rules is None:
    raise ValueError("from_pretrained: mesh given without rules (logical axis -> mesh axes, "
                     "e.g. sharding.PRESETS)")
  hf = json.loads(cfg_file.read_text())
  tensors = open_safetensors(path)
  if param_dtype is None:
    norm = "model.norm.weight"
    param_dtype = default_param_dtype(str(tensors.dtype(norm)) if norm in tensors else "")
  config = LlmConfig.from_hf_config(hf, source=str(cfg_file), dtype=dtype, param_dtype=param_dtype)
  boxed = _param_shapes(config, boxed=True)
  plan = _plan(config, boxed, tensors, str(path))
  pdt = dtype_from_name(config.param_dtype)
  if mesh is None:
    leaves = [p.read(tensors, (), pdt) for p in plan]
  else:
    shardings = flax.traverse_util.flatten_dict(
        sharding_lib.logical_shardings(boxed, mesh, rules))
    leaves = [place_param(p, tensors, pdt, shardings[p.path]) for p in plan]
  return LlamaModel(config), param_tree(plan, leaves)


def place_param(param: ParamSpec, tensors, dtype, target: jax.sharding.Sharding) -> jax.Array:
  """One param straight into ``target``, one distinct slice in host memory at a time.

  Each slice is read (and converted) once, put on every device that holds it,
  and dropped before the next is read.
  """
  by_slice: dict = {}
  for device, index in target.addressable_devices_indices_map(param.shape).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, param.shape))
    by_slice.setdefault(key, (index, []))[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    host = param.read(tensors, index, dtype)
    shards += [jax.device_put(host, d) for d in devices]
    del host
  return jax.make_array_from_single_device_arrays(param.shape, target, shards)


def save_pretrained(path, config: LlmConfig, params) -> None:
  """Writes config.json + model.safetensors that transformers can load."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n")
  save_file(to_hf_state_dict(config, params), str(path / "model.safetensors"),
            metadata={"format": "pt"})
