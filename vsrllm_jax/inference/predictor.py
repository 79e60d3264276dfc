"""The jitted predictor: a batch -> generated tokens, with the run's decode settings."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import jax

from vsrllm_jax import sharding
from vsrllm_jax.inference import generation
from vsrllm_jax.models.llm import LlamaModel
from vsrllm_jax.models.vsr_model import VSRModel


def make_predictor(model: VSRModel, config, *, eos_id: int | Sequence[int], pad_id: int,
                   mesh=None) -> Callable:
  """A ``predict(params, model_state, batch) -> tokens [B, max_new_tokens]``, jitted.

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
    return lambda params, model_state, batch: jitted(params, model_state, batch, None)
  key, calls = jax.random.key(seed), [0]

  def sample(params, model_state, batch):
    rng = jax.random.fold_in(key, calls[0])
    calls[0] += 1
    return jitted(params, model_state, batch, rng)

  return sample
