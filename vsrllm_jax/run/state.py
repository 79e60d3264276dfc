"""The training state, derived once: shapes, shardings, labels and optimizer first, then
the arrays (``create``) or their abstract form (``StateLayout.abstract``).

Shapes and placement are decided before any parameter exists
(``jax.eval_shape`` -> logical axis names -> ``NamedSharding``), then one jitted
init writes every parameter directly into its shard. Inference restores only
the weights (``StateLayout.weights``); nothing else is made for it.

Phases: with ``config.optim.freeze_finetune_updates`` = N > 0 the state of a
step s < N has the encoder frozen (no optimizer state for it) and that of a
step s >= N has it trainable; a checkpoint at step s restores into the layout
of s. ``next_phase`` moves a state across N (fresh optimizer state for the
encoder, the rest carried over). Params have one storage dtype in every phase:
that of their param-group label.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from clu import parameter_overview
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vsrllm_jax import sharding
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.training import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: Any            # the whole model: encoder, projector, llm
  opt_state: Any         # over the trainable subtree only
  model_state: Any       # non-trainable collections (batch_stats)


def frozen_dtype(config) -> str:
  """Storage dtype of frozen params: config.frozen_param_dtype, else param_dtype."""
  return config.get("frozen_param_dtype", "") or config.param_dtype


def _abstract(shape_dtype, dtype, sharding_) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape_dtype.shape, dtype, sharding=sharding_)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Everything about the state that the model, the config and the mesh decide.

  ``params`` / ``model_state``: ShapeDtypeStructs in their storage dtypes with
  their shardings; ``labels``: param path -> schedule name or ``optim.FROZEN``,
  in this phase; ``opt_state``: the optimizer state over this phase's trainable
  params, abstract; ``until``: the step at which the next phase starts (None:
  this is the last).
  """
  params: Any
  model_state: Any
  labels: dict
  tx: optax.GradientTransformation
  schedules: dict[str, Callable]
  opt_state: Any
  mesh: Any
  until: int | None = None

  def weights(self) -> dict:
    """What inference restores: ``{'params', 'model_state'}``, abstract."""
    return {"params": self.params, "model_state": self.model_state}

  def abstract(self) -> TrainState:
    """The whole state as ShapeDtypeStructs with shardings (nothing allocated)."""
    step = _abstract(jax.ShapeDtypeStruct((), jnp.int32), jnp.int32, sharding.replicated(self.mesh))
    return TrainState(step=step, params=self.params, opt_state=self.opt_state,
                      model_state=self.model_state)

  def shardings(self) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, self.abstract())


def init_variables(model: VSRModel, config, rng):
  return model.init({"params": rng, "dropout": rng}, batch_lib.dummy_batch(config),
                    train=False)


def layout(model: VSRModel, config, mesh, *, step: int | None = None) -> StateLayout:
  """The one derivation of the state: ``create`` fills it, restores read into it.

  ``step``: the step the state is for, whose phase decides labels and optimizer
  (``config.optim.freeze_finetune_updates``); None: the last phase, where every
  param the groups label trainable trains (what inference and exports read).
  """
  boxed = jax.eval_shape(lambda r: init_variables(model, config, r),
                         jax.random.key(config.seed))
  param_shardings = sharding.logical_shardings(boxed["params"], mesh, sharding.rules(config))
  unboxed = nn.meta.unbox(boxed["params"])
  group_labels = optim.label_params(unboxed, config.optim.param_groups)
  start = optim.unfreeze_step(config.optim)
  step = start if step is None else step
  labels = optim.phase_labels(group_labels, config.optim, step, config.total_steps)
  tx, schedules = optim.make_optimizer(config.optim, labels, config.total_steps)
  frozen, trainable = jnp.dtype(frozen_dtype(config)), jnp.dtype(config.param_dtype)
  dtypes = flax.traverse_util.unflatten_dict(
      {k: frozen if v is optim.FROZEN else trainable for k, v in group_labels.items()})
  params = jax.tree.map(lambda x, d, s: _abstract(x, d if jnp.issubdtype(x.dtype, jnp.floating)
                                                  else x.dtype, s),
                        unboxed, dtypes, param_shardings)
  replicated = sharding.replicated(mesh)
  model_state = jax.tree.map(lambda x: _abstract(x, x.dtype, replicated),
                             {k: v for k, v in boxed.items() if k != "params"})
  trainable_params, _ = optim.split(params, labels)
  # Moments live where their params live; with several schedules each one's state holds
  # MaskedNode where another's params are.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt_state = optax.tree_map_params(
      tx, lambda x, p: x if masked(x) else _abstract(x, x.dtype, p.sharding),
      jax.eval_shape(tx.init, trainable_params), trainable_params,
      transform_non_params=lambda x: _abstract(x, x.dtype, replicated), is_leaf=masked)
  return StateLayout(params=params, model_state=model_state, labels=labels, tx=tx,
                     schedules=schedules, opt_state=opt_state, mesh=mesh,
                     until=start if step < start else None)


