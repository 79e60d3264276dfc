r"""Trains a projector (and whatever else the config's param groups train) between a
video encoder and an LLM.

  python -m vsrllm_jax.train --config=configs/conv_abstractor.py --workdir=/tmp/vsr_run

Overrides: ``--config=configs/mlp.py:seed=1`` (config args) and
``--config.total_steps=50`` (any key). Restarting the same command resumes
from the workdir's latest checkpoint with the same data order; SIGTERM saves a
checkpoint and exits cleanly. Outputs: checkpoints/, best/, metrics.jsonl,
tensorboard/, config.json, run_info.json, decode/test.jsonl.
"""
from __future__ import annotations

import logging
import sys
import time

from absl import app, flags

from vsrllm_jax.configs import packaged
from vsrllm_jax.run import distributed, metrics
from vsrllm_jax.training import loop


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags (defined only when run as a program: the module stays
  importable next to the other commands, which own --workdir and --config too)."""
  packaged.define_config_flag("config", None, "Config file.", flag_values=flag_values)
  flags.mark_flag_as_required("config", flag_values)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config go.",
                      required=True, flag_values=flag_values)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; its "
                    "settings come from the environment).", flag_values=flag_values)


def main(argv):
  metrics.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.distributed:
    distributed.initialize_distributed()
  t0 = time.time()
  result = loop.train_and_evaluate(f.config, f.workdir)
  logging.info("done in %.1f s: %s", time.time() - t0, result)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
        file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
