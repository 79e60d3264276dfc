"""Metrics per data set (inference/scoring.py): VSP-LLM's plain WER next to ours, and
GRID slot accuracy only on the synthetic GRID set."""
from __future__ import annotations

import math
import random

import pytest

from tests.helpers.numerics import assert_close
from vsrllm_jax.configs import common
from vsrllm_jax.configs import image_caption as image_caption_config
from vsrllm_jax.configs import lrs3 as lrs3_config
from vsrllm_jax.inference import scoring

# Normalised, these are 'the cat sat' | 'on the mat' | 'hello world' | "don't stop".
REFS = ["The cat, sat.", "on the mat", "Hello world!", "don't stop"]
HYPS = ["the cat sat down", "", "hello word", "Don\u2019t stop now please"]


def test_plain_wer_compares_words_as_written_hand_computed():
  # Word lists as split: 'The' 'cat,' 'sat.' all differ from 'the' 'cat' 'sat' (3 S) + 'down'
  # (1 I); 3 D; 'Hello' 'world!' vs 'hello' 'word' (2 S); 'don't' vs 'Don’t' (1 S) + 2 I.
  assert_close(scoring.plain_wer(REFS, HYPS), 12 / 10)
  assert_close(scoring.error_rates(REFS, HYPS)["wer"], 7 / 10)   # the normalised WER
  # Any whitespace splits, as str.split() does; an exact match scores 0.
  assert scoring.plain_wer(["  a\tb \n", "c"], ["a b", "c"]) == 0.0
  assert_close(scoring.plain_wer(["a b", ""], ["a b", "x y"]), 2 / 2)   # insertions count


def test_plain_wer_is_word_list_edit_distance_summed_over_the_set():
  def edit_distance(a, b):   # Levenshtein over tokens, as editdistance.eval
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
      prev, row[0] = row[0], i
      for j, y in enumerate(b, 1):
        prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]

  rng = random.Random(0)
  words = ["a", "A", "a.", "b", "c,", "don't"]
  refs = [" ".join(rng.choices(words, k=rng.randint(0, 6))) for _ in range(30)]
  hyps = [" ".join(rng.choices(words, k=rng.randint(0, 6))) for _ in range(30)]
  errors = sum(edit_distance(h.split(), r.split()) for r, h in zip(refs, hyps))
  assert_close(scoring.plain_wer(refs, hyps), errors / sum(len(r.split()) for r in refs))


def test_plain_wer_edge_cases():
  assert math.isnan(scoring.plain_wer([], []))
  assert math.isnan(scoring.plain_wer(["  "], ["x"]))    # no reference words
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    scoring.plain_wer(["a", "b"], ["a"])


def test_rates_carry_plain_wer_overall_and_per_task():
  rows = [dict(id="a", reference="the cat sat", hypothesis="The cat sat.", task="vsr"),
          dict(id="b", reference="el gato", hypothesis="el gato", task="vst_es")]
  rates = scoring.summarize_rows(rows)
  assert_close(rates["vsr/wer_plain"], 2 / 3)   # 'The', 'sat.'
  assert rates["vsr/wer"] == 0.0 and rates["vst_es/wer_plain"] == 0.0
  assert_close(rates["wer_plain"], 2 / 5)


GRID_ROWS = [dict(id="1", reference="bin blue at f two now", hypothesis="bin blue at g two now"),
             dict(id="2", reference="lay red by a one again", hypothesis="lay red by a one again")]


def test_slot_accuracy_only_for_the_synthetic_grid_set():
  grid = scoring.dataset_metrics(common.get_base_config(), GRID_ROWS)
  assert set(grid) == {f"slot_accuracy/{s}" for s in ("command", "colour", "preposition",
                                                      "letter", "digit", "adverb")}
  assert grid["slot_accuracy/letter"] == 0.5 and grid["slot_accuracy/digit"] == 1.0
  # LRS3 (also the LRS3-layout synthetic clips, GRID-like text) and captions: none, by
  # the data set's kind, whatever the text.
  for config in (lrs3_config.get_config("manifest_dir=/m"), image_caption_config.get_config()):
    assert config.data.name != "synthetic_lips"
    assert scoring.dataset_metrics(config, GRID_ROWS) == {}
