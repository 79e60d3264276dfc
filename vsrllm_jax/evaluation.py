"""Greedy decoding over a split, and WER / CER with jiwer.

Hypotheses and references go through the same normaliser (lowercase,
punctuation stripped, whitespace collapsed, as in LRS3 scoring) before
scoring. WER and CER are corpus-level: total edits over total reference words
(characters).
"""
from __future__ import annotations

import json
import os
import re
import string
from typing import Any, Callable, Iterable

import jax
import jiwer
import numpy as np

from vsrllm_jax import sharding
from vsrllm_jax.train_step import model_inputs

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
  """Lowercase, strip punctuation (apostrophes kept), collapse whitespace."""
  text = _PUNCT.sub(lambda m: m.group(0) if m.group(0) == "'" else " ", text.lower())
  return " ".join(text.split())


def tokens_to_text(tokenizer, tokens: np.ndarray, eos_id: int) -> list[str]:
  """Cuts each row at its first EOS and detokenises (special tokens dropped)."""
  texts = []
  for row in np.asarray(tokens):
    row = row.tolist()
    if eos_id in row:
      row = row[:row.index(eos_id)]
    texts.append(tokenizer.decode(row, skip_special_tokens=True))
  return texts


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
  """Corpus WER and CER after normalisation. An empty hypothesis counts as deletions."""
  refs = [normalize_text(r) for r in references]
  hyps = [normalize_text(h) for h in hypotheses]
  if not refs:
    return {"wer": float("nan"), "cer": float("nan")}
  return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def decode_split(predict: Callable, params, model_state, batches: Iterable[dict], mesh,
                 tokenizer, *, eos_id: int) -> list[dict[str, Any]]:
  """Runs ``predict`` over host batches; returns [{id, reference, hypothesis}] (real rows)."""
  rows = []
  for batch in batches:
    tokens = predict(params, model_state, sharding.global_batch(model_inputs(batch), mesh))
    tokens = np.asarray(jax.device_get(tokens))
    hyps = tokens_to_text(tokenizer, tokens, eos_id)
    keep = np.asarray(batch.get("example_mask", np.ones(len(hyps), bool)), bool)
    for i in np.flatnonzero(keep):
      rows.append(dict(id=str(batch["id"][i]), reference=str(batch["text"][i]),
                       hypothesis=hyps[i]))
  return rows


def evaluate(predict: Callable, params, model_state, batches: Iterable[dict], mesh, tokenizer,
             *, eos_id: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(``{'wer', 'cer', 'num_examples'}``, per-example rows) for one split."""
  rows = decode_split(predict, params, model_state, batches, mesh, tokenizer, eos_id=eos_id)
  rates = error_rates([r["reference"] for r in rows], [r["hypothesis"] for r in rows])
  rates["num_examples"] = len(rows)
  return rates, rows


def slot_accuracy(rows: list[dict[str, Any]], slot_names=None) -> dict[str, float]:
  """Per reference word position (GRID slot), the fraction aligned as correct.

  Uses jiwer's word alignment of each (normalised) reference and hypothesis,
  so an inserted or deleted word does not shift the slots after it.
  """
  if slot_names is None:
    from vsrllm_jax.data import grid_grammar  # pylint: disable=g-import-not-at-top
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


def write_decodes(workdir: str, split: str, rows: list[dict[str, Any]]) -> str:
  """Writes ``workdir/decode/<split>.jsonl`` atomically (process 0); returns the path."""
  path = os.path.join(workdir, "decode", f"{split}.jsonl")
  if jax.process_index() != 0:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(path + ".tmp", path)
  return path
