"""TensorFlow stays out: only the metric-writer module imports it, and a whole
training run (data reading, model, train step, checkpoints, evaluation) works
where TF is not installed at all, as on accelerator machines."""
import json
import os
import pathlib
import re

from tests.helpers import no_tf

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vsrllm_jax"
_TF_IMPORT = re.compile(r"^\s*(import tensorflow\b|from tensorflow\b|from clu import metric_writers)",
                        re.M)


def test_only_the_metric_writer_module_imports_tensorflow():
  importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if _TF_IMPORT.search(p.read_text()))
  assert importers == ["run/metrics.py"], importers


def test_train_run_without_tensorflow(tmp_path):
  workdir = tmp_path / "run"
  code = f"""
import os, sys
os.environ["VSRLLM_DATA_DIR"] = {str(tmp_path / 'data')!r}
from tests.helpers.tiny_run_config import get_config
from vsrllm_jax.training import loop
config = get_config("steps=2")
config.eval_every = 2
config.profile_steps = (1, 1)   # the profiler hook needs no TF either
result = loop.train_and_evaluate(config, {str(workdir)!r})
print("RESULT", result)
"""
  proc = no_tf.run_without_tensorflow(code, cwd=no_tf.REPO_ROOT, timeout=600,
                                      env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  keys = set().union(*records)
  assert {"train/loss", "val/wer", "test/wer"} <= keys
  assert not (workdir / "tensorboard").exists()
  assert list((workdir / "profile").rglob("*.xplane.pb")), "no profiler trace written"
