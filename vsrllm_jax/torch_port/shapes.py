"""Reading a JAX-side config (dataclass or JSON mapping) into a torch module's shape dataclass.

The torch side cannot import the JAX configs, so each port keeps a frozen
dataclass of the fields that shape its network; ``read_fields`` fills one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SEQUENCE_FIELDS = ("stem_kernel", "resnet_channels", "resnet_blocks")


def read_fields(cls, config: Any, who: str, source: str, optional: tuple[str, ...] = ()):
  """``cls`` from an object with its fields as attributes, or a mapping of them.

  Extra keys are ignored; a missing field that is not ``optional`` is an error
  naming it (``who``: the port, ``source``: the JAX config it mirrors).
  """
  get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
  names = [f.name for f in dataclasses.fields(cls)]
  missing = [n for n in names if n not in optional and get(n, None) is None]
  if missing:
    raise ValueError(f"{who}: the config lacks {missing}; expected the fields of {source}: "
                     f"{names}")
  values = {n: get(n) for n in names if get(n, None) is not None}
  for n in SEQUENCE_FIELDS:
    if n in values:
      values[n] = tuple(int(v) for v in values[n])
  return cls(**values)
