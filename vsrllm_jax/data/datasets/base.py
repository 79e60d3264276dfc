"""What our tfds builders share: array_record files, no registration, local code path."""
from __future__ import annotations

import sys

from etils import epath
import tensorflow_datasets as tfds


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of local or generated data: writes array_record (grain reads it without
  TensorFlow) and is not registered with tfds (importing a module twice must not clash;
  read a prepared copy with ``tfds.builder_from_directory``)."""

  def __init__(self, *, config, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own lookup needs the optional `importlib_resources` package.
    return epath.Path(sys.modules[cls.__module__].__file__)
