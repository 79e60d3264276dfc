"""LRS3-style normaliser, corpus WER/CER and sacreBLEU BLEU (inference/scoring.py), and
decoding a split (inference/evaluation.py)."""
from __future__ import annotations

import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from vsrllm_jax.inference import evaluation, scoring
from vsrllm_jax import sharding
from vsrllm_jax.data import tokenizer as tokenizer_lib


@pytest.mark.parametrize("text,expected", [
    ("Hello, World!", "hello world"),
    ("DON'T  stop", "don't stop"),
    ("it\u2019s o'clock", "it's o'clock"),        # typographic apostrophe
    ("'quoted' words", "quoted words"),           # quote marks, not word apostrophes
    ("the students' books", "the students books"),
    ("rock 'n' roll", "rock n roll"),
    ("well-known (really) \u2014 yes; \"no\"", "well known really yes no"),
    ("a\tb\n  c ", "a b c"),
    ("cost 5$ + 3% now", "cost 5 3 now"),          # symbols go, digits stay
    ("snake_case", "snake case"),
    ("Caf\u00e9 \ufb01ne", "caf\u00e9 fine"),     # NFKC: the ligature becomes 'fi'
    ("...", ""),
    ("", ""),
    ("bin blue at f two now", "bin blue at f two now"),  # GRID text is already normal
])
def test_normalize_text(text, expected):
  assert scoring.normalize_text(text) == expected


# Normalised: 'the cat sat' | 'on the mat' | 'hello world' | "don't stop"
REFS = ["The cat, sat.", "on the mat", "Hello world!", "don't stop"]
HYPS = ["the cat sat down", "", "hello word", "Don\u2019t stop now please"]


def test_wer_cer_are_corpus_level_hand_computed():
  rates = scoring.error_rates(REFS, HYPS)
  # Word edits: 1 insertion; 3 deletions (empty hypothesis); 1 substitution; 2 insertions.
  assert rates["wer"] == pytest.approx(7 / 10)
  # Character edits (spaces count): ' down' 5; 10 deleted; 'l' deleted 1; ' now please' 11.
  assert rates["cer"] == pytest.approx(27 / 42)
  # Not the mean of per-sentence rates (which would be 0.7083).
  mean = np.mean([scoring.error_rates([r], [h])["wer"] for r, h in zip(REFS, HYPS)])
  assert mean == pytest.approx((1 / 3 + 1 + 1 / 2 + 1) / 4) and mean != pytest.approx(0.7)


def test_error_rates_edge_cases():
  assert scoring.error_rates(REFS, REFS) == {"wer": 0.0, "cer": 0.0}
  # An empty reference adds its hypothesis as insertions to the corpus totals.
  rates = scoring.error_rates(["a b", "?"], ["a b", "uh huh"])
  assert rates["wer"] == pytest.approx(2 / 2) and rates["cer"] == pytest.approx(6 / 3)
  for refs, hyps in (([], []), ([""], ["x"])):
    assert all(math.isnan(v) for v in scoring.error_rates(refs, hyps).values())
  with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
    scoring.error_rates(["a", "b"], ["a"])


BLEU_REFS = ["the cat sat on the mat", "hello there world"]
BLEU_HYPS = ["the cat sat on a mat", "hello world"]


def test_bleu_hand_computed_and_matches_sacrebleu_command_line(tmp_path):
  # Matched/total n-grams over the corpus: 1: 7/8, 2: 3/6, 3: 2/4, 4: 1/3; hyp 8 vs ref 9
  # words, so brevity penalty exp(1 - 9/8).
  expected = 100 * math.exp(1 - 9 / 8) * (7 / 8 * 3 / 6 * 2 / 4 * 1 / 3) ** 0.25
  score = scoring.bleu(BLEU_REFS, BLEU_HYPS)
  assert score == pytest.approx(expected, abs=1e-9)
  (tmp_path / "ref.txt").write_text("\n".join(BLEU_REFS) + "\n")
  (tmp_path / "hyp.txt").write_text("\n".join(BLEU_HYPS) + "\n")
  cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                        str(tmp_path / "hyp.txt"), "-b", "-w", "6"],
                       capture_output=True, text=True, check=True, timeout=120)
  assert score == pytest.approx(float(cli.stdout.strip()), abs=1e-6)


