r"""Decodes a split with a trained run and scores it.

  python -m vsrllm_jax.decode --workdir=/tmp/vsr_run [--split=test] [--step=N] [--config=...]

Reads the run's config.json (``--config`` overrides it), restores the best
checkpoint by validation WER (or ``--step`` from checkpoints/), decodes
greedily, writes ``WORKDIR/decode/<split>.jsonl`` lines
``{"id", "reference", "hypothesis"}`` and prints WER and CER.
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from vsrllm_jax import checkpoint, evaluation, experiment
from vsrllm_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to decode.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the best).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Overrides the run's config.json.",
                                          lock_config=True)


def decode(workdir: str, split: str = "test", step: int | None = None, config=None) -> dict:
  """Returns {'wer', 'cer', 'num_examples', 'step', 'slot_accuracy', 'path'}."""
  config = workdir_lib.load_config(workdir, config)
  exp = experiment.Experiment(config)
  ckpts = checkpoint.Checkpoints(workdir, exp.config.keep_checkpoints)
  best = step is None
  if best:
    step = ckpts.best.best_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}/{checkpoint.BEST_DIR} holds no checkpoint; pass --step")
  elif step not in ckpts.latest.all_steps():
    raise FileNotFoundError(f"no checkpoint {step} in {workdir}/{checkpoint.LATEST_DIR}; have "
                            f"{ckpts.latest.all_steps()}")
  state, _ = ckpts.restore(step, checkpoint.abstract_like(exp.state), best=best)
  ckpts.close()
  rates, rows = evaluation.evaluate(exp.predict_fn(), state.params, state.model_state,
                                    exp.eval_batches(split), exp.mesh, exp.tokenizer,
                                    eos_id=exp.tokenizer.eos_token_id)
  path = evaluation.write_decodes(workdir, split, rows)
  return dict(rates, step=step, slot_accuracy=evaluation.slot_accuracy(rows), path=path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = decode(_WORKDIR.value, _SPLIT.value, _STEP.value, _CONFIG.value)
  logging.info("wrote %s", result["path"])
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
