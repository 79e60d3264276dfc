"""Greedy, sampled and beam-search decoding with an explicit KV cache, jit-friendly.

The prompt arrives as embeddings (the composed model's
``[instruction][visual tokens]``), possibly padded anywhere; it runs once for
the B rows and the cache is sized once to ``P + max_new_tokens`` so that the
loops have static shapes (beam search repeats the filled cache K times).
``generate`` is the single entry point; call it inside ``jax.jit`` with the
model and the options static, e.g.::

  gen = jax.jit(functools.partial(generate, model, max_new_tokens=12, eos_id=2,
                                  pad_id=0, strategy="sample", top_p=0.9))
  tokens = gen(params, embeds, mask, rng=jax.random.key(0))

Every strategy returns int32 [B, max_new_tokens] with ``pad_id`` after a row's
first EOS (``eos_id`` may be a list) and stops early once every row is done.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from vsrllm_jax.inference import beam_search as beam_lib
from vsrllm_jax.models import llm
from vsrllm_jax.models.llm import LlamaModel, init_cache

STRATEGIES = ("greedy", "sample", "beam")
# config.decode keys besides max_new_tokens, with the defaults a config.json
# written before they existed gets (configs/common.py sets the same values).
OPTION_DEFAULTS = dict(strategy="greedy", temperature=1.0, top_p=1.0, top_k=0, beam_size=4,
                       length_penalty=1.0, early_stopping="heuristic", seed=0)


def _eos_array(eos_id: int | Sequence[int]) -> jax.Array:
  return jnp.asarray(beam_lib.eos_ids(eos_id), jnp.int32)  # [K]


# --- the KV cache ----------------------------------------------------------------


def _map_batch_axis(cache: Mapping[str, Any], fn: Callable) -> dict:
  """Applies ``fn(leaf, axis)`` to every cache leaf with a 'batch' axis (llm.CACHE_AXES)."""
  out = {}
  for name, value in cache.items():
    if name not in llm.CACHE_AXES:
      raise ValueError(f"cache field {name!r} has no entry in llm.CACHE_AXES, so its batch axis "
                       "is unknown")
    names = llm.CACHE_AXES[name]
    axis = names.index("batch") if "batch" in names else None
    out[name] = value if axis is None else jax.tree.map(lambda x, a=axis: fn(x, a), value)
  return out


def repeat_cache(cache: Mapping[str, Any], n: int) -> dict:
  """Each row repeated ``n`` times: new row ``b * n + j`` is old row ``b``."""
  return _map_batch_axis(cache, lambda x, axis: jnp.repeat(x, n, axis=axis))


def take_cache(cache: Mapping[str, Any], beam_index: jax.Array) -> dict:
  """Beam reordering: row b*K + k becomes old row b*K + beam_index[b, k] ([B, K])."""
  return _map_batch_axis(cache,
                         lambda x, axis: beam_lib.gather_beams(x, beam_index, axis=axis))


def _prefill(model: LlamaModel, params, inputs_embeds, attention_mask, max_new_tokens: int):
  """One pass over the prompts -> (next-token logits [B, V], cache, step fn).

  ``step(cache, tokens [N]) -> (logits [N, V], cache)`` feeds one token per row.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = inputs_embeds.shape[:2]
  mask = jnp.asarray(attention_mask).astype(bool)  # [B, P]
  variables = {"params": params}
  cache = init_cache(model.config, b, p + max_new_tokens)
  # Next-token logits come from each row's last real prompt position.
  last = jnp.max(jnp.where(mask, jnp.arange(p)[None], 0), axis=1)  # [B]
  logits, cache = model.apply(variables, inputs_embeds=inputs_embeds, attention_mask=mask,
                              cache=cache, logit_positions=last[:, None])

  def step(cache, tokens):
    logits, cache = model.apply(variables, tokens[:, None], cache=cache)  # [N, 1, V]
    return logits[:, -1], cache

  return logits[:, -1], cache, step


# --- greedy and sampling -------------------------------------------------------


def _token_loop(model, params, inputs_embeds, attention_mask, pick: Callable, *,
                max_new_tokens: int, eos_id, pad_id: int) -> jax.Array:
  """One token per row and step, ``pick(logits [B, V], i) -> [B]``; pad after EOS."""
  b = inputs_embeds.shape[0]
  eos = _eos_array(eos_id)
  logits, cache, step = _prefill(model, params, inputs_embeds, attention_mask, max_new_tokens)

  def choose(logits, i, done):
    token = jnp.where(done, jnp.int32(pad_id), pick(logits, i).astype(jnp.int32))  # [B]
    return token, done | jnp.isin(token, eos)

  token, done = choose(logits, jnp.int32(0), jnp.zeros((b,), bool))
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, done, cache, token = state
    logits, cache = step(cache, token)
    token, done = choose(logits, i, done)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (jnp.int32(0), i))
    return i + 1, tokens, done, cache, token

  state = (jnp.int32(1), tokens, done, cache, token)
  return jax.lax.while_loop(cond, body, state)[1]


