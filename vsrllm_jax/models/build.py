"""Builds the composed model from a resolved config."""
from __future__ import annotations

import json
import os

from vsrllm_jax.models import encoders, layers, lora
from vsrllm_jax.models.llm import LlmConfig
from vsrllm_jax.models.vsr_model import VSRModel, check_deduplication


def llm_config(config) -> LlmConfig:
  """The LLM's shape: from ``llm.path``'s config.json, else from ``config.llm``; LoRA
  adapters from ``config.llm.lora``."""
  dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype,
                remat_policy=config.llm.remat_policy,
                attention_impl=config.llm.get("attention_impl", "xla"),
                scan_unroll=config.llm.get("scan_unroll", 1), lora=lora.from_config(config))
  if config.llm.path:
    cfg_file = os.path.join(config.llm.path, "config.json")
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f"config.llm.path={config.llm.path!r} has no config.json")
    with open(cfg_file) as f:
      return LlmConfig.from_hf_config(json.load(f), **dtypes)
  if config.llm.vocab_size <= 0:
    raise ValueError("config.llm.vocab_size is unset; resolve the config with its tokenizer "
                     "first (train.py does this)")
  return LlmConfig.from_config_dict(config.llm, config.llm.vocab_size, **dtypes)


def encoder_config(config) -> encoders.EncoderConfig:
  """The encoder's shape: from ``encoder.path`` (a directory or fairseq .pt), else
  ``config.encoder`` (see ``encoders``)."""
  return encoders.config_from(config.encoder)


def build_model(config) -> VSRModel:
  projector_cfg = dict(config.projector)
  if config.data.get("use_cluster_counts"):
    check_deduplication(projector_cfg["name"])
  return VSRModel(
      encoder_config=encoder_config(config),
      projector_config=projector_cfg,
      llm_config=llm_config(config),
      ctc_config=dict(config.ctc) if config.get("ctc") and config.ctc.enabled else None,
      dtype=layers.dtype_from_name(config.dtype),
      param_dtype=layers.dtype_from_name(config.param_dtype))
