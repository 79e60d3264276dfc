"""Decoding strategies: beam search against brute force and transformers, sampling, options.

A tiny random transformers Llama (saved to a tmp dir, no network) is loaded
with our ``from_pretrained``; compiled functions are shared through module
fixtures.
"""
from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vsrllm_jax.configs.common import get_base_config
from tests.helpers.numerics import assert_close
from tests.helpers.hf_models import saved_llama
from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax import decode as decode_cmd
from vsrllm_jax.inference import predictor
from vsrllm_jax.inference import beam_search, generation
from vsrllm_jax.models import build, llm
from vsrllm_jax.formats import hf_llm

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
            max_position_embeddings=128)
LENGTHS = (7, 4, 2)  # prompt lengths of the batch
T = 8                # max_new_tokens
HF_EARLY_STOPPING = {"heuristic": False, "beam_full": True, "never": "never"}


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(hf model, our model, params, prompts): ids [B, P] padded on the right for us."""
  path = tmp_path_factory.mktemp("llama")
  hf = saved_llama(path, **TINY)
  model, params = hf_llm.from_pretrained(path)
  p = max(LENGTHS)
  ids = np.random.default_rng(0).integers(3, TINY["vocab_size"], size=(len(LENGTHS), p))
  mask = (np.arange(p)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return hf, model, params, ids * mask, mask


def _left_pad(ids, mask):
  """Our right-padded rows moved to the right end (transformers' padding)."""
  out_ids, out_mask = np.zeros_like(ids), np.zeros_like(mask)
  for r, n in enumerate(mask.sum(1)):
    out_ids[r, -n:], out_mask[r, -n:] = ids[r, :n], 1
  return out_ids, out_mask


@functools.lru_cache(maxsize=None)
def _jitted(model, **static):
  return jax.jit(functools.partial(generation.generate_from_ids, model, max_new_tokens=T,
                                   **static))


def _generate(setup, rng=None, **options):
  _, model, params, ids, mask = setup
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  return np.asarray(_jitted(model, **options)(params, ids, mask, rng=rng))


@pytest.fixture(scope="module")
def greedy_reference(setup):
  """Greedy tokens with EOS disabled, and two ids that occur in them (as EOS)."""
  tokens = _generate(setup, eos_id=-1, pad_id=0)
  return tokens, (int(tokens[0, 2]), int(tokens[1, 4]))


def _cut_at_eos(tokens, eos, pad, length=T):
  """Each row cut after its first EOS, then padded with ``pad`` to ``length``."""
  out = np.full((len(tokens), length), pad, np.int64)
  for r, row in enumerate(np.asarray(tokens)):
    hits = np.flatnonzero(np.isin(row, eos))
    n = hits[0] + 1 if len(hits) else len(row)
    out[r, :n] = row[:n]
  return out


# --- beam search --------------------------------------------------------------


def test_beam_size_one_is_greedy(setup, greedy_reference):
  _, eos = greedy_reference
  greedy = _generate(setup, eos_id=eos, pad_id=-7)
  beam = _generate(setup, eos_id=eos, pad_id=-7, strategy="beam", beam_size=1)
  assert (greedy == -7).any() and (greedy != -7).sum() > 5  # EOS ended some rows early
  np.testing.assert_array_equal(beam, greedy)


@functools.partial(jax.jit, static_argnames=("beam_size", "max_new_tokens", "early_stopping"))
def _markov_search(first, trans, length_penalty, *, beam_size, max_new_tokens, early_stopping):
  """Beam search over per-row Markov chains: first [B, V], trans [B, V, V] log-probs."""
  def step_fn(row, tokens):  # the state is each beam's row of the batch
    return trans[row, tokens], row

  rows = jnp.repeat(jnp.arange(first.shape[0]), beam_size)
  return beam_search.beam_search(step_fn, rows, first, beam_size=beam_size,
                                 max_new_tokens=max_new_tokens, eos_id=0, pad_id=-1,
                                 length_penalty=length_penalty, early_stopping=early_stopping)


def _brute_force(first, trans, max_new_tokens, length_penalty):
  """Best (tokens padded with -1, score) per row over every sequence (EOS = 0)."""
  v = first.shape[-1]
  results = []
  for r in range(first.shape[0]):
    best = (-np.inf, None)
    for n in range(1, max_new_tokens + 1):
      for seq in itertools.product(range(v), repeat=n):
        if 0 in seq[:-1] or (n < max_new_tokens and seq[-1] != 0):
          continue  # EOS ends a sequence; only max_new_tokens may end one without it
        logp = first[r, seq[0]] + sum(trans[r, a, c] for a, c in zip(seq, seq[1:]))
        best = max(best, (logp / n ** length_penalty, seq))
    results.append((list(best[1]) + [-1] * (max_new_tokens - len(best[1])), best[0]))
  return np.array([t for t, _ in results]), np.array([s for _, s in results])


def test_beam_search_finds_what_greedy_misses():
  # Tokens: 0 = EOS, 1 = A, 2 = B, 3 = C. A is likelier first, but B then EOS
  # (0.4 * 0.9) beats A then anything (0.5 * 0.3 at best).
  first = np.log(np.float32([[0.001, 0.5, 0.4, 0.099]]))
  trans = np.log(np.float32([[[0.97, 0.01, 0.01, 0.01],
                   [0.30, 0.26, 0.24, 0.20],
                   [0.90, 0.05, 0.03, 0.02],
                   [0.50, 0.30, 0.10, 0.10]]]))
  expected_tokens, expected_scores = _brute_force(first, trans, 4, 1.0)
  np.testing.assert_array_equal(expected_tokens[0], [2, 0, -1, -1])  # the case is as meant
  kw = dict(max_new_tokens=4, early_stopping="heuristic")
  tokens, scores = _markov_search(first, trans, 1.0, beam_size=2, **kw)
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
  greedy, _ = _markov_search(first, trans, 1.0, beam_size=1, **kw)
  np.testing.assert_array_equal(greedy[0], [1, 0, -1, -1])


@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 0.7, 2.0])
def test_exhaustive_beam_search_equals_brute_force(length_penalty):
  """With every candidate inside the beam and 'never', the search is exact."""
  rng = np.random.default_rng(1)
  v, t = 3, 4
  first = np.log(rng.dirichlet(np.ones(v), size=3)).astype(np.float32)
  trans = np.log(rng.dirichlet(np.ones(v), size=(3, v))).astype(np.float32)
  expected_tokens, expected_scores = _brute_force(first, trans, t, length_penalty)
  k = (v - 1) ** (t - 1) * v  # every candidate of the last step is in the top K
  tokens, scores = _markov_search(first, trans, np.float32(length_penalty), beam_size=k,
                                  max_new_tokens=t, early_stopping="never")
  np.testing.assert_array_equal(tokens, expected_tokens)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
  assert len({len([x for x in row if x >= 0]) for row in expected_tokens}) > 1 or \
      length_penalty in (-1.0, 2.0)  # the rows' best lengths differ (not all max length)


