r"""Exports a training run's checkpoint for PyTorch (``vsrllm_jax/torch_port``) and HF.

  python -m vsrllm_jax.convert --workdir=DIR --output=OUT [--step=N] [--llm_reference]

Reads the run's config.json and its best checkpoint by validation WER (or
``--step`` from checkpoints/), and writes:

  OUT/llm/                    a Hugging Face directory (config.json, model.safetensors,
                              tokenizer) that transformers' Auto classes load; with
                              --llm_reference and a frozen pretrained LLM, instead
                              OUT/llm_reference.json naming the original directory
  OUT/encoder.pt              AV-HuBERT encoders: the fairseq layout (what
                              ``encoder.path=*.pt`` imports)
  OUT/encoder.safetensors     the compact video encoder: torch layout (params and
                              batch-norm statistics, ``torch_layout``)
  OUT/encoder/                a CLIP / SigLIP vision tower: a Hugging Face
                              CLIPVisionModel / SiglipVisionModel directory
                              (``vision_checkpoint.save_vision_tower``; what
                              ``encoder.path=DIR`` imports), its feature choice in
                              vsrllm_config.json
  OUT/projector.safetensors   the projector in torch layout (Linear kernels
                              transposed, conv kernels OI[D]HW, scan stacks per layer)
  OUT/vsrllm_config.json      the run's config, the tokenizer's special ids, the
                              instruction token ids per task, the files above and
                              their formats

Everything is written into a temporary directory next to OUT and renamed to
OUT at the end, so an interrupted export never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import flax
import jax
import numpy as np
from absl import app, flags

from vsrllm_jax import torch_layout
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.data import tasks as tasks_lib
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.models import avhubert, encoder_io, encoders, hf_checkpoint
from vsrllm_jax.models import fairseq_checkpoint, video_encoder, vision_tower
from vsrllm_jax.models import vision_checkpoint
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.training import optim

FORMAT_VERSION = 1
CONFIG_FILE = "vsrllm_config.json"


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


def _sample_batch(config) -> dict:
  batch = batch_lib.dummy_batch(config, 1)
  return {k: np.asarray(v) for k, v in batch.items()}


def _rules(model: VSRModel, config, prefix, collection="params", method=VSRModel.project):
  batch = _sample_batch(config)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  boxed = jax.eval_shape(lambda: model.init(rngs, batch, train=False))
  variables = flax.linen.meta.unbox(boxed)
  kwargs = dict(train=False) if method is VSRModel.project else {}
  return torch_layout.plan(model, boxed[collection], variables=variables, args=(batch,),
                           method=method, kwargs=kwargs, prefix=prefix)


def _save_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
            metadata={"format": "pt"})


def _strip(state: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in state.items()}


def _write_encoder(out: str, model: VSRModel, config, params, model_state) -> dict:
  cfg = model.encoder_config
  variables = {"params": params["encoder"],
               "batch_stats": (model_state.get("batch_stats") or {}).get("encoder", {})}
  if isinstance(cfg, avhubert.AvHubertConfig):
    fairseq_checkpoint.save_avhubert(os.path.join(out, "encoder.pt"), cfg, variables)
    return {"file": "encoder.pt", "format": "fairseq_avhubert", "config": _asdict(cfg)}
  if isinstance(cfg, vision_tower.VisionTowerConfig):
    source = config.encoder.path
    if not os.path.isdir(source):
      raise FileNotFoundError(f"the run's config encoder.path={source!r} is not a directory: "
                              "exporting a vision tower needs the Hugging Face directory it was "
                              "loaded from (for the layers and heads the run never loaded)")
    vision_checkpoint.save_vision_tower(os.path.join(out, "encoder"), cfg,
                                        params["encoder"]["tower"], source)
    return {"dir": "encoder", "format": "hf_vision_tower", "config": _asdict(cfg)}
  assert isinstance(cfg, video_encoder.VideoEncoderConfig)
  tensors = torch_layout.to_state_dict(params, encoder_rules(model, config))
  if model_state.get("batch_stats"):   # running_mean / running_var beside the params
    tensors.update(torch_layout.to_state_dict(model_state["batch_stats"],
                                              encoder_rules(model, config, "batch_stats")))
  _save_safetensors(os.path.join(out, "encoder.safetensors"), tensors)
  return {"file": "encoder.safetensors", "format": "torch_layout",
          "config": encoder_io.config_to_json(cfg)}


def encoder_rules(model: VSRModel, config, collection: str = "params"):
  """torch_layout rules of the compact encoder's ``params`` or ``batch_stats``."""
  return _rules(model, config, ("encoder",), collection=collection, method=VSRModel.encode)


def projector_rules(model: VSRModel, config):
  return _rules(model, config, ("projector",))


def _instruction_ids(config, tok, special) -> dict[str, dict]:
  texts = ({"": config.data.instruction} if config.data.instruction
           else tasks_lib.instructions())
  chat = bool(config.data.get("chat_template", False))
  return {task: {"text": text, "ids": tokenizer_lib.instruction_ids(tok, text, special,
                                                                   chat_template=chat)}
          for task, text in texts.items()}


def _asdict(cfg) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def convert(workdir: str, output: str, step: int | None = None,
            llm_reference: bool = False) -> dict:
  """Writes the export (see the module docstring); returns vsrllm_config.json's content."""
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise FileExistsError(f"--output={output} exists; choose a new directory")
  run = open_lib.open_run(workdir, step=step, on_host=True)
  config, tok, model, labels, step = (run.config, run.setup.tokenizer, run.model, run.labels,
                                      run.step)
  params, model_state = run.host_weights()
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    llm_frozen = all(v is optim.FROZEN for k, v in labels.items() if k[0] == "llm")
    if llm_reference:
      if not (llm_frozen and config.llm.path):
        raise ValueError("--llm_reference needs a frozen LLM read from config.llm.path; this "
                         "run " + ("trained LLM params" if not llm_frozen else
                                   "initialised its LLM randomly (llm.path='')"))
      llm = {"reference": os.path.abspath(config.llm.path)}
      with open(os.path.join(tmp, "llm_reference.json"), "w") as f:
        json.dump(llm, f, indent=2)
    else:
      hf_checkpoint.save_pretrained(os.path.join(tmp, "llm"), model.llm_config, params["llm"])
      tok.save_pretrained(os.path.join(tmp, "llm"))
      llm = {"dir": "llm", "trained": not llm_frozen}
    encoder = _write_encoder(tmp, model, config, params, model_state)
    encoder["feature_dim"] = encoders.feature_dim(model.encoder_config)
    _save_safetensors(os.path.join(tmp, "projector.safetensors"),
                      torch_layout.to_state_dict(params, projector_rules(model, config)))
    special = tokenizer_lib.special_tokens(tok, chat_template=config.data.get("chat_template",
                                                                              False))
    meta = {"format_version": FORMAT_VERSION, "source": {"workdir": os.path.abspath(workdir),
                                                         "step": int(step)},
            "llm": llm, "encoder": encoder,
            "projector": {"file": "projector.safetensors", "format": "torch_layout",
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
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
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
  meta = convert(f.workdir, f.output, f.step, f.llm_reference)
  print(json.dumps({"output": os.path.abspath(f.output), "step": meta["source"]["step"],
                    "encoder": meta["encoder"]["format"]}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
