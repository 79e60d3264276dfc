"""TensorFlow stays out of the package: no module imports it (TensorBoard files
come from tensorboardX). That a whole run works where TF is not installed is
shown by tests/test_install.py, which runs the installed wheel in an environment
holding only the default install."""
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vsrllm_jax"
_TF_IMPORT = re.compile(r"^\s*(import tensorflow\b|from tensorflow\b|from clu import metric_writers"
                        r"|import clu\.metric_writers)", re.M)


def test_no_module_imports_tensorflow():
  importers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if _TF_IMPORT.search(p.read_text()))
  assert importers == [], importers
