"""Metric output: TensorBoard event files (tensorboardX, no TensorFlow), the log and
``WORKDIR/metrics.jsonl``; train-step scalars averaged on device between reports;
the progress line; the profiler window over chosen train steps.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

from clu import metrics as clu_metrics
import jax
import numpy as np
import tensorboardX


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class JsonlWriter:
  """One JSON object per write: {"step": N, name: value, ...}."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class LogWriter:
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("step %d: %s", step,
                 ", ".join(f"{k}={_scalar(v):.5g}" for k, v in sorted(scalars.items())))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardWriter:
  """Scalars as TensorBoard event files under ``logdir`` (view: ``tensorboard --logdir``)."""

  def __init__(self, logdir: str):
    self._writer = tensorboardX.SummaryWriter(logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, _scalar(value), global_step=int(step))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Writes to every sink; only process 0 writes."""

  def __init__(self, workdir: str, *, is_main: bool = True, tensorboard: bool = True):
    self._writers = []
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    self._writers = [LogWriter(), JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
    if tensorboard:
      self._writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard")))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


@jax.jit
def _accumulate(totals, scalars):
  new = {k: clu_metrics.Average.from_model_output(v) for k, v in scalars.items()}
  if totals is None:
    return new
  # A name new since the last report (a schedule that starts at freeze_finetune_updates)
  # averages over the steps that have it.
  return {k: totals[k].merge(new[k]) if k in totals else new[k] for k in new}


class StepAverages:
  """Per-name means of the train step's scalars since the last report.

  The running totals (``clu.metrics.Average``) stay on device, merged by one
  jitted call per step; ``report`` is the only transfer to the host.
  """

  def __init__(self):
    self._totals = None

  def add(self, scalars: Mapping[str, jax.Array]) -> None:
    self._totals = _accumulate(self._totals, dict(scalars))

  def report(self) -> dict[str, float]:
    """The means, and a fresh start."""
    totals, self._totals = jax.device_get(self._totals), None
    return {k: float(v.compute()) for k, v in (totals or {}).items()}


class Progress:
  """Steps/s and ETA between reports (what clu's ReportProgress shows, without TF)."""

  def __init__(self, total_steps: int, start_step: int):
    self._total = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def __call__(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    logging.info("step %d/%d: %.2f steps/s, ETA %s", step, self._total, rate,
                 time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?")
    return {"train/steps_per_sec": rate}


class ProfileWindow:
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


class _QuietLibraries(logging.Filter):
  """Keeps orbax/grain INFO chatter out of the run log (warnings still pass)."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= logging.WARNING or not noisy


def quiet_library_logs() -> None:
  """Installs ``_QuietLibraries`` on the root logger's handlers (commands call it)."""
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
