"""Runs Python code in a subprocess where TensorFlow is truly absent.

Blocking ``import tensorflow`` is not enough: tfds and etils probe
``importlib.util.find_spec('tensorflow')``. So we build a site dir of symlinks
to every entry of this interpreter's site-packages except TF and friends, and
start ``python -S`` on it.
"""
from __future__ import annotations

import os
import pathlib
import site
import subprocess
import sys
import tempfile
import textwrap

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_EXCLUDED_PREFIXES = ("tensorflow", "tf_keras", "keras", "tensorboard")
# tensorflow_datasets / tensorflow_metadata are pure Python and TF-free; keep them.
_KEPT = ("tensorflow_datasets", "tensorflow_metadata")


def _excluded(name: str) -> bool:
  lower = name.lower()
  if lower.startswith(_KEPT):
    return False
  return lower.startswith(_EXCLUDED_PREFIXES)


def _site_packages() -> list[pathlib.Path]:
  return [pathlib.Path(p) for p in site.getsitepackages() if pathlib.Path(p).is_dir()]


def build_site_dir(target: pathlib.Path) -> pathlib.Path:
  """Fills ``target`` with symlinks to site-packages entries, TF excluded."""
  target.mkdir(parents=True, exist_ok=True)
  for sp in _site_packages():
    for entry in sp.iterdir():
      link = target / entry.name
      if _excluded(entry.name) or link.exists():
        continue
      link.symlink_to(entry)
  return target


def run_without_tensorflow(code: str, cwd, timeout: float = 600,
                           env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs ``code`` in ``python -S`` with TF unimportable; asserts TF stayed out.

  Returns the CompletedProcess (text mode, stdout/stderr captured); the
  caller checks ``returncode``.
  """
  with tempfile.TemporaryDirectory(prefix="no_tf_site_") as tmp:
    site_dir = build_site_dir(pathlib.Path(tmp) / "site-packages")
    bootstrap = textwrap.dedent(f"""\
        import site, sys
        site.addsitedir({str(site_dir)!r})
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import importlib.util
        assert importlib.util.find_spec('tensorflow') is None, 'tensorflow is importable'
        """)
    epilogue = "\nassert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    script = bootstrap + "\n" + textwrap.dedent(code) + epilogue
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-S", "-c", script], cwd=str(cwd), env=full_env,
                          capture_output=True, text=True, timeout=timeout)
