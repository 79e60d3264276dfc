r"""Mean ± standard deviation of the final test metrics of several runs (seeds).

  python -m vsrllm_jax.tools.summarize_runs /tmp/abl/default_s{0,1,2} -- /tmp/abl/randllm_s{0,1,2}

Each group of workdirs (groups are separated by ``--``) becomes one Markdown
table row: test WER, CER and per-slot word accuracy as mean ± sample standard
deviation (ddof=1) over the runs, read from the last ``test/wer`` record of
each run's ``metrics.jsonl``. With two groups it also prints how many
standard deviations separate their mean WERs (the larger of the two stds).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

SLOTS = ("command", "colour", "preposition", "letter", "digit", "adverb")
COLUMNS = ("test/wer", "test/cer") + tuple(f"test/slot_accuracy/{s}" for s in SLOTS)


def final_test_metrics(workdir: str) -> dict[str, float]:
  """The last record of ``workdir/metrics.jsonl`` that holds ``test/wer``."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: expected a finished training run's workdir")
  with open(path) as f:
    records = [json.loads(line) for line in f if '"test/wer"' in line]
  if not records:
    raise ValueError(f"{path} has no test/wer record: the run has not finished")
  return records[-1]


def summarize(workdirs: list[str]) -> dict[str, tuple[float, float, int]]:
  """column -> (mean, sample std, number of runs)."""
  rows = [final_test_metrics(w) for w in workdirs]
  out = {}
  for col in COLUMNS:
    values = np.array([r[col] for r in rows if col in r], np.float64)
    if len(values):
      std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
      out[col] = (float(values.mean()), std, len(values))
  return out


def markdown_row(name: str, summary) -> str:
  cells = [f"{summary[c][0]:.3f} ± {summary[c][1]:.3f}" if c in summary else "-" for c in COLUMNS]
  return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
  groups, current = [], []
  for arg in argv:
    if arg == "--":
      groups.append(current)
      current = []
    else:
      current.append(arg)
  groups.append(current)
  if not all(groups):
    raise SystemExit("usage: summarize_runs DIR [DIR ...] [-- DIR [DIR ...]]")
  print("| runs | " + " | ".join(c.replace("test/", "").replace("slot_accuracy/", "")
                                  for c in COLUMNS) + " |")
  print("|---" * (len(COLUMNS) + 1) + "|")
  summaries = [summarize(g) for g in groups]
  for group, summary in zip(groups, summaries):
    print(markdown_row(f"{os.path.basename(group[0].rstrip('/'))} ... (n={len(group)})", summary))
  if len(summaries) == 2:
    (m0, s0, _), (m1, s1, _) = summaries[0]["test/wer"], summaries[1]["test/wer"]
    print(f"WER difference: {abs(m1 - m0):.3f} = {abs(m1 - m0) / max(s0, s1):.1f} x the larger std")


if __name__ == "__main__":
  main(sys.argv[1:])
