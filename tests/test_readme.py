"""Every command in the README's fenced blocks names a module or script that exists, flags
that it defines, and config files that exist; and the README stays a user guide."""
import importlib.util
import os
import pathlib
import re
import shlex

import pytest

from vsrllm_jax.configs import packaged

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# absl (DEFINE_string("name", ...), packaged.define_config_flag("name", ...)) and
# argparse (add_argument("--name", ...)) flag definitions.
_DEFINED = re.compile(r"""(?:DEFINE_\w+|define_config_flag)\(\s*f?["'](\w+)["']"""
                      r"""|add_argument\(\s*f?["']--(\w+)["']""")
_BOOL = re.compile(r"""DEFINE_bool\(\s*["'](\w+)["']""")


def readme_commands(text: str) -> list[list[str]]:
  """The ``python ...`` commands of the fenced shell blocks, continuation lines joined,
  comments dropped, as argument lists."""
  commands = []
  for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #", 1)[0].strip()
      for part in line.split("&&"):
        words = shlex.split(part.strip())
        if words and words[0] in ("python", "python3"):
          commands.append(words[1:])
  return commands


def _source(words: list[str]) -> tuple[str, list[str]]:
  """(the file the command runs, its arguments)."""
  if words[0] == "-m":
    spec = importlib.util.find_spec(words[1])
    assert spec is not None and spec.origin, f"no module {words[1]}"
    return spec.origin, words[2:]
  path = os.path.join(REPO, words[0])
  assert os.path.isfile(path), f"no script {words[0]}"
  return path, words[1:]


def check_command(words: list[str]) -> None:
  source, args = _source(words)
  if words[:2] == ["-m", "pytest"] or words[:2] == ["-m", "pip"]:
    return
  text = open(source).read()
  defined = {a or b for a, b in _DEFINED.findall(text)}
  bools = set(_BOOL.findall(text))
  for arg in args:
    if not arg.startswith("--"):
      continue
    name, _, value = arg[2:].partition("=")
    if name.startswith("config."):
      assert "config" in defined, f"{words[:2]}: --{name} needs a --config flag"
      continue
    known = name in defined or (name.startswith("no") and name[2:] in bools)
    assert known, f"{' '.join(words[:2])}: unknown flag --{name} (defined: {sorted(defined)})"
    if name == "config":
      config_file = value.split(":", 1)[0]
      in_repo = os.path.isfile(os.path.join(REPO, config_file))
      packaged_name = pathlib.PurePath(config_file).name.removesuffix(".py") in packaged.names()
      assert in_repo or packaged_name, f"no config file {config_file}"


def test_the_checker_catches_unknown_flags_and_modules():
  check_command(["-m", "vsrllm_jax.decode", "--workdir=x", "--beam_size=3"])
  with pytest.raises(AssertionError, match="unknown flag --beam_width"):
    check_command(["-m", "vsrllm_jax.decode", "--workdir=x", "--beam_width=3"])
  with pytest.raises(AssertionError, match="no module"):
    check_command(["-m", "vsrllm_jax.decoder"])
  with pytest.raises(AssertionError, match="no config file"):
    check_command(["-m", "vsrllm_jax.train", "--config=configs/nope.py", "--workdir=x"])
  assert readme_commands("```bash\npython -m a --x=1 \\\n  --y=2  # c\npip install b\n```") == [
      ["-m", "a", "--x=1", "--y=2"]]


def test_every_readme_command_names_known_modules_flags_and_configs():
  commands = readme_commands(open(README).read())
  assert len(commands) >= 10
  for words in commands:
    check_command(words)


def test_readme_is_a_user_guide_of_about_200_lines():
  lines = open(README).read().splitlines()
  assert len(lines) <= 230, len(lines)
  for heading in ("## Quick start", "## Configs", "## Real data", "## Accelerators",
                  "## Export", "## Benchmarks", "## Limitations"):
    assert any(l.startswith(heading) for l in lines), heading
