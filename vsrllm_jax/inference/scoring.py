"""Scoring transcripts: the LRS3 text normaliser, WER / CER with jiwer, BLEU with sacrebleu.

WER and CER follow the LRS3 scoring conventions: hypotheses and references
go through the same normaliser (``normalize_text``) and the rates are
corpus-level, total edits over total reference words (characters), not a
mean of per-sentence rates. ``wer_plain`` is VSP-LLM's WER (no normaliser), so
our figures can be read against theirs. BLEU follows sacreBLEU's (``bleu``) and
is reported next to them for translation tasks; it is cheap, so
``summarize_rows`` always adds it. Metrics that mean something on one data set
only (GRID slot accuracy) come from ``dataset_metrics``.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any

import jiwer
import numpy as np

# Typographic apostrophes that mean the ASCII one (don’t, ʼ).
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
# An apostrophe not between two letters/digits (``_`` is gone by then): a quote mark.
_EDGE_APOSTROPHE = re.compile(r"(?<!\w)'|'(?!\w)")
BLEU_TOKENIZE = "13a"  # sacreBLEU's default (mteval-v13a), as its command line uses


def normalize_text(text: str) -> str:
  """The LRS3 scoring normaliser, applied to references and hypotheses alike.

  1. Unicode NFKC; typographic apostrophes (’ ‘ ʼ) become ``'``.
  2. Lowercase (LRS3 transcripts are upper case, LLM output mixed case).
  3. Every punctuation or symbol character (Unicode categories P*, S*) becomes
     a space, except apostrophes inside a word (``don't``, ``o'clock``), which
     LRS3 words carry; quote-like edge apostrophes go (``'cause`` ->
     ``cause``). Hyphens therefore split words (``well-known`` -> ``well known``).
  4. Whitespace collapsed to single spaces, ends stripped.
  Digits are kept as they are (LRS3 spells numbers out; no number expansion).
  GRID sentences of the synthetic data are already in this form.
  """
  text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
  text = "".join(" " if ch != "'" and unicodedata.category(ch)[0] in "PS" else ch
                 for ch in text)
  text = _EDGE_APOSTROPHE.sub(" ", text)
  return " ".join(text.split())


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
  """Corpus WER and CER after ``normalize_text``: total edits / total reference length.

  An empty hypothesis counts as deletions; an empty reference adds its
  hypothesis as insertions. CER counts the spaces between words as characters
  (jiwer's convention). NaN for an empty corpus or one without reference text.
  """
  _check_lengths(references, hypotheses)
  refs = [normalize_text(r) for r in references]
  hyps = [normalize_text(h) for h in hypotheses]
  return {"wer": _corpus_rate(jiwer.process_words, refs, hyps, str.split),
          "cer": _corpus_rate(jiwer.process_characters, refs, hyps, list)}


def plain_wer(references: list[str], hypotheses: list[str]) -> float:
  """Corpus WER as VSP-LLM computes it, to set our figures next to its published ones.

  Reproduces ``src/vsp_llm_decode.py`` of github.com/Sally-SH/VSP-LLM (commit
  91c4f3d, lines 227-233): ``hypo.strip().split()`` and ``ref.strip().split()``,
  ``editdistance.eval`` of the two word lists (substitutions + deletions +
  insertions, unit costs) summed over the set, over the summed number of
  reference words. No lowercasing and no punctuation handling there (its
  references, LRS3 ``.wrd`` lines, are lower case without punctuation), so
  ``Hello,`` against ``hello`` is an error. Its references are the ``.wrd``
  text after a tokenizer round trip, ours the text itself. A fraction here, not
  its percent; NaN without reference words (where it divides by zero).
  """
  _check_lengths(references, hypotheses)
  refs = [" ".join(r.split()) for r in references]   # jiwer splits on single spaces
  hyps = [" ".join(h.split()) for h in hypotheses]
  return _corpus_rate(jiwer.process_words, refs, hyps, str.split)


def _corpus_rate(process, refs: list[str], hyps: list[str], units) -> float:
  """Total edits (jiwer's minimal S + D + I) / total reference units; NaN for none."""
  length = sum(len(units(r)) for r in refs)
  if not length:
    return float("nan")
  out = process(refs, hyps)
  return float(out.substitutions + out.deletions + out.insertions) / length


def _check_lengths(references, hypotheses) -> None:
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


def bleu(references: list[str], hypotheses: list[str], *, tokenize: str = BLEU_TOKENIZE) -> float:
  """Corpus BLEU (0-100) of one reference per hypothesis, as ``sacrebleu REF -i HYP``.

  sacreBLEU's conventions, not the WER normaliser: detokenised text as
  decoded, its own ``13a`` tokenisation, case-sensitive, 'exp' smoothing,
  up to 4-grams (all its defaults). NaN for an empty corpus.
  """
  import sacrebleu  # pylint: disable=g-import-not-at-top

  _check_lengths(references, hypotheses)
  if not references:
    return float("nan")
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)],
                                     tokenize=tokenize).score)


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, float]:
  """Rates over all rows, plus ``{task}/{rate}`` when the rows mix tasks or translate."""
  rates = _rates(rows)
  tasks = sorted({r["task"] for r in rows if "task" in r})
  if len(tasks) > 1 or any(t != "vsr" for t in tasks):
    for task in tasks:
      for name, value in _rates([r for r in rows if r.get("task") == task]).items():
        rates[f"{task}/{name}"] = value
  return rates


