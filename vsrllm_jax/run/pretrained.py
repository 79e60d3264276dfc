"""The pretrained weights a config names (``llm.path``, ``encoder.path``), read once.

A fresh run starts from them (``state.create``); a restored or opened run
never reads them: its checkpoint holds its weights. With ``config.llm.lora`` the
pretrained LLM gains fresh adapters (B = 0: the pretrained function).
"""
from __future__ import annotations

import jax

from vsrllm_jax import sharding
from vsrllm_jax.models import build, encoders, lora
from vsrllm_jax.models.llm import LlamaModel
from vsrllm_jax.formats import hf_llm
from vsrllm_jax.run.state import frozen_dtype


def load(config, mesh) -> tuple[dict, dict]:
  """(params, model_state) of the pretrained submodules, as ``state.create`` takes them.

  The LLM is read straight into its shardings on ``mesh`` (no host copy of the
  whole model) in the frozen storage dtype: an 8B LLM never exists in fp32 when
  it is stored bf16 (a param group that trains it casts it up in ``create``).
  The small encoder comes as host trees.
  """
  params, model_state = {}, {}
  if config.llm.path:
    _, params["llm"] = hf_llm.from_pretrained(
        config.llm.path, dtype=config.dtype, param_dtype=frozen_dtype(config), mesh=mesh,
        rules=sharding.rules(config))
    llm_config = build.llm_config(config)
    if llm_config.lora is not None:
      params["llm"] = lora.with_adapters(params["llm"], LlamaModel(llm_config),
                                         jax.random.fold_in(jax.random.key(config.seed), 1),
                                         mesh=mesh, rules=sharding.rules(config))
  variables = encoders.load_pretrained(config.encoder)
  if variables is not None:
    params["encoder"] = variables["params"]
    if variables.get("batch_stats"):
      model_state["batch_stats"] = {"encoder": variables["batch_stats"]}
  return params, model_state