def next_phase(model: VSRModel, config, state_layout: StateLayout,
               state: TrainState) -> tuple[StateLayout, TrainState]:
  """(layout, state) from step ``state_layout.until`` on: the optimizer state of the
  params that start training then is created fresh (``optim``: AdamW count 0, the
  global schedule's learning rate); every other leaf is carried over as it is."""
  if state_layout.until is None:
    raise ValueError("next_phase: this layout is the last phase")
  new = layout(model, config, state_layout.mesh, step=state_layout.until)
  trainable, _ = optim.split(state.params, new.labels)
  fresh = jax.jit(new.tx.init, out_shardings=jax.tree.map(lambda x: x.sharding,
                                                          new.opt_state))(trainable)
  old = {jax.tree_util.keystr(p): x
         for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(fresh)
  leaves = []
  for path, x in paths:
    kept = old.pop(jax.tree_util.keystr(path), None)
    if kept is not None and (kept.shape, kept.dtype) != (x.shape, x.dtype):
      raise ValueError(f"optimizer state {jax.tree_util.keystr(path)}: {kept.shape} "
                       f"{kept.dtype} before step {state_layout.until}, {x.shape} {x.dtype} after")
    leaves.append(x if kept is None else kept)
  if old:   # the next phase only adds state; losing some would be a bug here
    raise ValueError(f"next_phase would drop optimizer state {sorted(old)[:4]}")
  return new, state.replace(opt_state=jax.tree.unflatten(treedef, leaves))


def create(model: VSRModel, config, state_layout: StateLayout, *, pretrained_params=None,
           pretrained_model_state=None) -> TrainState:
  """The initial state, every array made straight into its sharding.

  ``pretrained_params`` ({'llm': tree, 'encoder': tree, ...}, host arrays or
  jax.Arrays already placed) and ``pretrained_model_state`` ({'batch_stats':
  {'encoder': tree}}) replace the random init of those submodules; pretrained
  params are never randomly initialised (an 8B LLM would otherwise exist twice).
  """
  lay = state_layout
  _check_pretrained(pretrained_params, lay.params, "params")  # before the costly init
  for collection, trees in (pretrained_model_state or {}).items():
    _check_pretrained(trees, lay.model_state.get(collection, {}), collection)
  skip = set(pretrained_params or ())
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)

  def init(rng):  # XLA drops the random init of the skipped (pretrained) submodules
    variables = nn.meta.unbox(init_variables(model, config, rng))
    params = jax.tree.map(lambda x, a: x.astype(a.dtype), variables.pop("params"), lay.params)
    return {k: v for k, v in params.items() if k not in skip}, variables

  init_shardings = {k: v for k, v in shardings(lay.params).items() if k not in skip}
  params, model_state = jax.jit(init, out_shardings=(init_shardings,
                                                     shardings(lay.model_state)))(
                                                         jax.random.key(config.seed))
  params = _with_pretrained(params, pretrained_params, lay.params, "params")
  for collection, trees in (pretrained_model_state or {}).items():
    model_state = dict(model_state)
    model_state[collection] = _with_pretrained(model_state[collection], trees,
                                               lay.model_state[collection], collection)
  trainable, _ = optim.split(params, lay.labels)
  opt_state = jax.jit(lay.tx.init, out_shardings=shardings(lay.opt_state))(trainable)
  step = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(lay.mesh))
  _log_sizes(params, lay.labels)
  return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state)


def _check_pretrained(pretrained, abstract, what: str) -> None:
  """Pretrained trees name submodules of the model and match their trees and shapes."""
  for name, tree in (pretrained or {}).items():
    if name not in abstract:
      raise ValueError(f"pretrained {what}/{name}: the model has no such submodule; it has "
                       f"{sorted(abstract)}")
    want, got = jax.tree.structure(abstract[name]), jax.tree.structure(tree)
    if want != got:
      raise ValueError(f"pretrained {what}/{name} params do not match the model's tree:\n"
                       f"model: {want}\ncheckpoint: {got}")
    for (path, x), a in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                            jax.tree.leaves(abstract[name])):
      if tuple(np.shape(x)) != tuple(a.shape):
        raise ValueError(f"pretrained {what}/{name}{jax.tree_util.keystr(path)} has shape "
                         f"{tuple(np.shape(x))}, the model expects {tuple(a.shape)}")


def _with_pretrained(tree, pretrained, abstract, what):
  """``tree`` with the pretrained submodules placed in, in the model's key order."""
  if not pretrained:
    return tree
  tree = dict(tree)
  for name, host_tree in pretrained.items():
    tree[name] = place(host_tree, abstract[name], f"{what}/{name}")
  return {k: tree[k] for k in abstract}


def place(tree, abstract, what: str):
  """Arrays placed in the shardings and storage dtypes of ``abstract``, one leaf at a
  time (a leaf exists twice at most). ``jax.Array`` leaves already right are kept."""
  want, got = jax.tree.structure(abstract), jax.tree.structure(tree)
  if want != got:
    raise ValueError(f"pretrained {what} params do not match the model's tree:\n"
                     f"model: {want}\ncheckpoint: {got}")

  def one(x, a):
    if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(a.sharding, x.ndim)):
      x = jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), a.sharding)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != a.dtype:
      x = jax.jit(lambda v: v.astype(a.dtype), out_shardings=a.sharding)(x)
    return x

  return jax.tree.map(one, tree, abstract)


def _log_sizes(params, labels) -> None:
  """The parameter table (clu: name, shape, dtype, size) and the trainable share."""
  logging.info("parameters:\n%s",
               parameter_overview.get_parameter_overview(params, include_stats=False))
  flat = flax.traverse_util.flatten_dict(params)
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  train = sum(int(np.prod(v.shape)) for k, v in flat.items() if labels[k] is not optim.FROZEN)
  logging.info("params: %d total, %d trainable (%.2f%%)", total, train, 100 * train / max(total, 1))
