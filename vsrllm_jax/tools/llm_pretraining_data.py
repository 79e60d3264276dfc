"""The embedded LLM's pretraining text: GRID sentences as the lip reader sees them.

Each example is ``BOS + instruction + SPAN + sentence + EOS`` where SPAN is the
sentence as seen through the eyes: every word stretched over several
"frames", words sometimes swapped for a look-alike (equal viseme sequence) or
another word of the same slot, sometimes dropped, silences between words
(``pretrain_llm`` says why). Evaluation sentences are held out by a hash of
the sentence text.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.data.synthetic import grid_grammar, visemes

MIN_SPAN, MAX_SPAN = 6, 64  # span length in tokens ("frames")
DEFAULT_MAX_LEN = 80        # BOS + instruction (<= 10) + span + sentence + EOS, padded
MIN_MAX_LEN = 32            # 10 + a span of up to 6 words and 7 silences + 7, rounded up
HOLDOUT_MODULUS = 10        # 1 sentence in ~10 is held out for evaluation
EXAMPLE_MIX = (("noisy", 0.75), ("clean", 0.05), ("empty", 0.1), ("plain", 0.1))
# Per-word noise probabilities at noise level 1 (training draws the level
# uniformly in [0, 1] per example). Copying stays the best guess everywhere.
P_DROP, P_LOOKALIKE, P_SUBSTITUTE, P_SILENCE, P_FLICKER = 0.08, 0.3, 0.1, 0.4, 0.05

SLOT_OF = {w: s for s in grid_grammar.SLOT_NAMES for w in grid_grammar.SLOT_WORDS[s]}


def _lookalikes() -> dict[str, tuple[str, ...]]:
  """word -> other words of its slot with the same viseme sequence (b/p, c/z, d/t, l/n)."""
  out = {}
  for word, slot in SLOT_OF.items():
    seen = visemes.word_to_visemes(word)
    out[word] = tuple(o for o in grid_grammar.SLOT_WORDS[slot]
                      if o != word and visemes.word_to_visemes(o) == seen)
  return out


LOOKALIKES = _lookalikes()


# ------------------------------------------------------------- sentences

def is_held_out(words) -> bool:
  """The deterministic evaluation rule: a hash of the sentence text."""
  digest = hashlib.sha256(" ".join(words).encode()).digest()
  return int.from_bytes(digest[:8], "little") % HOLDOUT_MODULUS == 0


def sample_sentence(rng: np.random.Generator, *, held_out: bool = False) -> list[str]:
  """A training sentence (never held out), or an evaluation one if ``held_out``."""
  while True:
    words = grid_grammar.sample_sentence(rng)
    if is_held_out(words) == held_out:
      return words


def _other_word(rng, word: str, choices) -> str:
  choices = [c for c in choices if c != word]
  return choices[int(rng.integers(len(choices)))]


def render_span(rng: np.random.Generator, words, noise: float, max_span: int = MAX_SPAN):
  """The sentence as a stretched, noisy word sequence of about MIN_SPAN..max_span tokens.

  Every kept word becomes a run of 1..k tokens, long words (more visemes)
  getting longer runs; ``noise`` in [0, 1] scales drops, look-alike and
  same-slot swaps, silences between words and single-frame flicker.
  """
  segments = []  # (word, duration weight)
  for word in words:
    if rng.random() < noise * P_DROP:
      continue
    if LOOKALIKES[word] and rng.random() < noise * P_LOOKALIKE:
      word = _other_word(rng, word, LOOKALIKES[word])
    elif rng.random() < noise * P_SUBSTITUTE:
      word = _other_word(rng, word, grid_grammar.SLOT_WORDS[SLOT_OF[word]])
    segments.append((word, len(visemes.word_to_visemes(word)) * rng.lognormal(0.0, 0.4)))
  with_silence = []
  for i in range(len(segments) + 1):  # before, between and after the words
    if rng.random() < noise * P_SILENCE:
      with_silence.append((tokenizer_lib.SILENCE_WORD, rng.uniform(0.3, 1.5)))
    if i < len(segments):
      with_silence.append(segments[i])
  segments = with_silence or [(tokenizer_lib.SILENCE_WORD, 1.0)]
  length = max(int(rng.integers(MIN_SPAN, max(max_span, MIN_SPAN) + 1)), len(segments))
  weights = np.asarray([w for _, w in segments])
  runs = 1 + rng.multinomial(length - len(segments), weights / weights.sum())
  span = [word for (word, _), n in zip(segments, runs) for _ in range(n)]
  for i, word in enumerate(span):
    if word in SLOT_OF and rng.random() < noise * P_FLICKER:
      span[i] = _other_word(rng, word, LOOKALIKES[word] or grid_grammar.SLOT_WORDS[SLOT_OF[word]])
  if grid_grammar.is_grammatical(span):
    # 'instruction + span' would read as an empty-span example's finished
    # sentence (next token EOS): stretch one word so the two never collide.
    i = int(rng.integers(len(span)))
    span.insert(i, span[i])
  return span


# -------------------------------------------------------------- examples

@functools.lru_cache(maxsize=64)
def instruction_ids(tokenizer, instruction: str) -> tuple[int, ...]:
  return tuple(tokenizer(instruction, add_special_tokens=False)["input_ids"])


def make_example(rng: np.random.Generator, tokenizer, instruction: str | None = None, *,
                 words=None, kind: str | None = None, noise: float | None = None,
                 max_len: int = DEFAULT_MAX_LEN):
  """(ids int32 [L], loss_weights float32 [L]) of one pretraining example.

  See ``_example`` for the arguments.
  """
  ids, weights, _ = _example(rng, tokenizer, instruction, words=words, kind=kind, noise=noise,
                             max_len=max_len)
  return ids, weights


def _example(rng: np.random.Generator, tokenizer, instruction: str | None = None, *,
             words=None, kind: str | None = None, noise: float | None = None,
             max_len: int = DEFAULT_MAX_LEN):
  """(ids int32 [L], loss_weights float32 [L], span_mask bool [L]) of one example.

  ``loss_weights[t]`` weighs predicting ``ids[t]`` (1 on sentence + EOS).
  kind: 'noisy' (BOS instruction noisy-span sentence EOS), 'clean' (span
  stretched but uncorrupted), 'empty' (no span), 'plain' (BOS sentence EOS);
  None draws from EXAMPLE_MIX. instruction None draws a template (half the
  time the default); words None draws a training sentence; noise None draws
  U(0, 1) for 'noisy'.
  """
  if kind is None:
    names, probs = zip(*EXAMPLE_MIX)
    kind = names[int(rng.choice(len(names), p=probs))]
  if instruction is None:
    templates = tokenizer_lib.INSTRUCTION_TEMPLATES
    instruction = templates[0 if rng.random() < 0.5 else int(rng.integers(1, len(templates)))]
  if words is None:
    words = sample_sentence(rng)
  sentence = list(tokenizer.convert_tokens_to_ids(list(words))) + [tokenizer.eos_token_id]
  prefix = [tokenizer.bos_token_id]
  if kind != "plain":
    prefix += instruction_ids(tokenizer, instruction)
  span = []
  if kind in ("noisy", "clean"):
    if kind == "clean":
      noise = 0.0
    elif noise is None:
      noise = float(rng.random())
    span = tokenizer.convert_tokens_to_ids(
        render_span(rng, words, noise, max_span=max_len - len(prefix) - len(sentence)))
  elif kind not in ("empty", "plain"):
    raise ValueError(f"example kind {kind!r} is not known; valid: {[k for k, _ in EXAMPLE_MIX]}")
  ids = np.asarray(prefix + list(span) + sentence, np.int32)
  if len(ids) > max_len:
    raise ValueError(f"example needs {len(ids)} tokens > max_len={max_len}")
  weights = np.zeros(len(ids), np.float32)
  weights[-len(sentence):] = 1.0
  span_mask = np.zeros(len(ids), bool)
  span_mask[len(prefix):len(prefix) + len(span)] = True
  return ids, weights, span_mask


def training_batches(rng, tokenizer, batch_size: int, max_len: int):
  """Endless training batches (ids, weights, mask), right-padded.

  Examples queue by length into two buckets, padded to max_len // 2 and
  max_len: ~44% of examples are short, so a step averages 62 padded tokens
  per example instead of 80, for one extra compile.
  """
  queues = {max_len // 2: [], max_len: []}
  while True:
    example = _example(rng, tokenizer, max_len=max_len)
    length = max_len // 2 if len(example[0]) <= max_len // 2 else max_len
    queues[length].append(example)
    if len(queues[length]) == batch_size:
      yield pad_examples(queues[length], length, tokenizer.pad_token_id)
      queues[length] = []


def pad_examples(examples, length: int, pad_id: int):
  """Right-padded (ids [N, length], weights [N, length], mask [N, length]), plus
  span_mask [N, length] when the examples carry one."""
  ids = np.full((len(examples), length), pad_id, np.int32)
  weights = np.zeros((len(examples), length), np.float32)
  spans = np.zeros((len(examples), length), bool)
  for i, (x, w, *span) in enumerate(examples):
    ids[i, :len(x)], weights[i, :len(w)] = x, w
    if span:
      spans[i, :len(x)] = span[0]
  mask = np.arange(length)[None] < np.asarray([len(e[0]) for e in examples])[:, None]
  if len(examples[0]) == 3:
    return ids, weights, mask, spans
  return ids, weights, mask


def eval_sentences(n: int, seed: int) -> list[list[str]]:
  """``n`` held-out sentences (never seen in training), fixed by ``seed``."""
  rng = np.random.default_rng([seed, 1])
  return [sample_sentence(rng, held_out=True) for _ in range(n)]
