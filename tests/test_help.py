"""Every command and tool (every module of vsrllm_jax with a ``__main__`` block, found by
reading the package's source) takes absl flags, its ``--help`` works and lists every flag
the module defines, and the commands stay importable together (flags are defined only when
a module runs as the program: ``define_flags``)."""
import importlib
import os
import pathlib
import re
import subprocess
import sys

from absl import flags
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vsrllm_jax"
_MAIN = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)
# absl definitions, as tests/test_readme.py reads them: DEFINE_string("name", ...),
# packaged.define_config_flag("name", ...).
_DEFINED = re.compile(r"""(?:DEFINE_\w+|define_config_flag)\(\s*f?["'](\w+)["']""")
# A flag in absl's usage text: "  --name: help" or "  --[no]name: help".
_LISTED = re.compile(r"^  --(?:\[no\])?([\w.]+):", re.M)


def commands() -> dict[str, pathlib.Path]:
  """Module name -> source file of every module under vsrllm_jax/ with a __main__ block."""
  found = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    if _MAIN.search(path.read_text()):
      parts = path.relative_to(REPO).with_suffix("").parts
      found[".".join(parts[:-1] if parts[-1] == "__main__" else parts)] = path
  return found


COMMANDS = commands()


def defined_flags(path: pathlib.Path) -> set[str]:
  return set(_DEFINED.findall(path.read_text()))


def test_the_commands_are_found():
  expected = {"vsrllm_jax.train", "vsrllm_jax.decode", "vsrllm_jax.transcribe",
              "vsrllm_jax.convert", "vsrllm_jax.from_torch"}
  expected |= {f"vsrllm_jax.tools.{p.stem}" for p in (PACKAGE / "tools").glob("*.py")
               if p.stem not in ("__init__", "llm_pretraining_data")}
  assert expected <= set(COMMANDS), sorted(expected - set(COMMANDS))
  assert "vsrllm_jax.tools.summarize_runs" in expected and len(expected) >= 11


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_lists_every_flag(module):
  source = COMMANDS[module].read_text()
  assert "app.run(" in source, f"{module} does not run through absl.app.run"
  defined = defined_flags(COMMANDS[module])
  assert defined, f"{module} defines no absl flags"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  out = result.stdout
  assert "Traceback" not in result.stderr + out, f"{module} --help crashed:\n{result.stderr}"
  # absl prints the usage on stdout, ending with this line, then exits with 1
  # (app.HelpFlag); a crash or an early exit never gets that far.
  assert result.returncode in (0, 1) and "Try --helpfull" in out, (
      f"{module} --help: exit {result.returncode}\n{out}\n{result.stderr}")
  listed = set(_LISTED.findall(out.split("\nflags:\n", 1)[-1]))
  assert defined <= listed, f"{module} --help omits {sorted(defined - listed)}:\n{out}"
  # ... and nothing the source does not name (a flag defined in a loop, say), which
  # tests/test_readme.py's check of the README's commands would not see.
  assert listed <= defined, f"{module} --help lists {sorted(listed - defined)} not in its source"


def test_commands_import_together_and_define_flags_only_when_asked():
  modules = {name: importlib.import_module(name) for name in COMMANDS}
  owners = set(flags.FLAGS.flags_by_module_dict())
  assert not owners & set(modules), f"flags defined on import by {sorted(owners & set(modules))}"
  for name, module in modules.items():
    assert callable(getattr(module, "define_flags", None)), f"{name} has no define_flags"
    fresh = flags.FlagValues()
    module.define_flags(flag_values=fresh)
    assert set(fresh) == defined_flags(COMMANDS[name]), name


def test_pretrain_llm_has_a_flag_per_shape_field():
  from vsrllm_jax.tools import pretrain_llm  # pylint: disable=g-import-not-at-top
  fresh = flags.FlagValues()
  pretrain_llm.define_flags(fresh)
  assert set(pretrain_llm.DEFAULT_SHAPE) <= set(fresh)
