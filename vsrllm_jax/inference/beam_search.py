"""Beam search with static shapes, generic over the model (jit-friendly).

A port of transformers' (>= 4.50) vectorised beam search, so that results match
``generate(num_beams=K, do_sample=False, length_penalty=..., early_stopping=...)``:

- each step keeps the top ``max(2, 1 + len(eos)) * K`` candidates over all
  beams, so that K of them are always still running;
- a candidate that emits an EOS, or that reaches ``max_new_tokens``, is a
  finished hypothesis if it is among the top K candidates; its score is
  ``sum(logprobs) / generated_length ** length_penalty`` (EOS counted in the
  length), and the K best finished hypotheses of a row are kept;
- ``early_stopping`` (transformers' value in brackets) decides when a row stops
  taking new hypotheses and when the loop ends:
  ``'heuristic'`` (False, the default) when the best running beam, scored at
  its current length, cannot beat the worst of K finished hypotheses;
  ``'beam_full'`` (True) as soon as K hypotheses are finished;
  ``'never'`` like 'heuristic', but with a positive length penalty the best
  running beam is scored at ``max_new_tokens`` (an upper bound), which makes
  the search exact given the beam (canonical beam search).

The model enters through ``step_fn(state, tokens [B*K]) -> (logprobs [B*K, V],
state)`` and ``reorder_fn(state, beam_index [B, K]) -> state`` (see
``gather_beams``), so the search can be
tested on a hand-written Markov chain; ``generation.beam_generate`` plugs in
the LLM with its KV cache.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EARLY_STOPPING = ("heuristic", "beam_full", "never")
_NEG = -1.0e9  # transformers' "impossible" score offset (float32)


class BeamResult(NamedTuple):
  tokens: jax.Array  # int32 [B, max_new_tokens], the best hypothesis, pad after EOS
  scores: jax.Array  # float32 [B], its length-normalised log-probability


class _Carry(NamedTuple):
  i: jax.Array            # the next position to fill
  running: jax.Array      # [B, K, T] running beams' tokens (pad beyond i)
  running_scores: jax.Array  # [B, K] their summed logprobs, best first
  origin: jax.Array       # [B, K] the old beam (of the same prompt) each beam continues
  finished: jax.Array     # [B, K, T] the best finished hypotheses
  finished_scores: jax.Array  # [B, K] their length-normalised scores, best first
  is_finished: jax.Array  # [B, K] whether a finished slot holds a real hypothesis
  improvable: jax.Array   # [B, 1] the row still accepts new hypotheses
  stop: jax.Array         # () the whole search is over


def eos_ids(eos_id: int | Sequence[int]) -> tuple[int, ...]:
  """One EOS id or several -> a tuple of ints."""
  return (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(i) for i in eos_id)


def gather_beams(x: jax.Array, beam_index: jax.Array, axis: int = 0) -> jax.Array:
  """x with B*K rows on ``axis``; new row b*K + k = old row b*K + beam_index[b, k].

  A gather batched over prompts, so rows never move between prompts (nor
  between devices when the batch axis is sharded).
  """
  b, k = beam_index.shape
  shape = x.shape
  grouped = x.reshape(shape[:axis] + (b, k) + shape[axis + 1:])
  take = jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=axis), in_axes=(axis, 0), out_axes=axis)
  return take(grouped, beam_index).reshape(shape)


def take_beams(state, beam_index: jax.Array):
  """The default ``reorder_fn``: ``gather_beams`` on axis 0 of every leaf."""
  return jax.tree.map(lambda x: gather_beams(x, beam_index), state)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, N, ...], index [B, M] -> [B, M, ...] (per-row gather over the beam axis)."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def beam_search(step_fn: Callable, state, first_logprobs: jax.Array, *, beam_size: int,
                max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
                length_penalty: float | jax.Array = 1.0, early_stopping: str = "heuristic",
                reorder_fn: Callable = take_beams) -> BeamResult:
  """Beam search from ``first_logprobs`` [B, V] (the first new token's log-probs).

  ``state`` holds B*K rows, row ``b*K + k`` for beam k of prompt b, all K rows
  of a prompt equal (e.g. a KV cache repeated K times after one prompt pass).
  """
  if early_stopping not in EARLY_STOPPING:
    raise ValueError(f"early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
  if beam_size < 1 or max_new_tokens < 1:
    raise ValueError(f"beam_size and max_new_tokens must be >= 1, got {beam_size}, "
                     f"{max_new_tokens}")
  eos = jnp.asarray(eos_ids(eos_id), jnp.int32)
  b, v = first_logprobs.shape
  k, t = beam_size, max_new_tokens
  keep = max(2, 1 + eos.shape[0]) * k  # candidates per step: K of them never end
  if keep > k * v:
    raise ValueError(f"beam_size={k} needs a vocabulary of at least {keep // k} tokens, got {v}")
  length_penalty = jnp.asarray(length_penalty, jnp.float32)
  in_top_k = jnp.arange(keep) < k  # only these may become finished hypotheses

  def select(carry: _Carry, logprobs: jax.Array) -> _Carry:
    """One step: logprobs [B, K, V] of the running beams -> the next carry."""
    i = carry.i
    cand = (logprobs + carry.running_scores[:, :, None]).reshape(b, k * v)
    top_scores, top_index = jax.lax.top_k(cand, keep)  # [B, keep], best first
    top_beam, top_token = top_index // v, (top_index % v).astype(jnp.int32)
    top_seqs = _gather(carry.running, top_beam)  # [B, keep, T]
    top_seqs = jnp.where(jnp.arange(t) == i, top_token[..., None], top_seqs)
    ends = jnp.isin(top_token, eos) | (i + 1 >= t)  # [B, keep]

    # The K best candidates that go on.
    go_on = top_scores + ends * _NEG
    _, nxt = jax.lax.top_k(go_on, k)  # [B, K]
    running, running_scores = _gather(top_seqs, nxt), _gather(go_on, nxt)
    origin = _gather(top_beam, nxt)

    # Merge the candidates that just ended into the finished hypotheses.
    just_ended = ends & in_top_k[None]
    new_scores = top_scores / (i + 1).astype(jnp.float32) ** length_penalty
    full = jnp.all(carry.is_finished, axis=1, keepdims=True) & (early_stopping == "beam_full")
    new_scores = new_scores + full * _NEG + (~carry.improvable) * _NEG + (~just_ended) * _NEG
    merged_scores = jnp.concatenate([carry.finished_scores, new_scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    finished = _gather(jnp.concatenate([carry.finished, top_seqs], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    is_finished = _gather(jnp.concatenate([carry.is_finished, just_ended], axis=1), best)

    # Can a running beam still beat the worst finished hypothesis?
    if early_stopping == "never":
      best_length = jnp.where(length_penalty > 0, t, i + 1)
    else:
      best_length = i + 1
    best_running = running_scores[:, :1] / best_length.astype(jnp.float32) ** length_penalty
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
    improvable = carry.improvable & jnp.any(best_running > worst, axis=1, keepdims=True)
    open_beams = ~(jnp.all(is_finished) & (early_stopping == "beam_full"))
    stop = ~(jnp.any(improvable) & open_beams & ~jnp.all(ends))
    return _Carry(i + 1, running, running_scores, origin, finished, finished_scores, is_finished,
                  improvable, stop)

  pads = jnp.full((b, k, t), pad_id, jnp.int32)
  identity = jnp.tile(jnp.arange(k), (b, 1))
  init = _Carry(
      i=jnp.int32(0), running=pads,
      # Only beam 0 takes part in the first step (the K beams are still equal).
      running_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, _NEG).astype(jnp.float32),
                              (b, 1)),
      origin=identity, finished=pads,
      finished_scores=jnp.full((b, k), _NEG, jnp.float32),
      is_finished=jnp.zeros((b, k), bool), improvable=jnp.ones((b, 1), bool),
      stop=jnp.zeros((), bool))
  first = jnp.broadcast_to(first_logprobs[:, None].astype(jnp.float32), (b, k, v))
  # The K rows of a prompt are equal, so the first reorder is the identity.
  carry = select(init, first)._replace(origin=identity)

  def cond(loop):
    carry, _ = loop
    return (carry.i < t) & ~carry.stop

  def body(loop):
    carry, state = loop
    state = reorder_fn(state, carry.origin)
    last = jax.lax.dynamic_index_in_dim(carry.running, carry.i - 1, axis=2, keepdims=False)
    logprobs, state = step_fn(state, last.reshape(b * k))
    return select(carry, logprobs.reshape(b, k, v).astype(jnp.float32)), state

  carry, _ = jax.lax.while_loop(cond, body, (carry, state))
  return BeamResult(carry.finished[:, 0], carry.finished_scores[:, 0])
