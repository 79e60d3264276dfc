"""A fresh virtual environment holding exactly the package's default install.

The distributions come from this interpreter's site-packages (no downloads):
the closure of ``pyproject.toml``'s ``[project] dependencies``, followed
through each installed distribution's own requirements, with markers and
extras evaluated as pip would. Nothing outside that closure (TensorFlow,
torch, pytest, the checkout) is importable there.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def declared(*extras: str, root: pathlib.Path = REPO_ROOT) -> list[Requirement]:
  """What ``pip install root[extras]`` asks for, as pyproject.toml declares it: the base
  dependencies plus each extra's (an extra naming the package itself is followed)."""
  with open(pathlib.Path(root) / "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
  optional = project.get("optional-dependencies", {})
  reqs, todo, seen = [Requirement(line) for line in project["dependencies"]], list(extras), set()
  while todo:
    extra = todo.pop()
    if extra in seen:
      continue
    if extra not in optional:
      raise AssertionError(f"{root}/pyproject.toml declares no extra {extra!r}")
    seen.add(extra)
    for req in map(Requirement, optional[extra]):
      if canonicalize_name(req.name) == canonicalize_name(project["name"]):
        todo += sorted(req.extras)
      else:
        reqs.append(req)
  return reqs


def _wanted(req: Requirement, extras: set[str]) -> bool:
  if req.marker is None:
    return True
  return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
  """Every installed distribution the requirements pull in, by canonical name.

  Raises if one is not installed here, or at a version outside a range that
  asks for it: then this environment cannot stand in for the install.
  """
  found: dict[str, metadata.Distribution] = {}
  extras_of: dict[str, set[str]] = {}
  todo = [(req, set()) for req in requirements]
  while todo:
    req, parent_extras = todo.pop()
    if not _wanted(req, parent_extras):
      continue
    name = canonicalize_name(req.name)
    new_extras = set(req.extras) - extras_of.get(name, set())
    if name in found and not new_extras:
      continue
    try:
      dist = found.get(name) or metadata.distribution(name)
    except metadata.PackageNotFoundError as e:
      raise AssertionError(f"{req} is required but not installed in {sys.prefix}") from e
    if not req.specifier.contains(dist.version, prereleases=True):
      raise AssertionError(f"{req} is required but {dist.version} is installed in {sys.prefix}")
    found[name] = dist
    extras_of[name] = extras_of.get(name, set()) | set(req.extras)
    todo += [(Requirement(r), extras_of[name]) for r in dist.requires or ()]
  return found


def check_pins(dists: dict[str, metadata.Distribution], constraints: pathlib.Path) -> int:
  """Asserts every distribution that ``constraints`` (a requirements file of ``name==version``
  lines) pins is at its pin; returns how many it pins."""
  lines = (l.split("#", 1)[0].strip() for l in open(constraints))
  pins = {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}
  for name, dist in dists.items():
    if name in pins and not pins[name].specifier.contains(dist.version, prereleases=True):
      raise AssertionError(f"{constraints}: {pins[name]}, but {dist.version} is installed")
  return sum(name in pins for name in dists)


def _top_level_entries(dist: metadata.Distribution) -> set[pathlib.Path]:
  """The site-packages entries (packages, modules, .libs, dist-info) a distribution owns."""
  root = pathlib.Path(dist.locate_file(""))
  entries = {root / pathlib.PurePath(f).parts[0] for f in dist.files or ()
             if not str(f).startswith("..")}
  return {e for e in entries if e.exists() and not e.name.endswith(".pth")}


def create(target: pathlib.Path, requirements: list[Requirement]) -> pathlib.Path:
  """A venv at ``target`` (no system site-packages, no pip) with the closure linked in;
  returns its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
  python = target / "bin" / "python"
  site_dir = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())
  for dist in closure(requirements).values():
    for entry in _top_level_entries(dist):
      link = site_dir / entry.name
      if not link.exists():
        link.symlink_to(entry)
  return python


def build_wheel(out_dir: pathlib.Path) -> pathlib.Path:
  """The package's wheel, built from a copy of the checkout (no build files left in it)."""
  src = out_dir / "src"
  shutil.copytree(REPO_ROOT / "vsrllm_jax", src / "vsrllm_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO_ROOT / name, src / name)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                  "--no-build-isolation", "--no-index", "-w", str(out_dir), str(src)],
                 check=True, capture_output=True, text=True,
                 env=dict(os.environ, PIP_NO_INPUT="1"))
  (wheel,) = out_dir.glob("vsrllm_jax-*.whl")
  return wheel


def install_wheel(python: pathlib.Path, wheel: pathlib.Path) -> None:
  """``pip install --no-deps`` of the wheel into the venv of ``python`` (pip from here)."""
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                  "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                 text=True)
