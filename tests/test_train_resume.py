"""The train command end to end: exact resume after SIGKILL, and SIGTERM checkpoints.

One uninterrupted run (A) is compared with a run (B) that is SIGKILLed after
its step-4 checkpoint, restarted and SIGTERMed, then restarted to the end:
B must end with bitwise-equal parameters and the same per-step losses.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import workdir_files
from vsrllm_jax.run import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _command(workdir):
  return [sys.executable, "-m", "vsrllm_jax.train", "--config=tests/helpers/tiny_run_config.py",
          f"--config.total_steps={STEPS}", f"--workdir={workdir}"]


def _env(data_dir):
  env = dict(os.environ, VSRLLM_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = ""   # one CPU device, as a user would run it
  return env


def _run(workdir, data_dir):
  proc = subprocess.run(_command(workdir), cwd=REPO, env=_env(data_dir), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _start_and_signal(workdir, data_dir, wait_for_step, sig):
  """Starts a run, waits until checkpoint ``wait_for_step`` exists, sends ``sig``."""
  proc = subprocess.Popen(_command(workdir), cwd=REPO, env=_env(data_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  target = os.path.join(workdir, checkpoint.LATEST_DIR, str(wait_for_step))
  deadline = time.time() + 900
  while not os.path.exists(target):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError("run ended before checkpoint %d:\n%s" % (wait_for_step,
                                                                    proc.communicate()[1][-3000:]))
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  return proc.returncode, err


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in sorted(tree.items()):
      yield from _leaves(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  a = str(tmp_path_factory.mktemp("run_a"))
  b = str(tmp_path_factory.mktemp("run_b"))
  _run(a, data_dir)
  code, err = _start_and_signal(b, data_dir, 4, signal.SIGKILL)
  assert code == -signal.SIGKILL, err[-2000:]
  killed_at = checkpoint.Checkpoints(b, keep=3).latest_step()
  code, err = _start_and_signal(b, data_dir, 8, signal.SIGTERM)
  sigterm = dict(code=code, err=err, latest=checkpoint.Checkpoints(b, keep=3).latest_step())
  _run(b, data_dir)
  return a, b, killed_at, sigterm, data_dir


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
  _, _, _, sigterm, _ = runs
  assert sigterm["code"] == 0, sigterm["err"][-2000:]
  assert "after SIGTERM" in sigterm["err"]
  assert sigterm["latest"] is not None and sigterm["latest"] >= 8


def test_resume_after_sigkill_is_bitwise_exact(runs):
  a, b, killed_at, _, _ = runs
  assert killed_at is not None and 4 <= killed_at < STEPS
  pa, pb = dict(_leaves(workdir_files.saved_state(a, STEPS)["params"])), dict(_leaves(workdir_files.saved_state(b, STEPS)["params"]))
  assert pa.keys() == pb.keys()
  for k in pa:
    assert np.array_equal(pa[k], pb[k]), f"{k} differs after resume"
  la, lb = workdir_files.scalars(a, "train/loss"), workdir_files.scalars(b, "train/loss")
  assert sorted(la) == list(range(1, STEPS + 1)) and sorted(lb) == sorted(la)
  assert all(la[s] == lb[s] for s in la), (la, lb)


def test_run_writes_config_metrics_and_test_scores(runs):
  a, _, _, _, _ = runs
  with open(os.path.join(a, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["llm"]["vocab_size"] > 0 and cfg["data"]["data_dir"]
  with open(os.path.join(a, "run_info.json")) as f:
    info = json.load(f)
  assert {"git_commit", "versions", "devices"} <= set(info)
  records = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl"))]
  keys = set().union(*records)
  assert {"train/loss", "train/lm", "val/wer", "val/cer", "test/wer", "test/cer"} <= keys
  assert os.path.exists(os.path.join(a, "decode", "test.jsonl"))
  assert os.listdir(os.path.join(a, checkpoint.BEST_DIR))


def test_decode_reproduces_the_test_wer_of_training(runs):
  a, _, _, _, data_dir = runs
  proc = subprocess.run([sys.executable, "-m", "vsrllm_jax.decode", f"--workdir={a}"], cwd=REPO,
                        env=_env(data_dir), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  decoded = json.loads(proc.stdout[proc.stdout.index("{"):])
  final = [json.loads(l) for l in open(os.path.join(a, "metrics.jsonl")) if "test/wer" in l][-1]
  assert decoded["wer"] == final["test/wer"] and decoded["cer"] == final["test/cer"]
  rows = [json.loads(l) for l in open(os.path.join(a, "decode", "test.jsonl"))]
  assert rows and set(rows[0]) == {"id", "reference", "hypothesis"}
