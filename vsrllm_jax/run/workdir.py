"""What a run leaves in its workdir besides checkpoints and metrics.

``config.json``   the resolved config (decode/transcribe/convert read it back)
``run_info.json`` git commit, package versions, devices, command line
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import jax
import ml_collections

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
             "transformers", "numpy", "ml_collections", "clu")


def _git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _versions() -> dict[str, str]:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_run_info(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json and run_info.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  _atomic_write(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2) + "\n")
  info = dict(git_commit=_git_commit(), python=sys.version.split()[0], versions=_versions(),
              devices=[str(d) for d in jax.devices()], process_count=jax.process_count(),
              argv=sys.argv)
  _atomic_write(os.path.join(workdir, RUN_INFO_FILE), json.dumps(info, indent=2) + "\n")


def to_tuples(x):
  if isinstance(x, list):
    return tuple(to_tuples(v) for v in x)
  if isinstance(x, dict):
    return {k: to_tuples(v) for k, v in x.items()}
  return x


def load_config(workdir: str, override: ml_collections.ConfigDict | None = None):
  """The run's resolved config; ``override`` (e.g. from --config) wins when given."""
  if override is not None:
    return override
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is --workdir a training run's workdir? "
                            "(or pass --config)")
  with open(path) as f:
    return ml_collections.ConfigDict(to_tuples(json.load(f)))