@functools.lru_cache(maxsize=None)
def _beam_fn(model, eos, early_stopping):
  return jax.jit(functools.partial(generation.beam_generate, model, beam_size=4,
                                   max_new_tokens=T, eos_id=eos, pad_id=-7,
                                   early_stopping=early_stopping))


@pytest.mark.parametrize("early_stopping,length_penalty",
                         [("heuristic", 1.0), ("beam_full", 0.5), ("never", 0.5),
                          ("heuristic", -0.5)])
def test_beam_search_matches_transformers(setup, greedy_reference, early_stopping,
                                          length_penalty):
  hf, model, params, ids, mask = setup
  _, eos = greedy_reference
  left_ids, left_mask = _left_pad(ids, mask)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(left_ids), attention_mask=torch.as_tensor(left_mask),
                      num_beams=4, do_sample=False, max_new_tokens=T,
                      length_penalty=length_penalty,
                      early_stopping=HF_EARLY_STOPPING[early_stopping], eos_token_id=list(eos),
                      pad_token_id=0, return_dict_in_generate=True, output_scores=True)
  expected = _cut_at_eos(out.sequences[:, left_ids.shape[1]:].numpy(), eos, pad=-7)
  assert (expected == -7).any()  # some best hypothesis ended with an EOS

  embeds = model.apply({"params": params}, ids, method=llm.LlamaModel.embed)
  got = _beam_fn(model, eos, early_stopping)(params, embeds, mask,
                                             length_penalty=jnp.float32(length_penalty))
  assert got.tokens.shape == (len(LENGTHS), T) and got.tokens.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got.tokens), expected)  # pad after EOS included
  assert_close(got.scores, out.sequences_scores.numpy(), rtol=1e-4, atol_frac=1e-5)


