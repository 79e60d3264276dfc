"""The seed-table tool: mean ± sample std of the final test metrics."""
import json

import numpy as np
import pytest

from vsrllm_jax.tools import summarize_runs


def _run(path, wer, letter):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 10, "val/wer": 0.9}) + "\n")
    f.write(json.dumps({"step": 10, "test/wer": wer + 1, "test/cer": 0.5}) + "\n")  # superseded
    f.write(json.dumps({"step": 20, "test/wer": wer, "test/cer": wer / 2,
                        "test/slot_accuracy/letter": letter}) + "\n")
  return str(path)


def test_mean_and_sample_std_of_the_last_test_record(tmp_path, capsys):
  runs = [_run(tmp_path / f"s{i}", w, l) for i, (w, l) in enumerate([(0.1, 0.5), (0.2, 0.7),
                                                                       (0.3, 0.6)])]
  s = summarize_runs.summarize(runs)
  np.testing.assert_allclose(s["test/wer"][:2], (0.2, 0.1))
  np.testing.assert_allclose(s["test/slot_accuracy/letter"][:2], (0.6, 0.1))
  assert "test/slot_accuracy/digit" not in s
  summarize_runs.main(runs[:2] + ["--", runs[2], runs[0]])
  out = capsys.readouterr().out
  assert "| 0.150 ± 0.071 |" in out and "WER difference: 0.050" in out


def test_unfinished_run_is_named(tmp_path):
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"val/wer": 1.0}) + "\n")
  with pytest.raises(ValueError, match="r/metrics.jsonl has no test/wer"):
    summarize_runs.summarize([str(tmp_path / "r")])
