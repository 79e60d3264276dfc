"""The training state and its creation straight into its shardings.

Shapes and placement are decided before any parameter exists
(``jax.eval_shape`` -> logical axis names -> ``NamedSharding``), then one jitted
init writes every parameter directly into its shard.
"""
from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vsrllm_jax import data as data_lib
from vsrllm_jax import optim, sharding
from vsrllm_jax.models.vsr_model import VSRModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar
  params: Any            # the whole model: encoder, projector, llm
  opt_state: Any         # over the trainable subtree only
  model_state: Any       # non-trainable collections (batch_stats)


def dummy_batch(config, batch_size: int = 1) -> dict[str, jax.Array]:
  """Zeros with the shapes of one batch; used for init and shape checks."""
  d = config.data
  return dict(
      video=jnp.zeros((batch_size, d.max_frames, d.image_size, d.image_size,
                       data_lib.frame_channels(d)), jnp.uint8),
      video_mask=jnp.ones((batch_size, d.max_frames), bool),
      instruction_ids=jnp.zeros((batch_size, d.max_instruction_tokens), jnp.int32),
      instruction_mask=jnp.ones((batch_size, d.max_instruction_tokens), bool),
      label_ids=jnp.zeros((batch_size, d.max_label_tokens), jnp.int32),
      label_mask=jnp.ones((batch_size, d.max_label_tokens), bool),
  )


def frozen_dtype(config) -> str:
  """Storage dtype of frozen params: config.frozen_param_dtype, else param_dtype."""
  return config.get("frozen_param_dtype", "") or config.param_dtype


def _storage_dtypes(labels, config) -> dict:
  """Per param path: its storage dtype (trainable: param_dtype, frozen: frozen_dtype)."""
  frozen = jnp.dtype(frozen_dtype(config))
  trainable = jnp.dtype(config.param_dtype)
  return {k: frozen if v is optim.FROZEN else trainable for k, v in labels.items()}