def _numbered_cache(config, batch):
  """An init_cache-shaped cache whose entries are all distinct (bools: a pattern)."""
  cache = llm.init_cache(config, batch, 5)
  return {name: (np.arange(x.size).reshape(x.shape) % 7 < 3 if x.dtype == bool else
                 np.arange(x.size).reshape(x.shape).astype(x.dtype))
          for name, x in cache.items()}


def test_cache_helpers_follow_cache_axes(setup):
  _, model, _, _, _ = setup
  cache, beams = _numbered_cache(model.config, 2), np.array([[2, 0, 0], [1, 2, 0]])
  rep = generation.repeat_cache(cache, 3)
  wide = _numbered_cache(model.config, 6)
  taken = generation.take_cache(wide, jnp.asarray(beams))  # K = 3 beams of 2 prompts
  old_rows = [2, 0, 0, 4, 5, 3]
  for name, axes in llm.CACHE_AXES.items():
    if "batch" not in axes:
      assert rep[name].shape == cache[name].shape and taken[name].shape == wide[name].shape
      continue
    axis = axes.index("batch")
    np.testing.assert_array_equal(rep[name], np.repeat(cache[name], 3, axis=axis), err_msg=name)
    np.testing.assert_array_equal(taken[name], np.take(wide[name], old_rows, axis=axis),
                                  err_msg=name)
  with pytest.raises(ValueError, match="'extra' has no entry in llm.CACHE_AXES"):
    generation.repeat_cache(dict(cache, extra=np.zeros(2)), 2)


def test_argmax_is_jnp_argmax():
  """Two-stage argmax: first maximal index (ties), vocabularies not a multiple of the
  chunk, NaN (the first NaN wins, even past an inf) and all -inf rows, leading batch axes."""
  rng = np.random.default_rng(0)
  for vocab in (5, 128, 300, 1000):
    x = rng.integers(-2, 3, (2, 3, vocab)).astype(np.float32)     # many ties
    x[0, 0, :] = -np.inf
    x[1, 2, vocab // 2] = np.nan
    x[0, 2, [1, vocab - 2]] = np.nan
    x[1, 1, 0], x[1, 1, vocab - 1] = np.inf, np.nan
    got = np.asarray(generation.argmax(jnp.asarray(x), chunk=64))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))


# --- sampling -------------------------------------------------------------------


def test_near_deterministic_sampling_is_greedy(setup, greedy_reference):
  greedy, _ = greedy_reference
  key = jax.random.key(3)
  for options in (dict(temperature=1e-6), dict(top_p=1e-6)):
    got = _generate(setup, key, eos_id=-1, pad_id=0, strategy="sample", **options)
    np.testing.assert_array_equal(got, greedy, err_msg=str(options))
  # Temperature 0 takes the greedy path (sampling without a key would raise).
  _, model, params, ids, mask = setup
  jax.eval_shape(functools.partial(generation.generate_from_ids, model, max_new_tokens=T,
                                   eos_id=-1, pad_id=0, strategy="sample", temperature=0.0),
                 params, ids, mask)
  with pytest.raises(ValueError, match="needs an rng key"):
    jax.eval_shape(functools.partial(generation.generate_from_ids, model, max_new_tokens=T,
                                     eos_id=-1, pad_id=0, strategy="sample", temperature=0.5),
                   params, ids, mask)


def test_sampling_is_reproducible_per_key(setup, greedy_reference):
  _, eos = greedy_reference
  sample = functools.partial(_generate, setup, eos_id=eos, pad_id=-7, strategy="sample")
  a, b = sample(jax.random.key(0)), sample(jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert (sample(jax.random.key(1)) != a).any()


def _truncated_softmax(logits, temperature, top_p, top_k):
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  keep = np.zeros(len(p), bool)
  mass = 0.0
  for rank, i in enumerate(order):
    if mass >= top_p or (top_k and rank >= top_k):
      break
    keep[i], mass = True, mass + p[i]
  q = np.where(keep, p, 0.0)
  return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.8, 0), (1.3, 0.9, 4)])
def test_sample_frequencies_match_the_truncated_softmax(temperature, top_p, top_k):
  logits = jnp.array([2.0, 1.5, 1.2, 0.3, -0.5, -1.0, 0.9, 1.4])
  n = 40000
  draw = jax.jit(jax.vmap(lambda key: jax.random.categorical(
      key, generation.process_logits(logits, temperature=temperature, top_p=top_p,
                                     top_k=top_k))))
  samples = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  freq = np.bincount(samples, minlength=len(logits)) / n
  expected = _truncated_softmax(logits, temperature, top_p, top_k)
  assert 2 < (expected > 0).sum() < len(logits)  # the truncation is doing something
  np.testing.assert_array_equal(freq[expected == 0], 0)
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n)  # 5 standard errors per token
  assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)


