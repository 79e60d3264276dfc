"""Reading a training run's files back in tests: a checkpoint's saved state and
the per-step scalars of metrics.jsonl."""
import json
import os

import orbax.checkpoint as ocp

from vsrllm_jax.run import checkpoint


def saved_state(workdir, step) -> dict:
  """The raw state tree (params, opt_state, ...) of checkpoint ``step`` under ``workdir``."""
  path = os.path.join(workdir, checkpoint.LATEST_DIR, str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def scalars(workdir, *names) -> dict:
  """{step: value} of ``names[0]``, or {step: (values...)} for several names, over the
  records that hold ``train/loss``; a replayed step keeps the last value written."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:
        values = tuple(rec[n] for n in names)
        out[rec["step"]] = values if len(names) > 1 else values[0]
  return out
