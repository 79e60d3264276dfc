r"""Imports a PyTorch export (``vsrllm_jax.convert``) back into an orbax training run.

  python -m vsrllm_jax.from_torch --export=OUT --workdir=NEW
  python -m vsrllm_jax.train --config=NEW/config.py --workdir=NEW --config.total_steps=M

Writes NEW/config.json (the exported run's config, with ``llm.path`` and
``encoder.path`` pointing at the export's weights), NEW/config.py (a config
file that reads it, for the train command) and NEW/checkpoints/<step>/
with the exported params at the exported step and a fresh optimizer state
(an export carries none), so the train command resumes from it. Weights are
read exactly: JAX -> PyTorch -> JAX gives back the original params bit for bit.
LoRA: a PEFT-form export gives back its adapters exactly; a merged one gives
the merged LLM with fresh adapters (B = 0: the same function, and LoRA training
can go on).
"""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from vsrllm_jax import sharding
from vsrllm_jax.formats import export_bundle, hf_llm, safetensors_io
from vsrllm_jax.formats import peft as peft_format
from vsrllm_jax.formats import projector as projector_format
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import encoders, lora
from vsrllm_jax.models.llm import LlamaModel
from vsrllm_jax.run import checkpoint, state as state_lib
from vsrllm_jax.run import workdir as workdir_lib


CONFIG_PY = '''"""The config of a run imported by vsrllm_jax.from_torch: its config.json."""
import os

from vsrllm_jax.run import workdir


def get_config():
  return workdir.load_config(os.path.dirname(os.path.abspath(__file__)))
'''


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("export", None, "A directory written by vsrllm_jax.convert.", required=True,
                      **fv)
  flags.DEFINE_string("workdir", None, "The new run's workdir (must hold no checkpoints).",
                      required=True, **fv)


def _with_lora(export: str, meta: dict, llm_config, llm_params, seed: int) -> dict:
  """The LLM params with the export's adapters (PEFT form) or fresh ones (merged)."""
  if llm_config.lora is None:
    return llm_params
  adapter_dir = export_bundle.lora_adapter_dir(export, meta)
  if adapter_dir is None:
    return lora.with_adapters(llm_params, LlamaModel(llm_config), jax.random.key(seed))
  flat = flax.traverse_util.flatten_dict(dict(llm_params))
  flat.update(flax.traverse_util.flatten_dict(peft_format.load(adapter_dir, llm_config)))
  return flax.traverse_util.unflatten_dict(flat)


def import_export(export: str, workdir: str) -> int:
  """Writes the run ``workdir`` from ``export``; returns the checkpoint's step."""
  meta = export_bundle.read(export)
  ckpt_dir = os.path.join(workdir, checkpoint.LATEST_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose a new --workdir")
  config = ml_collections.ConfigDict(workdir_lib.to_tuples(meta["config"]))
  config.llm.path = config.llm.tokenizer_path = os.path.abspath(
      export_bundle.llm_dir(export, meta))
  entry = meta["encoder"]
  # Exports written before the encoder registry name no kind: the run's config says.
  kind = encoders.KINDS.get(entry["kind"]) if "kind" in entry else encoders.resolve(
      config.encoder)
  updates, enc_vars = kind.import_export(export, entry, config.encoder, workdir)
  config.encoder.update(updates)
  model = build_lib.build_model(config)
  _, llm_params = hf_llm.from_pretrained(config.llm.path, dtype=config.dtype,
                                         param_dtype=state_lib.frozen_dtype(config))
  llm_params = _with_lora(export, meta, model.llm_config, llm_params, config.seed)
  projector = projector_format.from_state_dict(
      model, config, safetensors_io.read_all(os.path.join(export, meta["projector"]["file"])))
  params = {"llm": llm_params, "encoder": enc_vars["params"], **projector}
  step = int(meta["source"]["step"])
  layout = state_lib.layout(model, config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
                            step=step)
  missing = sorted(set(layout.params) - set(params))
  if missing:
    raise ValueError(f"{export}: the export has no weights for {missing}")
  model_state = {}
  if layout.model_state.get("batch_stats"):
    model_state = {"batch_stats": {"encoder": enc_vars.get("batch_stats", {})}}
  state = state_lib.create(model, config, layout,
                           pretrained_params={k: params[k] for k in layout.params},
                           pretrained_model_state=model_state)
  state = state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding))
  workdir_lib.write_run_info(workdir, config)
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write(CONFIG_PY)
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  ckpts.save(step, state, None, meta={"imported_from": os.path.abspath(export)})
  ckpts.close()
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step = import_export(flags.FLAGS.export, flags.FLAGS.workdir)
  print(json.dumps({"workdir": os.path.abspath(flags.FLAGS.workdir), "step": step}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