# --- EOS and lengths --------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_pad_after_eos_and_max_new_tokens(setup, greedy_reference, strategy):
  """(Beam search: the transformers test compares whole padded outputs.)"""
  _, eos = greedy_reference
  if strategy == "sample":  # the compiled functions of other tests
    got = _generate(setup, jax.random.key(0), eos_id=eos, pad_id=-7, strategy="sample")
  else:
    got = _generate(setup, eos_id=eos, pad_id=-7)
  assert got.shape == (len(LENGTHS), T) and got.dtype == np.int32
  np.testing.assert_array_equal(got, _cut_at_eos(got, eos, pad=-7))  # pad after the first EOS
  if strategy == "greedy":
    assert np.isin(got, eos).any() and (got[:, -1] == -7).any()


# --- options ----------------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("top_p", 1.5, r"decode.top_p must be in \(0, 1\], got 1.5"),
    ("top_p", 0.0, r"decode.top_p must be in \(0, 1\], got 0.0"),
    ("temperature", -1.0, r"decode.temperature must be a number >= 0"),
    ("strategy", "beams", r"decode.strategy must be one of \('greedy', 'sample', 'beam'\)"),
    ("beam_size", 0, r"decode.beam_size must be an int >= 1, got 0"),
    ("top_k", -2, r"decode.top_k must be an int >= 0"),
    ("length_penalty", float("nan"), r"decode.length_penalty must be a finite number"),
    ("early_stopping", "yes", r"decode.early_stopping must be one of"),
    ("max_new_tokens", 0, r"decode.max_new_tokens must be an int >= 1"),
])
def test_bad_decode_options_name_the_key(key, value, message):
  decode = get_base_config().decode.to_dict()
  generation.options_from_config(decode)  # the defaults are valid
  with pytest.raises(ValueError, match=message):
    generation.options_from_config(dict(decode, **{key: value}))


def test_decode_config_keys_and_flags():
  config = get_base_config()
  assert set(config.decode) == {"max_new_tokens", *generation.OPTION_DEFAULTS}
  assert {k: config.decode[k] for k in generation.OPTION_DEFAULTS} == generation.OPTION_DEFAULTS
  with pytest.raises(ValueError, match="unknown config.decode keys \\['beam'\\]"):
    generation.options_from_config(dict(config.decode, beam=3))
  # An older run's config.json without the new keys decodes greedily.
  assert generation.options_from_config({"max_new_tokens": 5})["strategy"] == "greedy"
  config.lock()
  new = decode_cmd.with_decode_options(config, strategy="beam", beam_size=8, top_p=None)
  assert (new.decode.strategy, new.decode.beam_size, new.decode.top_p) == ("beam", 8, 1.0)
  assert config.decode.strategy == "greedy"  # a copy
  with pytest.raises(ValueError, match="decode.top_p must be in"):
    decode_cmd.with_decode_options(config, top_p=2.0)


def test_predict_fn_uses_the_decode_config():
  config = tiny_config()
  config.decode.max_new_tokens = 4
  model = build.build_model(config)
  batch = random_batch(config, 2)
  # Random O(1) params without compiling init; the predictor reads cached features.
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda b: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, b,
                           train=False), batch))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype),
                        shapes.pop("params"))
  model_state = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
  video_mask = batch.pop("video_mask")
  del batch["video"]
  batch.update(features=rng.normal(size=video_mask.shape + (config.encoder.hidden_dim,)),
               features_mask=video_mask)

  def predict(strategy, **options):
    config.decode.update(dict(options, strategy=strategy))
    return predictor.make_predictor(model, config, eos_id=2, pad_id=0)

  greedy = np.asarray(predict("greedy")(params, model_state, batch))
  assert greedy.shape == (2, 4)
  np.testing.assert_array_equal(predict("beam", beam_size=1)(params, model_state, batch), greedy)
  sample = predict("sample", temperature=2.0)
  first = np.asarray(sample(params, model_state, batch))
  assert (np.asarray(sample(params, model_state, batch)) != first).any()  # a new key per call
  np.testing.assert_array_equal(predict("sample")(params, model_state, batch), first)