def test_bleu_identical_empty_and_mismatched():
  assert scoring.bleu(BLEU_REFS, BLEU_REFS) == pytest.approx(100.0)
  assert scoring.bleu(["a b c d"], ["w x y z"]) == 0.0
  assert math.isnan(scoring.bleu([], []))
  with pytest.raises(ValueError, match="references but"):
    scoring.bleu(["a"], [])


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
  instruction = tokenizer_lib.INSTRUCTION_TEMPLATES[0]
  return tokenizer_lib.load_tokenizer(tokenizer_lib.default_tokenizer_dir(
      tmp_path_factory.mktemp("data"), instruction))


def _ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def test_tokens_to_text_stops_at_any_eos(word_tok):
  tok = word_tok
  stop = tok.convert_tokens_to_ids("now")  # a second stop id, as <|eot_id|> for Llama 3
  rows = np.array([_ids(tok, "bin blue at") + [tok.eos_token_id, *_ids(tok, "f two")],
                   _ids(tok, "set red now again please soon"),
                   _ids(tok, "lay green by") + [tok.pad_token_id] * 3])
  assert evaluation.tokens_to_text(tok, rows, tok.eos_token_id) == [
      "bin blue at", "set red now again please soon", "lay green by"]
  assert evaluation.tokens_to_text(tok, rows, (tok.eos_token_id, stop)) == [
      "bin blue at", "set red", "lay green by"]


def test_evaluate_reports_wer_cer_bleu_over_real_rows(word_tok):
  """evaluate() decodes through ``predict``, drops filler rows and scores the corpus."""
  tok = word_tok
  mesh = sharding.make_mesh((-1, 1, 1))
  refs = ["bin blue at f two now", "place red by g nine soon", "lay white with z eight please",
          "set green in a one again"] * 2
  hyps = ["bin blue at f two now", "place red by g nine", "lay white z eight please",
          "set green in a one again now"] * 2
  width = 8
  tokens = np.full((len(hyps), width), tok.pad_token_id, np.int32)
  for i, h in enumerate(hyps):
    ids = _ids(tok, h) + [tok.eos_token_id]
    tokens[i, :len(ids)] = ids
  example_mask = np.array([True] * 6 + [False] * 2)
  batch = {"label_ids": tokens, "label_mask": tokens != tok.pad_token_id,
           "example_mask": example_mask, "id": np.array([str(i) for i in range(8)], object),
           "text": np.array(refs, object)}

  def predict(params, model_state, inputs):
    del params, model_state
    return inputs["label_ids"]  # the "decoded" tokens, sharded like a real prediction

  rates, rows = evaluation.evaluate(predict, None, None, [batch], mesh, tok,
                                    eos_id=[tok.eos_token_id])
  assert [r["hypothesis"] for r in rows] == hyps[:6]
  assert rates["num_examples"] == 6
  want = scoring.error_rates(refs[:6], hyps[:6])
  assert rates["wer"] == pytest.approx(want["wer"]) and rates["cer"] == pytest.approx(want["cer"])
  # Real rows 0-5: 1 + 1 deletions, 1 insertion, then 1 deletion again; 36 reference words.
  assert rates["wer"] == pytest.approx(4 / 36)
  assert rates["bleu"] == pytest.approx(scoring.bleu(refs[:6], hyps[:6]))
  assert 0 < rates["bleu"] < 100
  assert jax.device_count() == 8


def test_rates_per_task_when_a_split_mixes_recognition_and_translation():
  rows = [dict(id="a", reference="the cat sat", hypothesis="the cat sat", task="vsr"),
          dict(id="b", reference="a dog ran", hypothesis="a cat ran", task="vsr"),
          dict(id="c", reference="el gato negro duerme", hypothesis="el gato negro duerme",
               task="vst_es")]
  rates = scoring.summarize_rows(rows)
  assert rates["num_examples"] == 3 and rates["vsr/num_examples"] == 2
  assert rates["vsr/wer"] == pytest.approx(1 / 6)
  assert rates["vst_es/bleu"] == pytest.approx(100.0)
  assert "vsr/wer" not in scoring.summarize_rows(rows[:2])   # one task, recognition only
