"""Checkpoints of a run: the latest K by step, and the best by validation WER.

Layout under the workdir::

  checkpoints/<step>/   state (orbax), data (grain iterator state), meta (JSON)
  best/<step>/          the same items for the best validation WER so far

``best/`` has its own manager, so keep-K on ``checkpoints/`` never deletes
the best one. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a crash during a save leaves the previous
checkpoint as the latest; leftover temporaries are removed on start.

Resume order (train.py): the run's own latest checkpoint, else fresh init
(with pretrained encoder / LLM weights when the config names them).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp
from etils import epath

FORMAT_VERSION = 1
LATEST_DIR = "checkpoints"
BEST_DIR = "best"
BEST_METRIC = "val/wer"


def _manager(directory: str, max_to_keep: int | None, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      cleanup_tmp_directories=True,
      enable_async_checkpointing=False,
      best_fn=(lambda m: m[BEST_METRIC]) if best else None,
      best_mode="min",
      keep_checkpoints_without_metrics=not best,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "data", "meta"))


class Checkpoints:
  """The latest-K and best managers of one workdir."""

  def __init__(self, workdir: str, keep: int):
    self.latest = _manager(os.path.join(workdir, LATEST_DIR), max_to_keep=keep, best=False)
    self.best = _manager(os.path.join(workdir, BEST_DIR), max_to_keep=1, best=True)

  @staticmethod
  def _save_args(state, data_iterator, meta: dict) -> ocp.args.Composite:
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(dict(meta, format_version=FORMAT_VERSION)))
    if data_iterator is not None:
      items["data"] = grain.PyGrainCheckpointSave(data_iterator)
    return ocp.args.Composite(**items)

  def save(self, step: int, state, data_iterator, meta: dict | None = None) -> None:
    """Saves the latest checkpoint at ``step`` (blocking until committed)."""
    if step in self.latest.all_steps():
      return
    self.latest.save(step, args=self._save_args(state, data_iterator, dict(meta or {}, step=step)),
                     force=True)
    self.latest.wait_until_finished()

  def save_best(self, step: int, state, wer: float, meta: dict | None = None) -> bool:
    """Keeps ``state`` in best/ if ``wer`` beats the best so far. Returns whether it did."""
    best_step = self.best.best_step()
    if best_step is not None:
      best_wer = self.best_metrics().get(BEST_METRIC)
      if best_wer is not None and wer >= best_wer:
        return False
    self.best.save(step, args=self._save_args(state, None, dict(meta or {}, step=step,
                                                                 **{BEST_METRIC: wer})),
                   metrics={BEST_METRIC: float(wer)}, force=True)
    self.best.wait_until_finished()
    return True

  def best_metrics(self) -> dict:
    step = self.best.best_step()
    if step is None:
      return {}
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return dict(meta)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, step: int, abstract_state: Any, data_iterator=None, *, best: bool = False):
    """Restores (state, meta) at ``step`` into the shardings of ``abstract_state``.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings.
    The data iterator, when given, is restored in place.
    """
    manager = self.best if best else self.latest
    _check_params(os.path.join(str(manager.directory), str(step), "state"), abstract_state)
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    has_data = os.path.isdir(os.path.join(str(manager.directory), str(step), "data"))
    if data_iterator is not None and not best:
      if has_data:
        items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
      else:   # e.g. imported from a PyTorch export (vsrllm_jax.from_torch)
        logging.warning("checkpoint %s/%d has no data-iterator state: the data order "
                        "starts afresh", manager.directory, step)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(restored.meta)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(f"checkpoint {manager.directory}/{step} has format_version={version}; "
                       f"this code reads version {FORMAT_VERSION}")
    return restored.state, meta

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _names(tree: Any) -> set[str]:
  """'params/projector/readout/kernel'-style paths of a tree's leaves."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return {"/".join(name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_params(path: str, abstract_state: Any) -> None:
  """Raises naming the params (and model state) the checkpoint at ``path`` lacks or has
  beyond the model's, before orbax's own, much longer, structure error."""
  weights = ("params/", "model_state/")
  stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  stored = {n for n in _names(getattr(stored, "tree", stored)) if n.startswith(weights)}
  wanted = {n for n in _names(abstract_state) if n.startswith(weights)}
  missing, extra = sorted(wanted - stored), sorted(stored - wanted)
  if missing or extra:
    raise ValueError(f"checkpoint {path} does not hold this model's weights: missing "
                     f"{len(missing)} {missing[:8]}, unexpected {len(extra)} {extra[:8]} (does "
                     "the config name the projector, encoder and LLM the run trained?)")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for restoring into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def log_resume(step: int | None, workdir: str) -> None:
  if step is None:
    logging.info("no checkpoint in %s: starting from step 0", workdir)
  else:
    logging.info("resuming %s from step %d", workdir, step)
