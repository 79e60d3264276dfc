r"""Trains a projector between a frozen video encoder and a frozen LLM.

  python -m vsrllm_jax.train --config=configs/contrastive.py --workdir=/tmp/vsr_run

Overrides: ``--config=configs/mlp.py:seed=1`` (config args) and
``--config.total_steps=50`` (any key). Restarting the same command resumes
from the workdir's latest checkpoint with the same data order; SIGTERM saves a
checkpoint and exits cleanly. Outputs: checkpoints/, best/, metrics.jsonl,
tensorboard/, config.json, run_info.json.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import jax
import numpy as np

from vsrllm_jax import checkpoint, evaluation, experiment, sharding, throughput, train_step
from vsrllm_jax import workdir as workdir_lib
from vsrllm_jax.data import pipeline


def _define_flags():
  """The command's flags, defined only when run as a program: the module stays importable
  next to decode/transcribe, which own --workdir and --config too."""
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and config go.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; its "
                    "settings come from the environment).")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
    self.requested = True


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """The whole run: train, validate, checkpoint, then test on the best checkpoint."""
  from vsrllm_jax import metric_writers  # pylint: disable=g-import-not-at-top
  pipeline.reset_skipped_record_count()   # data/skipped_records counts this run's records
  exp = experiment.Experiment(config)
  config, tok, mesh = exp.config, exp.tokenizer, exp.mesh
  workdir_lib.write_run_info(workdir, config)
  state = exp.state
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  data_iter = iter(exp.train_loader())
  start = ckpts.latest_step()
  checkpoint.log_resume(start, workdir)
  if start is not None:
    state, _ = ckpts.restore(start, checkpoint.abstract_like(state), data_iter)
  start = int(start or 0)

  step_fn = exp.train_step_fn()
  predict = exp.predict_fn()
  writer = metric_writers.MetricWriter(workdir, is_main=jax.process_index() == 0)
  progress = metric_writers.Progress(config.total_steps, start)
  preemption = _Preemption()
  pending = []  # on-device metrics since the last log step
  meter = throughput.Meter(mesh.size, throughput.peak_flops_per_device(
      mesh.devices.flat[0], config.get("peak_flops_per_device", 0.0)))

  def validate(step):
    rates, _ = evaluation.evaluate(predict, state.params, state.model_state,
                                   exp.eval_batches("validation", config.max_eval_batches),
                                   mesh, tok, eos_id=exp.eos_ids)
    writer.write_scalars(step, {"val/wer": rates["wer"], "val/cer": rates["cer"],
                                **_per_task("val", rates)})
    if ckpts.save_best(step, state, rates["wer"]):
      logging.info("step %d: new best val/wer %.4f", step, rates["wer"])

  shapes = set()  # distinct batch shapes = train-step compilations (length buckets)
  profile = _ProfileWindow(config.get("profile_steps", ()), os.path.join(workdir, "profile"))
  for step in range(start, config.total_steps):
    profile.before(step)
    batch = next(data_iter)
    inputs = train_step.model_inputs(batch)
    shapes_before = len(shapes)
    shapes.add(tuple(sorted((k, v.shape) for k, v in inputs.items())))
    global_inputs = sharding.global_batch(inputs, mesh)
    if len(shapes) > shapes_before:   # a new shape: FLOP count and compilation are not timed
      meter.pause()
      exp.step_flops(global_inputs)
      state, metrics = step_fn(state, global_inputs)
      jax.block_until_ready(metrics)
      meter.resume()
    else:
      meter.count(exp.step_flops(global_inputs))
      state, metrics = step_fn(state, global_inputs)
    pending.append(metrics)
    done = step + 1
    profile.after(step, metrics)
    if done % config.log_every == 0 or done == config.total_steps:
      fetched = jax.device_get(pending)
      summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
      summary.update(progress(done))
      summary.update(meter.report())
      pending = []
      summary["data/skipped_records"] = pipeline.skipped_record_count()
      summary["train/batch_shapes"] = len(shapes)
      writer.write_scalars(done, summary)
    meter.pause()   # evaluation and checkpoints are not step time
    if done % config.eval_every == 0 or done == config.total_steps:
      validate(done)
    if done % config.checkpoint_every == 0 or done == config.total_steps or preemption.requested:
      ckpts.save(done, state, data_iter)
    meter.resume()
    if preemption.requested:
      profile.close()
      writer.flush()
      ckpts.close()
      logging.warning("checkpoint saved at step %d after SIGTERM; exiting", done)
      return {"preempted_at": done}

  profile.close()
  # Final evaluation on the best checkpoint (by validation WER).
  best_step = ckpts.best.best_step()
  params, model_state = state.params, state.model_state
  if best_step is not None:
    best_state, _ = ckpts.restore(best_step, checkpoint.abstract_like(state), best=True)
    params, model_state = best_state.params, best_state.model_state
  rates, rows = evaluation.evaluate(predict, params, model_state, exp.eval_batches("test"), mesh,
                                    tok, eos_id=exp.eos_ids)
  slots = evaluation.slot_accuracy(rows)
  writer.write_scalars(config.total_steps, {"test/wer": rates["wer"], "test/cer": rates["cer"],
                                            "test/best_step": best_step or config.total_steps,
                                            **_per_task("test", rates),
                                            **{f"test/slot_accuracy/{k}": v
                                               for k, v in slots.items()}})
  evaluation.write_decodes(workdir, "test", rows)
  logging.info("test (best step %s): WER %.4f, CER %.4f over %d clips", best_step, rates["wer"],
               rates["cer"], rates["num_examples"])
  writer.flush()
  writer.close()
  ckpts.close()
  return {"test/wer": rates["wer"], "test/cer": rates["cer"]}


class _ProfileWindow:
  """Traces train steps ``first..last`` (inclusive) with jax.profiler into ``directory``."""

  def __init__(self, steps, directory: str):
    if steps and (len(steps) != 2 or not 0 <= steps[0] <= steps[1]):
      raise ValueError(f"config.profile_steps={tuple(steps)} must be () or (first, last) with "
                       "0 <= first <= last")
    self.first, self.last = (tuple(int(s) for s in steps) if steps else (-1, -1))
    self.directory = directory
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if step == self.last:
      jax.block_until_ready(metrics)
      self.close()

  def close(self) -> None:
    """Ends an open trace (also when the run stops inside the window)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile of train steps from %d written to %s", self.first, self.directory)


