r"""Exports a training run's checkpoint for PyTorch (``vsrllm_jax/torch_port``) and HF.

  python -m vsrllm_jax.convert --workdir=DIR --output=OUT [--step=N] [--llm_reference]
      [--lora_export=merged|peft]

Reads the run's config.json and its best checkpoint by validation WER (or
``--step`` from checkpoints/), and writes:

  OUT/llm/                    a Hugging Face directory (config.json, model.safetensors,
                              tokenizer) that transformers' Auto classes load; with
                              --llm_reference and a frozen pretrained LLM, instead
                              OUT/llm_reference.json naming the original directory.
                              A LoRA run (config.llm.lora): by default the adapters
                              merged into the kernels (W + alpha/r * A @ B), a plain
                              transformers model; --lora_export=peft: the base model
                              here (or its reference) and
  OUT/llm_adapter/            the adapters as a PEFT directory (adapter_config.json,
                              adapter_model.safetensors) for peft.PeftModel
  OUT/<encoder>               in its kind's format (``models.encoders``): a fairseq
                              ``encoder.pt`` for AV-HuBERT, ``encoder.safetensors`` in
                              torch layout for the compact encoder, an ``encoder/``
                              Hugging Face directory for a CLIP / SigLIP tower, an
                              ``encoder/`` encoder directory for any other kind
  OUT/projector.safetensors   the projector in torch layout (Linear kernels
                              transposed, conv kernels OI[D]HW, scan stacks per layer)
  OUT/vsrllm_config.json      the run's config, the tokenizer's special ids, the
                              instruction token ids per task, the files above and
                              their formats (``formats.export_bundle``)

Everything is written into a temporary directory next to OUT and renamed to
OUT at the end, so an interrupted export never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import app, flags

from vsrllm_jax.data import tasks as tasks_lib
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.formats import export_bundle, hf_llm, safetensors_io
from vsrllm_jax.formats import peft as peft_format
from vsrllm_jax.formats import projector as projector_format
from vsrllm_jax.models import encoders, lora as lora_lib
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.training import optim


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True, **fv)
  flags.DEFINE_string("output", None, "The export directory (must not exist).", required=True,
                      **fv)
  flags.DEFINE_integer("step", None, "Checkpoint step from checkpoints/ (default: the best).",
                       **fv)
  flags.DEFINE_bool("llm_reference", False, "Frozen pretrained LLM: write a reference to "
                    "config.llm.path instead of a copy of its weights.", **fv)
  flags.DEFINE_enum("lora_export", "merged", list(export_bundle.LORA_FORMS), "A LoRA run's "
                    "adapters: 'merged' into the LLM's kernels (a plain transformers model) "
                    "or 'peft' (the base LLM plus a PEFT adapter directory).", **fv)


def _write_encoder(out: str, model, config, params, model_state) -> dict:
  """The encoder in its kind's export format; its entry of the export's config."""
  cfg = model.encoder_config
  kind = encoders.kind_of(cfg)
  variables = {"params": params["encoder"],
               "batch_stats": (model_state.get("batch_stats") or {}).get("encoder", {})}
  entry = kind.export(out, cfg, variables, config.encoder)
  return dict(entry, kind=kind.name, torch_twin=kind.torch_twin,
              config=kind.config_to_json(cfg), feature_dim=kind.feature_dim(cfg))


def _instruction_ids(config, tok, special) -> dict[str, dict]:
  texts = ({"": config.data.instruction} if config.data.instruction
           else tasks_lib.instructions())
  chat = bool(config.data.get("chat_template", False))
  return {task: {"text": text, "ids": tokenizer_lib.instruction_ids(tok, text, special,
                                                                   chat_template=chat)}
          for task, text in texts.items()}


def _write_llm(tmp: str, output: str, run, params, llm_reference: bool, lora_export: str
               ) -> dict:
  """The LLM (a copy or a reference; LoRA merged or as a PEFT directory); its entry."""
  config, tok, llm_config = run.config, run.setup.tokenizer, run.model.llm_config
  if lora_export not in export_bundle.LORA_FORMS:
    raise ValueError(f"lora_export={lora_export!r}; expected one of {export_bundle.LORA_FORMS}")
  llm_labels = {k: v for k, v in run.labels.items() if k[0] == "llm"}
  peft = llm_config.lora is not None and lora_export == "peft"
  # What the LLM directory holds is frozen: all of it, or all but the adapters beside it.
  frozen = all(v is optim.FROZEN for k, v in llm_labels.items()
               if not (peft and lora_lib.is_adapter(k)))
  if llm_reference:
    if not (frozen and config.llm.path) or (llm_config.lora is not None and not peft):
      raise ValueError("--llm_reference needs a frozen LLM read from config.llm.path (with "
                       "LoRA, --lora_export=peft: merged weights are not the original); this "
                       "run " + ("trained LLM params" if not frozen else
                                 "merges LoRA adapters" if config.llm.path else
                                 "initialised its LLM randomly (llm.path='')"))
    llm = {"reference": os.path.abspath(config.llm.path)}
    with open(os.path.join(tmp, export_bundle.LLM_REFERENCE_FILE), "w") as f:
      json.dump(llm, f, indent=2)
  else:
    base_config, base = llm_config, params["llm"]
    if peft:   # the base model only; the adapters go to their own directory
      base_config, base = hf_llm.base_config(llm_config), lora_lib.split_adapters(base)[0]
    hf_llm.save_pretrained(os.path.join(tmp, export_bundle.LLM_DIR), base_config, base)
    tok.save_pretrained(os.path.join(tmp, export_bundle.LLM_DIR))
    llm = {"dir": export_bundle.LLM_DIR,
           "trained": not frozen or (llm_config.lora is not None and not peft)}
  if llm_config.lora is not None:
    lora = llm_config.lora
    llm["lora"] = {"form": lora_export, "targets": list(lora.targets), "rank": lora.rank,
                   "alpha": lora.alpha, "dropout": lora.dropout}
    if peft:
      llm["lora"]["adapter_dir"] = export_bundle.LORA_ADAPTER_DIR
      base_path = llm.get("reference") or os.path.join(output, export_bundle.LLM_DIR)
      peft_format.save(os.path.join(tmp, export_bundle.LORA_ADAPTER_DIR), llm_config,
                       params["llm"], base_model_name_or_path=base_path)
  return llm


def convert(workdir: str, output: str, step: int | None = None,
            llm_reference: bool = False, lora_export: str = "merged") -> dict:
  """Writes the export (see the module docstring); returns vsrllm_config.json's content."""
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise FileExistsError(f"--output={output} exists; choose a new directory")
  run = open_lib.open_run(workdir, step=step, on_host=True)
  config, tok, model, step = run.config, run.setup.tokenizer, run.model, run.step
  params, model_state = run.host_weights()
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    llm = _write_llm(tmp, output, run, params, llm_reference, lora_export)
    encoder = _write_encoder(tmp, model, config, params, model_state)
    safetensors_io.write(os.path.join(tmp, export_bundle.PROJECTOR_FILE),
                         projector_format.to_state_dict(model, config, params))
    special = tokenizer_lib.special_tokens(tok, chat_template=config.data.get("chat_template",
                                                                              False))
    meta = {"source": {"workdir": os.path.abspath(workdir), "step": int(step)},
            "llm": llm, "encoder": encoder,
            "projector": {"file": export_bundle.PROJECTOR_FILE, "format": "torch_layout",
                          "config": dict(config.projector.to_dict()),
                          "output_dim": model.llm_config.hidden_dim},
            "tokenizer": {"bos_id": special.bos_id, "eos_ids": list(special.eos_ids),
                          "pad_id": special.pad_id, "instruction": config.data.instruction,
                          "chat_template": bool(config.data.get("chat_template", False)),
                          "max_instruction_tokens": int(config.data.max_instruction_tokens)},
            # The prompt's first segment exactly as training built it (BOS, template),
            # per task ('' when one instruction serves every clip).
            "instructions": _instruction_ids(config, tok, special),
            "decode": dict(config.decode.to_dict()),
            "config": json.loads(config.to_json())}
    export_bundle.write(tmp, meta)
    meta = export_bundle.read(tmp)
    _share(tmp)
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return meta


def _share(directory: str) -> None:
  """mkdtemp's directory (and safetensors' files) are private; an export is not."""
  umask = os.umask(0)
  os.umask(umask)
  for root, dirs, files in os.walk(directory):
    os.chmod(root, 0o777 & ~umask)
    for name in dirs:
      os.chmod(os.path.join(root, name), 0o777 & ~umask)
    for name in files:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  meta = convert(f.workdir, f.output, f.step, f.llm_reference, f.lora_export)
  print(json.dumps({"output": os.path.abspath(f.output), "step": meta["source"]["step"],
                    "encoder": meta["encoder"]["format"]}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
