"""Metric output: clu writers (TensorBoard + log) and ``WORKDIR/metrics.jsonl``; the
progress line; the profiler window over chosen train steps.

This is the only module that imports TensorFlow (through clu's TensorBoard
writer), and it hides every GPU from TF first. Where TF is not installed
(accelerator machines), metrics still go to the log and to metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


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


class _LogWriter:
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("step %d: %s", step,
                 ", ".join(f"{k}={_scalar(v):.5g}" for k, v in sorted(scalars.items())))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _clu_writer(logdir: str):
  """clu's default writer (TensorBoard + logging), or None without TensorFlow."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.info("TensorFlow is not installed: no TensorBoard summaries, log + jsonl only")
    return None
  tf.config.set_visible_devices([], "GPU")
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.create_default_writer(logdir, asynchronous=False)


class MetricWriter:
  """Writes to every sink; only process 0 writes."""

  def __init__(self, workdir: str, *, is_main: bool = True, tensorboard: bool = True):
    self._writers = []
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    clu = _clu_writer(os.path.join(workdir, "tensorboard")) if tensorboard else None
    self._writers = [clu if clu is not None else _LogWriter(),
                     JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self) -> None:
    for w in self._writers:
      w.flush()

  def close(self) -> None:
    for w in self._writers:
      w.close()


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
