"""The seed-table tool: mean ± sample std of the final test metrics."""
import json

from absl import flags
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
  out = summarize_runs.report([runs[:2], [runs[2], runs[0]]])
  assert "| 0.150 ± 0.071 |" in out and "WER difference: 0.050" in out


def test_each_workdirs_flag_is_a_group(tmp_path, capsys, monkeypatch):
  runs = [_run(tmp_path / f"s{i}", w, 0.5) for i, w in enumerate([0.1, 0.2, 0.3])]
  fv = flags.FlagValues()
  summarize_runs.define_flags(fv)
  fv([
      "summarize_runs", f"--workdirs={runs[0]},{runs[1]}", f"--workdirs={tmp_path}/s[20]"])
  assert summarize_runs.groups_of(fv.workdirs) == [runs[:2], [runs[0], runs[2]]]
  monkeypatch.setattr(summarize_runs.flags, "FLAGS", fv)
  summarize_runs.main(["summarize_runs"])
  out = capsys.readouterr().out
  assert "| s0 ... (n=2) | 0.150 ± 0.071 |" in out and "| s0 ... (n=2) | 0.200 ± 0.141 |" in out
  assert "WER difference: 0.050" in out
  with pytest.raises(FileNotFoundError, match="no directory matches"):
    summarize_runs.groups_of([f"{tmp_path}/nope_*"])
  with pytest.raises(flags.IllegalFlagValueError, match="workdirs"):
    fresh = flags.FlagValues()
    summarize_runs.define_flags(fresh)
    fresh(["summarize_runs"])
    fresh.validate_all_flags()


def test_unfinished_run_is_named(tmp_path):
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"val/wer": 1.0}) + "\n")
  with pytest.raises(ValueError, match="r/metrics.jsonl has no test/wer"):
    summarize_runs.summarize([str(tmp_path / "r")])
