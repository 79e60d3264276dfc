"""Greedy decoding over a split, and WER / CER with jiwer.

Hypotheses and references go through the same normaliser (lowercase,
punctuation stripped, whitespace collapsed, as in LRS3 scoring) before
scoring. WER and CER are corpus-level: total edits over total reference words
(characters).
"""
from __future__ import annotations

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
