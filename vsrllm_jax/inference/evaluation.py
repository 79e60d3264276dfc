"""Decoding a split with a predictor: transcripts per clip, their rates, the decode file."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from vsrllm_jax import sharding
from vsrllm_jax.data.batch import model_inputs
from vsrllm_jax.inference import scoring


def _eos_set(eos_id: int | Sequence[int]) -> set[int]:
  return {int(eos_id)} if np.ndim(eos_id) == 0 else {int(i) for i in eos_id}


def tokens_to_text(tokenizer, tokens: np.ndarray, eos_id: int | Sequence[int]) -> list[str]:
  """Cuts each row at its first EOS (any of ``eos_id``) and detokenises (specials dropped)."""
  eos = _eos_set(eos_id)
  texts = []
  for row in np.asarray(tokens):
    row = row.tolist()
    end = next((i for i, token in enumerate(row) if token in eos), len(row))
    texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
  return texts


def decode_split(predict: Callable, params, model_state, batches: Iterable[dict], mesh,
                 tokenizer, *, eos_id: int | Sequence[int]) -> list[dict[str, Any]]:
  """Runs ``predict`` over host batches; returns [{id, reference, hypothesis}] (real rows)."""
  rows = []
  for batch in batches:
    tokens = predict(params, model_state, sharding.global_batch(model_inputs(batch), mesh))
    tokens = np.asarray(jax.device_get(tokens))
    hyps = tokens_to_text(tokenizer, tokens, eos_id)
    keep = np.asarray(batch.get("example_mask", np.ones(len(hyps), bool)), bool)
    for i in np.flatnonzero(keep):
      row = dict(id=str(batch["id"][i]), reference=str(batch["text"][i]), hypothesis=hyps[i])
      if "task" in batch and str(batch["task"][i]):
        row["task"] = str(batch["task"][i])
      rows.append(row)
  return rows


def evaluate(predict: Callable, params, model_state, batches: Iterable[dict], mesh, tokenizer,
             *, eos_id: int | Sequence[int]) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """(``{'wer', 'wer_plain', 'cer', 'bleu', 'num_examples'}``, per-example rows) for one split.

  ``eos_id`` may list several ids (``tokenizer.special_tokens(...).eos_ids``):
  each hypothesis ends at the first of any. Rows that carry a task (LRS3
  manifests: ``vsr``, ``vst_es``, ...) also get per-task figures, e.g.
  ``vsr/wer`` and ``vst_es/bleu``, when the split mixes tasks or translates.
  """
  rows = decode_split(predict, params, model_state, batches, mesh, tokenizer, eos_id=eos_id)
  return scoring.summarize_rows(rows), rows


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