def _per_task(prefix: str, rates: dict) -> dict[str, float]:
  """``{prefix}/{task}/{rate}`` for the per-task rates of a multi-task split (LRS3 VSR/VST)."""
  return {f"{prefix}/{k}": v for k, v in rates.items()
          if "/" in k and k.rsplit("/", 1)[1] in ("wer", "cer", "bleu")}


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(environ=None) -> None:
  """``jax.distributed.initialize`` for ``--distributed``.

  TPU pods, Slurm and Open MPI need no arguments. Other GPU clusters
  (launch/gpu_multinode.sh) set all three DISTRIBUTED_ENV variables: jax reads
  only the coordinator address from the environment, so the process count and
  id are passed here, with cluster auto-detection off (Slurm's would narrow
  each process to one GPU; each process keeps all GPUs of its node).
  """
  environ = os.environ if environ is None else environ
  given = {k: environ.get(k, "") for k in DISTRIBUTED_ENV}
  if not any(given.values()):
    jax.distributed.initialize()
    return
  missing = [k for k, v in given.items() if not v]
  if missing:
    raise app.UsageError(f"--distributed: {', '.join(missing)} not set (set all of "
                         f"{', '.join(DISTRIBUTED_ENV)} or none)")
  try:
    num, pid = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError as e:
    raise app.UsageError("--distributed: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                         f"integers ({e})") from e
  jax.distributed.initialize(coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
                             num_processes=num, process_id=pid,
                             cluster_detection_method="deactivate")


class _QuietLibraries(logging.Filter):
  """Keeps orbax/grain INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= logging.WARNING or not noisy


def main(argv):
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flags.FLAGS.distributed:
    initialize_distributed()
  if flags.FLAGS.workdir is None or flags.FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  t0 = time.time()
  result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info("done in %.1f s: %s", time.time() - t0, result)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
        file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
