"""The jitted train step and the jitted predictor (greedy, sampling or beam search).

Gradients are taken with respect to the trainable subtree only; frozen params
enter through ``jax.lax.stop_gradient``, so XLA never computes their
gradients, and the gradient norm is over trainable grads alone. The rng of a
step is ``fold_in(seed, step)``, so a resumed run draws the same randomness.
Metrics stay on device; the loop fetches them at log steps.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from vsrllm_jax import losses, optim, sharding
from vsrllm_jax.models import generation
from vsrllm_jax.models import llm as llm_lib
from vsrllm_jax.models.llm import LlamaModel
from vsrllm_jax.models.projectors import text_aware
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.train_state import TrainState

TRAIN_KEYS = ("video", "video_mask", "features", "features_mask", "instruction_ids",
              "instruction_mask", "label_ids", "label_mask", "cluster_counts", "example_mask",
              "ctc_labels", "ctc_label_mask")


def model_inputs(batch: dict) -> dict:
  """The numeric fields the model reads (ids and texts stay on the host)."""
  return {k: v for k, v in batch.items() if k in TRAIN_KEYS}


def compute_losses(model: VSRModel, params, model_state, batch, *, train: bool, rng=None):
  """Named losses (unweighted) and extra metrics for one batch."""
  rngs = {"dropout": rng} if rng is not None else {}
  out = model.apply({"params": params, **model_state}, batch, train=train, rngs=rngs)
  label_mask = batch["label_mask"].astype(bool)
  if "example_mask" in batch:
    label_mask = label_mask & batch["example_mask"][:, None].astype(bool)
  named = {"lm": losses.lm_cross_entropy(out["logits"], batch["label_ids"], label_mask)}
  named.update(out["projector"].aux_losses)
  temperature = text_aware.visual_text_temperature(model.projector_config)
  if temperature is not None:   # label text in the loss only, never a projector input
    label_embeds = model.apply({"params": params, **model_state}, batch["label_ids"],
                               method=VSRModel.embed_ids)
    named["visual_text"] = losses.visual_text_info_nce(
        out["projector"].embeddings["pooled"], label_embeds, label_mask, temperature)
  extra = {"token_accuracy": losses.token_accuracy(out["logits"], batch["label_ids"], label_mask)}
  return named, extra


def check_loss_weights(model: VSRModel, state: TrainState, config, batch) -> list[str]:
  """Fails before training unless config.loss_weights names exactly the produced losses."""
  named, _ = jax.eval_shape(
      lambda p, s, b: compute_losses(model, p, s, b, train=True, rng=jax.random.key(0)),
      state.params, state.model_state, batch)
  losses.check_loss_names(named.keys(), dict(config.loss_weights))
  return sorted(named)


def _label_tokens(batch) -> jax.Array:
  """Label tokens that count in the LM loss (a micro-batch's weight under accumulation)."""
  mask = batch["label_mask"].astype(bool)
  if "example_mask" in batch:
    mask = mask & batch["example_mask"][:, None].astype(bool)
  return jnp.sum(mask).astype(jnp.float32)


def _micro_batches(batch, k: int):
  """[B, ...] -> [k, B/k, ...]: micro-batch j holds rows j, j+k, j+2k, ... so that each
  device's contiguous shard of the batch splits locally."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                       f"config.grad_accum_steps={k} micro-batches")
    return jnp.moveaxis(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(model: VSRModel, tx: optax.GradientTransformation, labels, config,
                    schedules: dict[str, Callable], state_shardings, mesh) -> Callable:
  """A jitted ``step(state, batch) -> (state, metrics)`` with the state donated.

  ``config.grad_accum_steps`` = k > 1 splits the batch into k micro-batches
  run one after another (activation memory of one micro-batch) and applies
  one update with their gradients weighted by label tokens: for the LM loss,
  exactly the gradient of the whole batch. Batch-level auxiliary losses
  (InfoNCE negatives, routing statistics) see one micro-batch at a time.
  """
  weights = dict(config.loss_weights)
  seed = config.seed
  accum = int(config.get("grad_accum_steps", 1))
  if accum < 1:
    raise ValueError(f"config.grad_accum_steps={accum} must be >= 1")
  rules = sharding.rules(config)

  def step(state: TrainState, batch):
    with sharding.activation_sharding(mesh, rules):
      return _step(state, batch)

  def _step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    trainable, frozen = optim.split(state.params, labels)
    frozen = jax.lax.stop_gradient(frozen)

    def loss_fn(trainable, batch, rng):
      params = optim.merge(trainable, frozen)
      named, extra = compute_losses(model, params, state.model_state, batch, train=True, rng=rng)
      return losses.weighted_total(named, weights), (named, extra)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
      (total, (named, extra)), grads = grad_fn(trainable, batch, rng)
    else:
      micro = _micro_batches(batch, accum)
      share = jax.vmap(_label_tokens)(micro)
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
               "train/token_accuracy": extra["token_accuracy"]}
    metrics.update({f"train/{k}": v for k, v in named.items()})
    metrics.update({f"train/lr_{k}": fn(state.step) for k, fn in schedules.items()})
    new_state = state.replace(step=state.step + 1, params=optim.merge(trainable, frozen),
                              opt_state=opt_state)
    return new_state, metrics

  # Batch shardings come with the global batch arrays (sharding.global_batch).
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_shardings, sharding.replicated(mesh)))


def make_predict_fn(model: VSRModel, config, *, eos_id: int | Sequence[int],
                    pad_id: int, mesh=None) -> Callable:
  """A ``predict(params, model_state, batch) -> tokens [B, max_new_tokens]``, jitted.

  ``predict.prepare(params)`` returns the params in the layout it decodes fastest
  with (CPU: the LLM layers unstacked); callers decoding many batches with the
  same params (``evaluation.decode_split``) call it once and pass its result.

  Decodes with ``config.decode`` (strategy, sampling and beam options; see
  ``generation.generate``), validated here; compiled once per batch shape.
  With sampling, the n-th call of the returned predictor draws with
  ``fold_in(key(decode.seed), n)``, so a decode command is reproducible.
  With ``mesh``, activations are constrained by the config's sharding rules.
  """
  llm = LlamaModel(model.llm_config)
  options = generation.options_from_config(config.decode)
  seed = options.pop("seed")

  rules = sharding.rules(config)

  def predict(params, model_state, batch, rng):
    with (sharding.activation_sharding(mesh, rules) if mesh is not None
          else contextlib.nullcontext()):
      embeds, mask, _ = model.apply({"params": params, **model_state}, batch, train=False,
                                    method=VSRModel.prompt)
      return generation.generate(llm, params["llm"], embeds, mask, eos_id=eos_id,
                                 pad_id=pad_id, rng=rng, **options)

  jitted = jax.jit(predict)
  if options["strategy"] != "sample" or options["temperature"] == 0:
    def decode(params, model_state, batch):
      return jitted(params, model_state, batch, None)
  else:
    key, calls = jax.random.key(seed), [0]

    def decode(params, model_state, batch):
      rng = jax.random.fold_in(key, calls[0])
      calls[0] += 1
      return jitted(params, model_state, batch, rng)

  decode.prepare = _decoding_layout
  return decode


@jax.jit
def _decoding_layout_cpu(params):
  return {**params, "llm": llm_lib.unstack_layers(params["llm"])}


def _decoding_layout(params):
  """The params a predictor decodes fastest with, made once for many batches: on CPU
  the LLM's layers unstacked (``llm.unstack_layers``; one more copy of them while
  it is held), elsewhere the params as they are."""
  if not generation.default_unstack_layers() or llm_lib.is_unstacked(params["llm"]):
    return params
  return _decoding_layout_cpu(params)
