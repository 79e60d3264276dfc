"""The export bundle's contract: what ``vsrllm_jax.convert`` writes, ``from_torch`` reads
back and ``torch_port`` runs. No JAX here: the PyTorch side imports it.

  OUT/vsrllm_config.json   CONFIG_FILE: format_version, source, llm, encoder,
                           projector, tokenizer, instructions, decode, config
  OUT/llm/                 LLM_DIR: a Hugging Face directory (or, for a frozen
                           pretrained LLM, OUT/llm_reference.json naming it); a LoRA
                           run's adapters merged into it (``llm.lora.form`` 'merged'),
                           or it holds the base model and
  OUT/llm_adapter/         LORA_ADAPTER_DIR: the adapters as a PEFT directory
                           (``llm.lora.form`` 'peft', ``formats/peft.py``)
  OUT/projector.safetensors   PROJECTOR_FILE, in torch layout
  OUT/<encoder file or dir>   the encoder kind's own format; the config's
                           ``encoder`` entry names it ('file' or 'dir'), its
                           ``format``, its ``kind`` and the ``torch_twin`` that runs it
"""
from __future__ import annotations

import json
import os
from typing import Any

FORMAT_VERSION = 1
CONFIG_FILE = "vsrllm_config.json"
LLM_DIR = "llm"
LLM_REFERENCE_FILE = "llm_reference.json"
LORA_ADAPTER_DIR = "llm_adapter"
LORA_FORMS = ("merged", "peft")
PROJECTOR_FILE = "projector.safetensors"
# Exports written before the encoder registry name no twin: their format says which.
TWIN_OF_FORMAT = {"fairseq_avhubert": "fairseq_avhubert", "torch_layout": "compact",
                  "hf_vision_tower": "hf_vision_tower"}


def read(export_dir: str) -> dict[str, Any]:
  """The export's vsrllm_config.json, checked for its format version."""
  path = os.path.join(export_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: expected a directory written by "
                            "python -m vsrllm_jax.convert")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version={meta.get('format_version')}; this code reads "
                     f"{FORMAT_VERSION}")
  return meta


def write(export_dir: str, meta: dict[str, Any]) -> None:
  with open(os.path.join(export_dir, CONFIG_FILE), "w") as f:
    json.dump(dict(meta, format_version=FORMAT_VERSION), f, indent=2)


def llm_dir(export_dir: str, meta: dict[str, Any]) -> str:
  """The LLM's Hugging Face directory: the export's copy, or the original it references."""
  return meta["llm"].get("reference") or os.path.join(export_dir, meta["llm"]["dir"])


def lora_adapter_dir(export_dir: str, meta: dict[str, Any]) -> str | None:
  """The PEFT adapter directory to put on the LLM, or None (no LoRA, or merged)."""
  lora = meta["llm"].get("lora") or {}
  if lora.get("form") != "peft":
    return None
  return os.path.join(export_dir, lora["adapter_dir"])


def encoder_path(export_dir: str, meta: dict[str, Any]) -> str:
  entry = meta["encoder"]
  return os.path.join(export_dir, entry.get("file") or entry["dir"])


def torch_twin(meta: dict[str, Any]) -> str:
  """The torch_port encoder that runs the exported encoder."""
  entry = meta["encoder"]
  twin = entry.get("torch_twin") or TWIN_OF_FORMAT.get(entry.get("format"))
  if not twin:
    raise ValueError(f"the export's encoder (kind {entry.get('kind')!r}, format "
                     f"{entry.get('format')!r}) has no PyTorch twin")
  return twin
