"""The jitted train step: named losses, gradients of the trainable params, one update.

What trains is the layout's labels alone (``config.optim.param_groups`` and
``freeze_finetune_updates``); the model stops no gradient of its own. Gradients
are taken with respect to the trainable subtree only; frozen params enter
through ``jax.lax.stop_gradient``, so XLA never computes their gradients (nor
the backward pass of a frozen encoder), and the gradient norm is over
trainable grads alone. The rng of a step is ``fold_in(seed, step)``, so a
resumed run draws the same randomness. Metrics stay on device; the loop
fetches them at log steps.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vsrllm_jax import sharding
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.models import encoders
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.run.state import StateLayout, TrainState
from vsrllm_jax.training import losses, optim, reachability


def compute_losses(model: VSRModel, params, model_state, batch, *, train: bool, rng=None,
                   label_smoothing: float = 0.0):
  """Named losses (unweighted) and extra metrics for one batch: ``lm`` (label-smoothed
  with ``label_smoothing`` > 0, its plain NLL then an extra ``lm_nll``) and every
  auxiliary loss the model returns (the projector's own, CTC)."""
  rngs = {"dropout": rng} if rng is not None else {}
  out = model.apply({"params": params, **model_state}, batch, train=train, rngs=rngs)
  label_mask = losses.label_weights(batch)
  logits, ids = out["logits"], batch["label_ids"]
  named = {"lm": losses.lm_cross_entropy(logits, ids, label_mask, label_smoothing),
           **out["aux_losses"]}
  extra = {"token_accuracy": losses.token_accuracy(logits, ids, label_mask)}
  if label_smoothing:
    extra["lm_nll"] = losses.lm_cross_entropy(logits, ids, label_mask)
  return named, extra


def _default_batch(model: VSRModel, config):
  """Zeros shaped as the config's train batches (features when they are cached)."""
  batch = batch_lib.dummy_batch(config, config.batch_size)
  if config.data.cache_features:
    batch = batch_lib.with_features(batch, encoders.feature_dim(model.encoder_config))
  return batch


def check_loss_weights(model: VSRModel, state_layout: StateLayout, config,
                       batch=None) -> list[str]:
  """Fails before training unless config.loss_weights names exactly the produced losses
  (on ``batch``, by default zeros shaped as the config's train batches)."""
  if batch is None:
    batch = _default_batch(model, config)
  named, _ = jax.eval_shape(
      lambda p, s, b: compute_losses(model, p, s, b, train=True, rng=jax.random.key(0)),
      state_layout.params, state_layout.model_state, batch)
  losses.check_loss_names(named.keys(), dict(config.loss_weights))
  return sorted(named)


def check_trainable_reachable(model: VSRModel, state_layout: StateLayout, config,
                              batch=None) -> None:
  """Fails before training if a param the groups label trainable (in any phase) gets no
  gradient from the loss: a symbolic zero in the traced gradient (``reachability``),
  on ``batch`` (by default zeros shaped as the config's train batches)."""
  if batch is None:
    batch = _default_batch(model, config)
  weights, eps = dict(config.loss_weights), losses.label_smoothing(config)
  labels = optim.label_params(state_layout.params, config.optim.param_groups)
  trainable, frozen = optim.split(state_layout.params, labels)

  def loss(trainable, frozen, model_state, batch, rng):
    named, _ = compute_losses(model, optim.merge(trainable, frozen), model_state, batch,
                              train=True, rng=rng, label_smoothing=eps)
    return losses.weighted_total(named, weights)

  dead = reachability.unreachable(loss, trainable, frozen, state_layout.model_state, batch,
                                  jax.random.key(0))
  if dead:
    source = ("cached encoder features (config.data.cache_features=True)"
              if "features" in batch else "raw video")
    raise ValueError(f"config.optim.param_groups labels {len(dead)} param(s) trainable that "
                     f"the loss never reaches (no gradient, on {source}): {dead[:8]}; freeze "
                     "them (schedule None) or make the loss use them")


def _micro_batches(batch, k: int):
  """[B, ...] -> [k, B/k, ...]: micro-batch j holds rows j, j+k, j+2k, ... so that each
  device's contiguous shard of the batch splits locally."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"config.grad_accum_steps={k} micro-batches")
    return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(model: VSRModel, config, state_layout: StateLayout) -> Callable:
  """A jitted ``step(state, batch) -> (state, metrics)`` with the state donated.

  ``config.grad_accum_steps`` = k > 1 splits the batch into k micro-batches
  run one after another (activation memory of one micro-batch) and applies
  one update with their gradients weighted by label tokens: for the LM loss,
  exactly the gradient of the whole batch. Batch-level auxiliary losses
  (InfoNCE negatives, routing statistics) see one micro-batch at a time.
  """
  weights, eps = dict(config.loss_weights), losses.label_smoothing(config)
  seed = config.seed
  accum = int(config.get("grad_accum_steps", 1))
  if accum < 1:
    raise ValueError(f"config.grad_accum_steps={accum} must be >= 1")
  rules = sharding.rules(config)
  labels, tx, schedules = state_layout.labels, state_layout.tx, state_layout.schedules
  mesh = state_layout.mesh

  def step(state: TrainState, batch):
    with sharding.activation_sharding(mesh, rules):
      return _step(state, batch)

  def _step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    trainable, frozen = optim.split(state.params, labels)
    frozen = jax.lax.stop_gradient(frozen)

    def loss_fn(trainable, batch, rng):
      params = optim.merge(trainable, frozen)
      named, extra = compute_losses(model, params, state.model_state, batch, train=True, rng=rng,
                                    label_smoothing=eps)
      return losses.weighted_total(named, weights), (named, extra)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (total, (named, extra)), grads = grad_fn(trainable, batch, rng)
    else:
      micro = _micro_batches(batch, accum)
      share = jax.vmap(lambda b: jnp.sum(losses.label_weights(b)).astype(jnp.float32))(micro)
      share = share / jnp.maximum(jnp.sum(share), 1.0)              # [k], sums to 1

      def one(acc, xs):
        mb, w, i = xs
        out, grads = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
        acc = jax.tree.map(lambda a, g: a + w * g, acc, (out, grads))
        return acc, None

      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, trainable, batch, rng))
      ((total, (named, extra)), grads), _ = jax.lax.scan(
          one, zero, (micro, share, jnp.arange(accum)))
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"train/loss": total, "train/grad_norm": optax.global_norm(grads),
               **{f"train/{k}": v for k, v in extra.items()}}
    metrics.update({f"train/{k}": v for k, v in named.items()})
    metrics.update({f"train/lr_{k}": fn(state.step) for k, fn in schedules.items()})
    new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                              opt_state=opt_state)
    return new_state, metrics

  # Batch shardings come with the global batch arrays (sharding.global_batch).
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_layout.shardings(), sharding.replicated(mesh)))