def argmax(logits: jax.Array, chunk: int = 128) -> jax.Array:
  """``jnp.argmax(logits, -1)`` (the first maximal index, as torch), in two stages.

  The maximum of each ``chunk`` of the vocabulary, the first chunk holding the
  overall maximum, then the first maximum inside it. XLA's CPU argmax is one
  serial reduction that carries (value, index) pairs: 0.7 ms for [8, 32000],
  a twentieth of a decode step; this is ~4x faster. Ties pick as argmax. A row
  with a NaN (whose max XLA may skip) picks its first NaN, as argmax does: the
  chunk is chosen by a NaN flag, without a branch (a ``lax.cond`` copies the
  logits into its branch: ~4% of a step).
  """
  *lead, vocab = logits.shape
  pad = -vocab % chunk
  if pad:
    logits = jnp.pad(logits, [(0, 0)] * len(lead) + [(0, pad)], constant_values=-jnp.inf)
  blocks = logits.reshape(*lead, -1, chunk)                               # [..., C, chunk]
  has_nan = jnp.isnan(blocks).any(axis=-1)                                # [..., C]
  best = jnp.where(has_nan.any(axis=-1), jnp.argmax(has_nan, axis=-1),
                   jnp.argmax(jnp.max(blocks, axis=-1), axis=-1))         # [...]
  inside = jnp.take_along_axis(blocks, best[..., None, None], axis=-2)[..., 0, :]
  return (best * chunk + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def greedy_generate(model: LlamaModel, params, inputs_embeds: jax.Array,
                    attention_mask: jax.Array, *, max_new_tokens: int,
                    eos_id: int | Sequence[int], pad_id: int) -> jax.Array:
  """Greedy continuation of embedded prompts -> tokens int32 [B, max_new_tokens].

  inputs_embeds [B, P, E]; attention_mask [B, P] (1 = real, padding anywhere);
  ``params`` is the inner 'params' dict.
  """
  return _token_loop(model, params, inputs_embeds, attention_mask,
                     lambda logits, i: argmax(logits),
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def process_logits(logits: jax.Array, *, temperature: float, top_p: float = 1.0,
                   top_k: int = 0) -> jax.Array:
  """Temperature, then top-k, then top-p (transformers' order); dropped tokens get -inf.

  Top-p keeps the most likely tokens until their mass reaches ``top_p``
  (always at least one).
  """
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1,
                        keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_generate(model: LlamaModel, params, inputs_embeds: jax.Array,
                    attention_mask: jax.Array, *, rng: jax.Array, max_new_tokens: int,
                    eos_id: int | Sequence[int], pad_id: int, temperature: float = 1.0,
                    top_p: float = 1.0, top_k: int = 0) -> jax.Array:
  """Sampled continuation (``process_logits``); step i draws with ``fold_in(rng, i)``."""
  def pick(logits, i):
    filtered = process_logits(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    return jax.random.categorical(jax.random.fold_in(rng, i), filtered, axis=-1)

  return _token_loop(model, params, inputs_embeds, attention_mask, pick,
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


# --- beam search ---------------------------------------------------------------


def beam_generate(model: LlamaModel, params, inputs_embeds: jax.Array,
                  attention_mask: jax.Array, *, beam_size: int, max_new_tokens: int,
                  eos_id: int | Sequence[int], pad_id: int, length_penalty=1.0,
                  early_stopping: str = "heuristic") -> beam_lib.BeamResult:
  """Beam search (see ``beam_search``) -> best tokens [B, max_new_tokens] and scores [B].

  The prompt runs once for the B rows; the filled cache is then repeated K times.
  """
  logits, cache, step = _prefill(model, params, inputs_embeds, attention_mask, max_new_tokens)

  def step_fn(cache, tokens):
    logits, cache = step(cache, tokens)
    return jax.nn.log_softmax(logits, axis=-1), cache

  return beam_lib.beam_search(step_fn, repeat_cache(cache, beam_size),
                              jax.nn.log_softmax(logits, axis=-1), beam_size=beam_size,
                              max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                              length_penalty=length_penalty, early_stopping=early_stopping,
                              reorder_fn=take_cache)


# --- the entry point -----------------------------------------------------------


def generate(model: LlamaModel, params, inputs_embeds: jax.Array, attention_mask: jax.Array,
             *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
             strategy: str = "greedy", temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, beam_size: int = 4, length_penalty: float = 1.0,
             early_stopping: str = "heuristic", rng: jax.Array | None = None) -> jax.Array:
  """Continues embedded prompts -> tokens int32 [B, max_new_tokens], pad after EOS.

  ``strategy``: 'greedy'; 'sample' (``temperature`` > 0, ``top_p`` in (0, 1],
  ``top_k`` >= 0 with 0 = off; needs ``rng``; temperature 0 is greedy); 'beam'
  (``beam_size``, ``length_penalty``, ``early_stopping``; see beam_search).
  Options that the strategy does not use are validated but ignored.
  """
  check_options(max_new_tokens=max_new_tokens, strategy=strategy, temperature=temperature,
                top_p=top_p, top_k=top_k, beam_size=beam_size, length_penalty=length_penalty,
                early_stopping=early_stopping)
  args = (model, params, inputs_embeds, attention_mask)
  common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  if strategy == "beam":
    return beam_generate(*args, beam_size=beam_size, length_penalty=length_penalty,
                         early_stopping=early_stopping, **common).tokens
  if strategy == "greedy" or temperature == 0:
    return greedy_generate(*args, **common)
  if rng is None:
    raise ValueError("strategy 'sample' needs an rng key (decode.seed in a config)")
  return sample_generate(*args, rng=rng, temperature=temperature, top_p=top_p, top_k=top_k,
                         **common)


def generate_from_ids(model: LlamaModel, params, input_ids: jax.Array,
                      attention_mask: jax.Array | None = None, **kwargs) -> jax.Array:
  """``generate`` for token-id prompts [B, P] (embedded with the model's table)."""
  embeds = model.apply({"params": params}, input_ids,
                       method=LlamaModel.embed)  # [B, P, E]
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, bool)
  return generate(model, params, embeds, attention_mask, **kwargs)


def greedy_generate_from_ids(model: LlamaModel, params, input_ids: jax.Array,
                             attention_mask: jax.Array | None = None, *, max_new_tokens: int,
                             eos_id: int | Sequence[int], pad_id: int) -> jax.Array:
  """``greedy_generate`` for token-id prompts [B, P]."""
  return generate_from_ids(model, params, input_ids, attention_mask,
                           max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


# --- options -------------------------------------------------------------------


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_options(*, max_new_tokens, strategy, temperature, top_p, top_k, beam_size,
                  length_penalty, early_stopping, seed=0, prefix: str = "decode.") -> None:
  """Raises ValueError naming the key (``decode.top_p must be in (0, 1], got 1.5``)."""
  def need(ok, key, expected, value):
    if not ok:
      raise ValueError(f"{prefix}{key} must be {expected}, got {value!r}")

  need(_is_int(max_new_tokens) and max_new_tokens >= 1, "max_new_tokens", "an int >= 1",
       max_new_tokens)
  need(strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", strategy)
  need(_is_real(temperature) and temperature >= 0, "temperature", "a number >= 0 (0 = greedy)",
       temperature)
  need(_is_real(top_p) and 0 < top_p <= 1, "top_p", "in (0, 1]", top_p)
  need(_is_int(top_k) and top_k >= 0, "top_k", "an int >= 0 (0 = off)", top_k)
  need(_is_int(beam_size) and beam_size >= 1, "beam_size", "an int >= 1", beam_size)
  if not isinstance(length_penalty, jax.Array):  # a traced value is checked by its caller
    need(_is_real(length_penalty), "length_penalty", "a finite number", length_penalty)
  need(early_stopping in beam_lib.EARLY_STOPPING, "early_stopping",
       f"one of {beam_lib.EARLY_STOPPING}", early_stopping)
  need(_is_int(seed), "seed", "an int", seed)


def options_from_config(decode: Mapping[str, Any]) -> dict[str, Any]:
  """config.decode -> validated ``generate`` options plus 'seed'.

  Keys missing from an older run's config.json take ``OPTION_DEFAULTS``;
  unknown keys are errors.
  """
  given = dict(decode)
  valid = {"max_new_tokens", *OPTION_DEFAULTS}
  unknown = sorted(set(given) - valid)
  if unknown:
    raise ValueError(f"unknown config.decode keys {unknown}; valid keys: {sorted(valid)}")
  if "max_new_tokens" not in given:
    raise ValueError("config.decode.max_new_tokens is missing")
  options = dict(OPTION_DEFAULTS, **given)
  check_options(**options)
  return options
