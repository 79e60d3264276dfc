"""A run's fixed parts, made from its config: resolved config, tokenizer, mesh, model.

No state is made here (``state``), no weights are read (``pretrained``, ``open``).
Resolving fills what a config leaves to be derived, so that config.json is
complete:

- ``data.data_dir``: '' -> ``$VSRLLM_DATA_DIR`` or ~/.cache/vsrllm_jax/tensorflow_datasets
- ``llm.tokenizer_path``: '' -> the LLM checkpoint's tokenizer, else the
  synthetic data's word-level tokenizer (built on first use)
- ``llm.vocab_size``: 0 -> the tokenizer's size (random-init LLM only)
- the tokenizer's special tokens are checked (``tokenizer.special_tokens``),
  and one without a pad token gets the documented fallback (unk, else EOS).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax
import ml_collections

from vsrllm_jax import sharding
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models.vsr_model import VSRModel


def resolve_config(config: ml_collections.ConfigDict):
  """Returns (resolved copy of ``config``, tokenizer)."""
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    if not config.data.data_dir:
      config.data.data_dir = synthetic_lips.default_data_dir()
    if not config.llm.tokenizer_path:
      config.llm.tokenizer_path = (config.llm.path or tokenizer_lib.default_tokenizer_dir(
          config.data.data_dir, config.data.instruction))
    tok = tokenizer_lib.load_tokenizer(config.llm.tokenizer_path)
    # Fails now, not at the first batch, if data.chat_template asks for a
    # template the tokenizer lacks (or a checkpoint lists bad eos ids).
    tokenizer_lib.special_tokens(tok, chat_template=bool(config.data.get("chat_template", False)))
    if not config.llm.path and config.llm.vocab_size <= 0:
      config.llm.vocab_size = len(tok)
  return config, tok


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """The parts of a run that its config alone decides."""
  config: ml_collections.ConfigDict     # resolved
  tokenizer: Any
  eos_ids: tuple[int, ...]              # decoding stops at any (an instruct model's end of turn)
  mesh: jax.sharding.Mesh
  model: VSRModel


def make(config, *, mesh_shape: Sequence[int] | None = None, devices=None) -> RunSetup:
  """Resolves ``config`` and builds tokenizer, mesh (``config.mesh.shape`` unless
  ``mesh_shape``, over ``devices`` or all) and model."""
  config, tok = resolve_config(config)
  eos_ids = tokenizer_lib.special_tokens(
      tok, chat_template=config.data.get("chat_template", False)).eos_ids
  mesh = sharding.make_mesh(config.mesh.shape if mesh_shape is None else mesh_shape, devices)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % data_parallel:
      raise ValueError(f"config.{key}={config[key]} is not divisible by the {data_parallel} "
                       "data-parallel devices (mesh data x fsdp)")
  logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)
  return RunSetup(config=config, tokenizer=tok, eos_ids=tuple(eos_ids), mesh=mesh,
                  model=build_lib.build_model(config))


def host_setup(config) -> RunSetup:
  """``make`` on one device: for reading and writing weights on the host (convert,
  from_torch), whatever mesh the run trained on."""
  return make(config, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
