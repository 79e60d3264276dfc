"""PEFT LoRA adapter directories <-> our adapters (``models/lora.py``).

  DIR/adapter_config.json        peft's LoraConfig: r, lora_alpha, lora_dropout,
                                 target_modules, task_type CAUSAL_LM, base_model_name_or_path
  DIR/adapter_model.safetensors  base_model.model.model.layers.{i}.<block>.<module>.lora_A.weight
                                 [r, in] and .lora_B.weight [out, r], torch Linear layouts

``peft.PeftModel.from_pretrained(base, DIR)`` puts them on the base model in
PyTorch (``base``: the Hugging Face directory ``hf_llm`` writes, without
adapters). Our A [*in, r] and B [r, *out] are Linear-shaped pairs, so the key
map is ``tensor_map`` rules like every other format's.
"""
from __future__ import annotations

import json
import pathlib

import flax

from vsrllm_jax.formats import safetensors_io, tensor_map
from vsrllm_jax.formats.tensor_map import Rule, linear
from vsrllm_jax.models import lora as lora_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LAYER = "base_model.model.model.layers.{i}"
_IN_AXES = {"o_proj": 2}      # our o_proj contracts (heads, head_dim); the rest one axis


def key_map(lora: lora_lib.LoraConfig) -> list[Rule]:
  """Our adapter paths (under the LLM's params) <-> peft's tensor names."""
  rules = []
  for block, module in lora.modules():
    ours = ("layers", block, module)
    theirs = f"{_LAYER}.{block}.{module}"
    rules += [Rule(ours + ("lora_a",), f"{theirs}.lora_A.weight", linear(_IN_AXES.get(module, 1))),
              Rule(ours + ("lora_b",), f"{theirs}.lora_B.weight", linear(1))]
  return rules


def adapter_config(lora: lora_lib.LoraConfig, base_model_name_or_path: str) -> dict:
  """What peft's LoraConfig reads from adapter_config.json."""
  alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": alpha,
          "lora_dropout": lora.dropout, "target_modules": [m for _, m in lora.modules()],
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
          "base_model_name_or_path": base_model_name_or_path}


def save(path, llm_config, params, *, base_model_name_or_path: str) -> None:
  """Writes the adapters of ``params`` (LLM params) as a PEFT adapter directory."""
  if llm_config.lora is None:
    raise ValueError("the LLM has no LoRA adapters to write (config.llm.lora.enabled is False)")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  _, adapters = lora_lib.split_adapters(params)
  tensors = tensor_map.to_theirs(adapters, key_map(llm_config.lora))
  safetensors_io.write(path / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
  (path / ADAPTER_CONFIG).write_text(
      json.dumps(adapter_config(llm_config.lora, base_model_name_or_path), indent=2) + "\n")


def read_config(path) -> lora_lib.LoraConfig:
  """The LoraConfig an adapter directory was written with (peft module names -> ours)."""
  file = pathlib.Path(path) / ADAPTER_CONFIG
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: expected a PEFT adapter directory")
  cfg = json.loads(file.read_text())
  by_module = {module: name for name, (_, module) in lora_lib.TARGETS.items()}
  modules = cfg.get("target_modules") or []
  modules = [modules] if isinstance(modules, str) else list(modules)
  unknown = [m for m in modules if m not in by_module]
  if cfg.get("peft_type", "LORA") != "LORA" or unknown or cfg.get("use_dora") or \
      cfg.get("use_rslora") or cfg.get("bias", "none") != "none":
    raise ValueError(f"{file}: only plain LoRA on {sorted(by_module)} is supported (got "
                     f"peft_type={cfg.get('peft_type')!r}, target_modules={modules}, "
                     f"use_dora={cfg.get('use_dora')}, use_rslora={cfg.get('use_rslora')}, "
                     f"bias={cfg.get('bias')!r})")
  return lora_lib.LoraConfig(targets=tuple(by_module[m] for m in modules), rank=cfg["r"],
                             alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0))


def load(path, llm_config) -> dict:
  """The adapters of a PEFT directory as our tree (numpy, layers stacked), checked against
  ``llm_config.lora`` (the run's config.llm.lora)."""
  from vsrllm_jax.formats import hf_llm  # pylint: disable=g-import-not-at-top
  stored, want = read_config(path), llm_config.lora
  if want is None or (stored.targets, stored.rank, stored.alpha) != (want.targets, want.rank,
                                                                    want.alpha):
    raise ValueError(f"{path}: adapters of targets={stored.targets}, rank={stored.rank}, "
                     f"alpha={stored.alpha}, but config.llm.lora is {want}")
  shapes = flax.traverse_util.flatten_dict(
      lora_lib.split_adapters(hf_llm.param_shapes(llm_config))[1])
  tensors = safetensors_io.read_all(pathlib.Path(path) / ADAPTER_WEIGHTS)
  return tensor_map.from_theirs(tensors, key_map(want), {k: tuple(v.shape) for k, v in
                                                         shapes.items()},
                                source=str(pathlib.Path(path) / ADAPTER_WEIGHTS))
