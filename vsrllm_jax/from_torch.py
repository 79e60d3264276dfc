r"""Imports a PyTorch export (``vsrllm_jax.convert``) back into an orbax training run.

  python -m vsrllm_jax.from_torch --export=OUT --workdir=NEW
  python -m vsrllm_jax.train --config=NEW/config.py --workdir=NEW --config.total_steps=M

Writes NEW/config.json (the exported run's config, with ``llm.path`` and
``encoder.path`` pointing at the export's weights), NEW/config.py (a config
file that reads it, for the train command) and NEW/checkpoints/<step>/
with the exported params at the exported step and a fresh optimizer state
(an export carries none), so the train command resumes from it. Weights are
read exactly: JAX -> PyTorch -> JAX gives back the original params bit for bit.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from safetensors.numpy import load_file

from vsrllm_jax import convert, sharding, torch_layout
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import encoder_io, encoders, fairseq_checkpoint, hf_checkpoint
from vsrllm_jax.models.vsr_model import VSRModel
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


def read_export(export: str) -> dict:
  """The export's vsrllm_config.json, checked for its format version."""
  path = os.path.join(export, convert.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --export must be a directory written by "
                            "python -m vsrllm_jax.convert")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format_version") != convert.FORMAT_VERSION:
    raise ValueError(f"{path} has format_version={meta.get('format_version')}; this code reads "
                     f"{convert.FORMAT_VERSION}")
  return meta


def read_encoder(state: dict, model: VSRModel, config) -> dict:
  """The compact encoder's torch-layout tensors -> {'params', 'batch_stats'} trees."""
  stats_rules = convert.encoder_rules(model, config, "batch_stats")
  stat_keys = {r.torch_key.replace("{i}", str(i)) for r in stats_rules.values()
               for i in range(r.shape[0] if r.stacked else 1)}
  params = torch_layout.from_state_dict({k: v for k, v in state.items() if k not in stat_keys},
                                        convert.encoder_rules(model, config))
  stats = (torch_layout.from_state_dict({k: state[k] for k in stat_keys if k in state},
                                        stats_rules) if stats_rules else {})
  return {"params": params["encoder"], "batch_stats": stats.get("encoder", {})}


def _model(config, meta: dict) -> VSRModel:
  """The exported model; the compact encoder's shape comes from the export itself (a
  vision tower's from its directory, which ``encoder.path`` names by then)."""
  encoder = meta["encoder"]
  if encoder["format"] in ("fairseq_avhubert", "hf_vision_tower"):
    return build_lib.build_model(config)
  shell = ml_collections.ConfigDict(config.to_dict())
  shell.encoder.path = ""
  enc_cfg = encoder_io.config_from_json(encoder["config"], convert.CONFIG_FILE)
  return build_lib.build_model(shell).clone(encoder_config=enc_cfg)


def import_export(export: str, workdir: str) -> int:
  """Writes the run ``workdir`` from ``export``; returns the checkpoint's step."""
  meta = read_export(export)
  ckpt_dir = os.path.join(workdir, checkpoint.LATEST_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints; choose a new --workdir")
  config = ml_collections.ConfigDict(workdir_lib.to_tuples(meta["config"]))
  llm_dir = meta["llm"].get("reference") or os.path.join(export, meta["llm"]["dir"])
  config.llm.path = config.llm.tokenizer_path = os.path.abspath(llm_dir)
  encoder = meta["encoder"]
  if encoder["format"] == "hf_vision_tower":   # a Hugging Face directory: read as such
    config.encoder.path = os.path.abspath(os.path.join(export, encoder["dir"]))
  model = _model(config, meta)

  if encoder["format"] == "fairseq_avhubert":
    config.encoder.path = os.path.abspath(os.path.join(export, encoder["file"]))
    _, enc_vars = fairseq_checkpoint.load_avhubert(config.encoder.path)
  elif encoder["format"] == "hf_vision_tower":
    enc_vars = {"batch_stats": {}, **encoders.load_pretrained(config.encoder)}
  else:   # the compact encoder: written in its own checkpoint format into the new run
    enc_vars = read_encoder(load_file(os.path.join(export, encoder["file"])), model, config)
    config.encoder.path = os.path.join(os.path.abspath(workdir), "encoder")
    encoder_io.save_encoder(config.encoder.path, model.encoder_config,
                            jax.tree.map(lambda x: np.asarray(x, np.float32), enc_vars))

  _, llm_params = hf_checkpoint.from_pretrained(config.llm.path, dtype=config.dtype,
                                                param_dtype=state_lib.frozen_dtype(config))
  projector = torch_layout.from_state_dict(
      load_file(os.path.join(export, meta["projector"]["file"])),
      convert.projector_rules(model, config))
  params = {"llm": llm_params, "encoder": enc_vars["params"], **projector}
  layout = state_lib.layout(model, config, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  missing = sorted(set(layout.params) - set(params))
  if missing:
    raise ValueError(f"{export}: the export has no weights for {missing}")
  model_state = {}
  if layout.model_state.get("batch_stats"):
    model_state = {"batch_stats": {"encoder": enc_vars["batch_stats"]}}
  state = state_lib.create(model, config, layout,
                           pretrained_params={k: params[k] for k in layout.params},
                           pretrained_model_state=model_state)
  step = int(meta["source"]["step"])
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
