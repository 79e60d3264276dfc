"""``--config``: a config file's path, or the name of a config shipped in this package.

``--config=configs/contrastive.py`` (the form from a clone), ``--config=contrastive``
and ``--config=/my/config.py`` all work, with or without ``:args`` after the file.
An existing file always wins; otherwise the last path component names a packaged
preset, so the commands work the same after ``pip install`` as in a checkout.
"""
from __future__ import annotations

import os
import pathlib
import sys

from absl import flags
# The module behind ml_collections.config_flags: its parser and flag classes are what
# DEFINE_config_file puts together; it exports no hook for resolving the path.
from ml_collections.config_flags import config_flags

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
_NOT_PRESETS = {"__init__", "common", "packaged"}


def names() -> list[str]:
  """The packaged presets' names, e.g. ``contrastive``."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_PRESETS)


def resolve(spec: str) -> str:
  """``path[:arg]`` with ``path`` made a readable file: the given one, or the packaged preset."""
  path, sep, arg = spec.partition(":")
  if os.path.isfile(path):
    return spec
  name = pathlib.PurePath(path).name.removesuffix(".py")
  if name in names():
    return f"{CONFIG_DIR / (name + '.py')}{sep}{arg}"
  raise ValueError(f"{path!r} is neither a file nor a packaged config; "
                   f"packaged configs: {', '.join(names())}")


class _ConfigParser(config_flags.ConfigFileFlagParser):
  """ml_collections' config-file parser, reading ``resolve(spec)``."""

  def parse(self, path):
    return super().parse(resolve(path))


def define_config_flag(name: str, default: str | None, help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       lock_config: bool = True) -> flags.FlagHolder:
  """Like ``config_flags.DEFINE_config_file`` (``--name.key=value`` overrides included),
  with packaged names accepted."""
  flag = config_flags._ConfigFlag(  # pylint: disable=protected-access
      parser=_ConfigParser(name=name, lock_config=lock_config),
      serializer=flags.ArgumentSerializer(), name=name, default=default,
      help_string=f"{help_string} A file path or a packaged config: {', '.join(names())}.",
      flag_values=flag_values)
  # Listed by --help under the command that defines it (absl names __main__ by argv[0]).
  caller = sys._getframe(1).f_globals["__name__"]  # pylint: disable=protected-access
  return flags.DEFINE_flag(flag, flag_values,
                           module_name=sys.argv[0] if caller == "__main__" else caller)
