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
  param_shardings = sharding.logical_shardings(abstract["params"], mesh, config.sharding_rules)
  other = {k: v for k, v in abstract.items() if k != "params"}
  other_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), other)

  unboxed = nn.meta.unbox(abstract["params"])
  labels = optim.label_params(unboxed, config.optim.param_groups)
  tx = tx_factory(labels)

  _check_pretrained(pretrained_params, unboxed, "params")  # before the costly init
  for collection, trees in (pretrained_model_state or {}).items():
    _check_pretrained(trees, other.get(collection, {}), collection)
  skip = set(pretrained_params or ())

  def init(r):  # XLA drops the random init of the skipped (pretrained) submodules
    variables = nn.meta.unbox(_init_variables(model, config, r))
    params = {k: v for k, v in variables.pop("params").items() if k not in skip}
    return params, variables

  init_shardings = {k: v for k, v in param_shardings.items() if k not in skip}
  params, model_state = jax.jit(init, out_shardings=(init_shardings, other_shardings))(rng)
  params = _replace(params, pretrained_params, param_shardings, "params")
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