def _rates(rows: list[dict[str, Any]]) -> dict[str, float]:
  refs, hyps = [r["reference"] for r in rows], [r["hypothesis"] for r in rows]
  rates = error_rates(refs, hyps)
  rates["wer_plain"] = plain_wer(refs, hyps)
  rates["bleu"] = bleu(refs, hyps)
  rates["num_examples"] = len(rows)
  return rates


# The data sets (config.data.name) whose sentences are GRID's fixed slots.
GRID_DATA_SETS = ("synthetic_lips",)


def dataset_metrics(config, rows: list[dict[str, Any]]) -> dict[str, float]:
  """The metrics that mean something only on the run's data set, decided here once.

  GRID slot accuracies (``slot_accuracy/{slot}``) for the synthetic GRID set
  only: LRS3 (or LRS3-layout) sentences have no fixed slots. Decided by
  ``config.data.name``, the data set's kind, never by the text.
  """
  if config.data.name in GRID_DATA_SETS:
    return {f"slot_accuracy/{k}": v for k, v in slot_accuracy(rows).items()}
  return {}


def slot_accuracy(rows: list[dict[str, Any]], slot_names=None) -> dict[str, float]:
  """Per reference word position (GRID slot), the fraction aligned as correct.

  Uses jiwer's word alignment of each (normalised) reference and hypothesis,
  so an inserted or deleted word does not shift the slots after it.
  """
  if slot_names is None:
    from vsrllm_jax.data.synthetic import grid_grammar  # pylint: disable=g-import-not-at-top
    slot_names = grid_grammar.SLOT_NAMES
  hits = np.zeros(len(slot_names))
  totals = np.zeros(len(slot_names))
  for row in rows:
    ref, hyp = normalize_text(row["reference"]), normalize_text(row["hypothesis"])
    if not ref:
      continue
    correct = np.zeros(len(ref.split()), bool)
    if hyp:
      for chunk in jiwer.process_words(ref, hyp).alignments[0]:
        if chunk.type == "equal":
          correct[chunk.ref_start_idx:chunk.ref_end_idx] = True
    n = min(len(correct), len(slot_names))
    hits[:n] += correct[:n]
    totals[:n] += 1
  return {name: float(hits[i] / totals[i]) for i, name in enumerate(slot_names) if totals[i]}