def _cast(params, dtypes):
  """Casts floating leaves to their storage dtype (others, e.g. int tables, kept)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({
      k: v.astype(dtypes[k]) if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtypes[k]
      else v for k, v in flat.items()})


def _cast_placed(params, dtypes, shardings):
  """``_cast`` of placed arrays, one leaf at a time on device (a leaf exists twice at most)."""
  flat, places = (flax.traverse_util.flatten_dict(t) for t in (params, shardings))
  for k, v in flat.items():
    if jnp.issubdtype(v.dtype, jnp.floating) and v.dtype != dtypes[k]:
      flat[k] = jax.jit(lambda x, d=dtypes[k]: x.astype(d), out_shardings=places[k])(v)
  return flax.traverse_util.unflatten_dict(flat)


def _init_variables(model: VSRModel, config, rng):
  return model.init({"params": rng, "dropout": rng}, dummy_batch(config), train=False)


def _label_tree(labels):
  return flax.traverse_util.unflatten_dict(labels)


def create(model: VSRModel, config, mesh, tx_factory, *, pretrained_params=None,
           pretrained_model_state=None):
  """Returns (state, state_shardings, param_labels, tx).

  ``tx_factory(labels) -> optax transform`` builds the optimizer once labels
  are known. ``pretrained_params`` ({'llm': tree, 'encoder': tree}, host
  arrays or jax.Arrays already placed) and ``pretrained_model_state``
  ({'batch_stats': {'encoder': tree}}) replace the random init of those
  submodules, placed straight into their shardings; pretrained params are
  never randomly initialised (an 8B LLM would otherwise exist twice).
  """
  rng = jax.random.key(config.seed)
  abstract = jax.eval_shape(lambda r: _init_variables(model, config, r), rng)
  param_shardings = sharding.logical_shardings(abstract["params"], mesh,
                                                 sharding.rules(config))
  other = {k: v for k, v in abstract.items() if k != "params"}
  other_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), other)

  unboxed = nn.meta.unbox(abstract["params"])
  labels = optim.label_params(unboxed, config.optim.param_groups)
  tx = tx_factory(labels)

  _check_pretrained(pretrained_params, unboxed, "params")  # before the costly init
  for collection, trees in (pretrained_model_state or {}).items():
    _check_pretrained(trees, other.get(collection, {}), collection)
  skip = set(pretrained_params or ())

  dtypes = _storage_dtypes(labels, config)

  def init(r):  # XLA drops the random init of the skipped (pretrained) submodules
    variables = nn.meta.unbox(_init_variables(model, config, r))
    params = _cast(variables.pop("params"), dtypes)
    return {k: v for k, v in params.items() if k not in skip}, variables

  init_shardings = {k: v for k, v in param_shardings.items() if k not in skip}
  params, model_state = jax.jit(init, out_shardings=(init_shardings, other_shardings))(rng)
  params = _replace(params, pretrained_params, param_shardings, "params")
  params = _cast_placed(params, dtypes, param_shardings)
  for collection, trees in (pretrained_model_state or {}).items():
    model_state = dict(model_state)
    model_state[collection] = _replace(model_state[collection], trees,
                                       other_shardings[collection], collection)

  trainable, _ = optim.split(params, labels)
  trainable_shardings, _ = optim.split(param_shardings, labels)
  abstract_opt = jax.eval_shape(tx.init, trainable)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, trainable_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
                     params=params, opt_state=opt_state, model_state=model_state)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  _log_sizes(params, labels)
  return state, state_shardings, labels, tx


def create_with_optimizer(model: VSRModel, config, mesh, **pretrained):
  """``create`` with the optimizer of ``config.optim``.

  Returns (state, state_shardings, param_labels, tx, schedules by name).
  """
  schedules = {}

  def tx_factory(labels):
    tx, sched = optim.make_optimizer(config.optim, labels, config.total_steps)
    schedules.update(sched)
    return tx

  state, shardings, labels, tx = create(model, config, mesh, tx_factory, **pretrained)
  return state, shardings, labels, tx, schedules


def abstract_state(model: VSRModel, config, mesh):
  """What ``create_with_optimizer`` would make, as ShapeDtypeStructs with their
  shardings and nothing allocated: (state, param_labels, tx, schedules). For
  compile-only checks (``compile().memory_analysis()`` of an 8B step on CPU)."""
  abstract = jax.eval_shape(lambda r: _init_variables(model, config, r),
                            jax.random.key(config.seed))
  shardings = sharding.logical_shardings(abstract["params"], mesh, sharding.rules(config))
  unboxed = nn.meta.unbox(abstract["params"])
  labels = optim.label_params(unboxed, config.optim.param_groups)
  tx, schedules = optim.make_optimizer(config.optim, labels, config.total_steps)
  dtypes = flax.traverse_util.unflatten_dict(_storage_dtypes(labels, config))
  params = jax.tree.map(lambda x, d, s: jax.ShapeDtypeStruct(x.shape, d, sharding=s),
                        unboxed, dtypes, shardings)
  trainable, _ = optim.split(params, labels)
  opt = jax.eval_shape(tx.init, trainable)
  opt = optax.tree_map_params(
      tx, lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding), opt,
      trainable, transform_non_params=lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding.replicated(mesh)))
  replicated = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh))
  other = jax.tree.map(replicated, {k: v for k, v in abstract.items() if k != "params"})
  state = TrainState(step=replicated(jax.ShapeDtypeStruct((), jnp.int32)), params=params,
                     opt_state=opt, model_state=other)
  return state, labels, tx, schedules


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


def _replace(tree, pretrained, shardings, what):
  if not pretrained:
    return tree
  tree = dict(tree)
  for name, host_tree in pretrained.items():
    tree[name] = load_into_shardings(host_tree, shardings[name], f"{what}/{name}")
  return {k: tree[k] for k in shardings}  # the model's key order


def load_into_shardings(pretrained, shardings, what: str):
  """Places host arrays straight into their shardings, checking the tree matches.

  ``jax.Array`` leaves already in their sharding are kept as they are (no
  copy); other arrays are resharded on device.
  """
  want = jax.tree.structure(shardings)
  got = jax.tree.structure(pretrained)
  if want != got:
    raise ValueError(f"pretrained {what} params do not match the model's tree:\n"
                     f"model: {want}\ncheckpoint: {got}")

  def place(x, s):
    if isinstance(x, jax.Array):
      return x if x.sharding.is_equivalent_to(s, x.ndim) else jax.device_put(x, s)
    return jax.device_put(np.asarray(x), s)

  return jax.tree.map(place, pretrained, shardings)


def _log_sizes(params, labels) -> None:
  flat = flax.traverse_util.flatten_dict(params)
  total = sum(int(np.prod(v.shape)) for v in flat.values())
  train = sum(int(np.prod(v.shape)) for k, v in flat.items() if labels[k] is not optim.FROZEN)
  logging.info("params: %d total, %d trainable (%.2f%%)", total, train, 100 * train / max(total, 1))
