"""Checkpoints of a run: the latest K by step, and the best by validation WER.

Layout under the workdir::

  checkpoints/<step>/   state (orbax), data (grain iterator state), meta (JSON)
  best/<step>/          the same items for the best validation WER so far

``best/`` has its own manager, so keep-K on ``checkpoints/`` never deletes
the best one. Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a crash during a save leaves the previous
checkpoint as the latest; leftover temporaries are removed on start.

Resume order (``training.loop``): the run's own latest checkpoint, else fresh
init (with pretrained encoder / LLM weights when the config names them).
Inference (``open``) reads only the weights of the best checkpoint, or of
``--step`` (``Checkpoints.select``).
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
RESTORE_GROUP_BYTES = 64 << 20   # weights-only restores read at most this much at once


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
    items = dict(state=ocp.args.PyTreeSave(state),
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

  def restore(self, step: int, abstract_state: Any, *, best: bool = False):
    """Restores (state, meta) at ``step`` into the shardings of ``abstract_state``
    (a tree of ``jax.ShapeDtypeStruct`` with shardings: ``StateLayout.abstract()``)."""
    manager = self._which(best)
    _check_params(_state_dir(manager, step), abstract_state)
    state = manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(abstract_state))).state
    return state, self._meta(manager, step)

  def restore_data(self, step: int, data_iterator) -> None:
    """Restores the data iterator's state at ``step`` in place (a warning where the
    checkpoint has none, e.g. one imported from a PyTorch export)."""
    if not os.path.isdir(os.path.join(str(self.latest.directory), str(step), "data")):
      logging.warning("checkpoint %s/%d has no data-iterator state: the data order starts "
                      "afresh", self.latest.directory, step)
      return
    self.latest.restore(step, args=ocp.args.Composite(
        data=grain.PyGrainCheckpointRestore(data_iterator)))

  def restore_weights(self, step: int, abstract_weights: dict, *, best: bool = False,
                      group_bytes: int = RESTORE_GROUP_BYTES):
    """(weights, meta): only ``{'params', 'model_state'}`` of the state at ``step``, read
    into the shardings of ``abstract_weights`` (``StateLayout.weights()``). No optimizer
    state or data-iterator state is read: what inference needs, nothing more.

    The arrays are read in groups of at most ``group_bytes`` (a larger array alone):
    a read holds a buffer beside the array it fills, so the peak stays near one copy
    of the weights instead of two.
    """
    manager = self._which(best)
    _check_params(_state_dir(manager, step), abstract_weights)
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_weights)
    restored, group, size = [], [], 0
    for i, (_, leaf) in enumerate(paths):
      nbytes = leaf.size * leaf.dtype.itemsize
      if group and size + nbytes > group_bytes:
        restored += self._restore_leaves(manager, step, [paths[j] for j in group])
        group, size = [], 0
      group.append(i)
      size += nbytes
    if group:
      restored += self._restore_leaves(manager, step, [paths[j] for j in group])
    meta = self._meta(manager, step)
    return jax.tree.unflatten(treedef, restored), meta

  def _restore_leaves(self, manager, step: int, leaves) -> list:
    """The arrays at ``leaves`` ([(path, ShapeDtypeStruct)] of nested dicts), in order."""
    tree = {}
    for path, leaf in leaves:
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key.key, {})
      node[path[-1].key] = leaf
    state = manager.restore(step, args=ocp.args.Composite(
        state=_restore_args(tree, partial=True))).state
    out = []
    for path, _ in leaves:
      node = state
      for key in path:
        node = node[key.key]
      out.append(node)
    return out

  def _meta(self, manager, step: int) -> dict:
    meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(f"checkpoint {manager.directory}/{step} has format_version={version}; "
                       f"this code reads version {FORMAT_VERSION}")
    return meta

  def _which(self, best: bool) -> ocp.CheckpointManager:
    return self.best if best else self.latest

  def select(self, step: int | None) -> tuple[int, bool]:
    """(step, from best/): the best checkpoint by validation WER, or ``step`` from the
    latest ones; an error naming what exists when there is no such checkpoint."""
    if step is None:
      best = self.best.best_step()
      if best is None:
        raise FileNotFoundError(f"{self.best.directory} holds no checkpoint; pass --step (the "
                                f"latest ones are {self.latest.all_steps()})")
      return best, True
    if step not in self.latest.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {self.latest.directory}; have "
                              f"{self.latest.all_steps()}")
    return step, False

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _state_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step), "state")


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restores the arrays of ``abstract`` (ShapeDtypeStructs with shardings) in its dtypes;
  ``partial``: only those, though the checkpoint holds more. The state is saved and
  restored as a PyTree (``StandardSave`` wrote the same files before)."""
  restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                              abstract)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                partial_restore=partial)


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
