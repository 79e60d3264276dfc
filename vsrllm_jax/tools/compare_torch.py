r"""Transcribes a split with a run's JAX checkpoint and with its PyTorch export; compares.

  python -m vsrllm_jax.convert --workdir=RUN --output=EXPORT
  python -m vsrllm_jax.tools.compare_torch --workdir=RUN --export=EXPORT [--split=test]

Greedy (or ``--strategy=beam``) on both sides, the run's decode settings otherwise. The JAX
side is the decode command (best checkpoint); the PyTorch side is ``torch_port.VsrLlm``
reading raw video through the exported encoder, with the batches' cluster counts
(``data.use_cluster_counts``) as the JAX side gets them. Prints the fraction of
identical transcripts and each side's WER/CER, and writes
EXPORT/compare_<split>_<strategy>.jsonl with both hypotheses per clip.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from vsrllm_jax import decode
from vsrllm_jax.data import pipeline
from vsrllm_jax.inference import evaluation, generation, scoring
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.run import workdir as workdir_lib


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The training run's workdir (the JAX side: its best "
                      "checkpoint).", required=True, **fv)
  flags.DEFINE_string("export", None, "Its export, written by vsrllm_jax.convert (the "
                      "PyTorch side); compare_<split>_<strategy>.jsonl is written into it.",
                      required=True, **fv)
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to transcribe.",
                    **fv)
  flags.DEFINE_enum("strategy", "greedy", ["greedy", "beam"], "Decoding (beam: the run's "
                    "decode.beam_size, length_penalty, early_stopping).", **fv)


def torch_rows(workdir: str, export: str, split: str, strategy: str = "greedy") -> list[dict]:
  """{'id', 'reference', 'hypothesis'} per clip from the PyTorch export."""
  import torch  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.torch_port.model import VsrLlm  # pylint: disable=g-import-not-at-top
  model, tok, meta = VsrLlm.from_export(export)
  config, _ = setup_lib.resolve_config(workdir_lib.load_config(workdir))
  eos = meta["tokenizer"]["eos_ids"]
  options = generation.options_from_config(config.decode)   # with defaults for older runs
  rows = []
  for batch in pipeline.eval_batches(config.data, tok, split,
                                     global_batch_size=config.eval_batch_size,
                                     source=pipeline.data_source(config.data, split)):
    real = np.flatnonzero(np.asarray(batch["example_mask"]))
    tasks = [str(t) if not config.data.instruction else "" for t in batch["task"]]
    for task in sorted({tasks[i] for i in real}):
      index = [i for i in real if tasks[i] == task]
      counts = (torch.from_numpy(np.asarray(batch["cluster_counts"])[index])
                if "cluster_counts" in batch else None)
      tokens = model.generate(torch.from_numpy(np.asarray(batch["video"])[index]),
                              torch.from_numpy(np.asarray(batch["video_mask"])[index]),
                              task=task, cluster_counts=counts,
                              max_new_tokens=options["max_new_tokens"],
                              strategy=strategy, beam_size=options["beam_size"],
                              length_penalty=options["length_penalty"],
                              early_stopping=options["early_stopping"])
      texts = evaluation.tokens_to_text(tok, tokens.numpy(), eos)
      rows += [dict(id=str(batch["id"][i]), reference=str(batch["text"][i]), hypothesis=t)
               for i, t in zip(index, texts)]
  return rows


def compare(workdir: str, export: str, split: str = "test", strategy: str = "greedy") -> dict:
  """Decodes with both sides; returns the fraction identical and both sides' rates."""
  result = decode.decode(workdir, split, strategy=strategy)
  with open(result["path"]) as f:
    jax_rows = {r["id"]: r for r in map(json.loads, f)}
  rows = torch_rows(workdir, export, split, strategy)
  if sorted(r["id"] for r in rows) != sorted(jax_rows):
    raise ValueError(f"the two sides decoded different clips of {split!r}")
  same = [r["hypothesis"] == jax_rows[r["id"]]["hypothesis"] for r in rows]
  refs = [r["reference"] for r in rows]
  out = {"clips": len(rows), "identical": float(np.mean(same)),
         "jax": scoring.error_rates(refs, [jax_rows[r["id"]]["hypothesis"] for r in rows]),
         "torch": scoring.error_rates(refs, [r["hypothesis"] for r in rows])}
  with open(os.path.join(export, f"compare_{split}_{strategy}.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(dict(r, jax_hypothesis=jax_rows[r["id"]]["hypothesis"])) + "\n")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(compare(flags.FLAGS.workdir, flags.FLAGS.export, flags.FLAGS.split,
                           flags.FLAGS.strategy)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
