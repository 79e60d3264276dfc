r"""Mean ± standard deviation of the final test metrics of several runs (seeds).

  python -m vsrllm_jax.tools.summarize_runs \
      --workdirs=/tmp/abl/default_s0,/tmp/abl/default_s1,/tmp/abl/default_s2 \
      --workdirs='/tmp/abl/randllm_s*'

Each ``--workdirs`` is one group of runs (a comma-separated list of workdirs;
shell-style patterns such as ``*`` are expanded here, so quote them) and becomes
one Markdown table row: test WER, CER and per-slot word accuracy as mean ±
sample standard deviation (ddof=1) over the runs, read from the last
``test/wer`` record of each run's ``metrics.jsonl``. With two groups it also
prints how many standard deviations separate their mean WERs (the larger of the
two stds). (Bash brace expansion, ``--workdirs=/tmp/a_s{0,1,2}``, makes three
flags and so three groups of one run: write the commas out or use a pattern.)
"""
from __future__ import annotations

import glob
import json
import os

from absl import app, flags
import numpy as np

SLOTS = ("command", "colour", "preposition", "letter", "digit", "adverb")
COLUMNS = ("test/wer", "test/cer") + tuple(f"test/slot_accuracy/{s}" for s in SLOTS)


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags, defined only when run as a program (see train.define_flags)."""
  flags.DEFINE_multi_string(
      "workdirs", None,
      "One group of runs (one table row): finished training workdirs, comma-separated; "
      "patterns (*, ?, [..]) are expanded. Repeat the flag for more groups; with two groups "
      "the WER difference is printed in standard deviations.",
      required=True, flag_values=flag_values)


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


def groups_of(values: list[str]) -> list[list[str]]:
  """The workdirs of each ``--workdirs`` value: comma-separated, patterns expanded (sorted)."""
  groups = []
  for value in values:
    group = []
    for item in filter(None, (v.strip() for v in value.split(","))):
      if glob.has_magic(item):
        matches = sorted(glob.glob(item))
        if not matches:
          raise FileNotFoundError(f"--workdirs: no directory matches {item!r}")
        group.extend(matches)
      else:
        group.append(item)
    if not group:
      raise ValueError(f"--workdirs={value!r} names no workdir")
    groups.append(group)
  return groups


def report(groups: list[list[str]]) -> str:
  """The Markdown table, one row per group, and with two groups their WER difference."""
  lines = ["| runs | " + " | ".join(c.replace("test/", "").replace("slot_accuracy/", "")
                                    for c in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  summaries = [summarize(g) for g in groups]
  for group, summary in zip(groups, summaries):
    lines.append(markdown_row(f"{os.path.basename(group[0].rstrip('/'))} ... (n={len(group)})",
                              summary))
  if len(summaries) == 2:
    (m0, s0, _), (m1, s1, _) = summaries[0]["test/wer"], summaries[1]["test/wer"]
    lines.append(f"WER difference: {abs(m1 - m0):.3f} = {abs(m1 - m0) / max(s0, s1):.1f} x the "
                 "larger std")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: give each group of workdirs as "
                         "--workdirs=DIR,DIR,...")
  print(report(groups_of(flags.FLAGS.workdirs)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
