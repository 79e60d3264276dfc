"""The projector catalog: registry names -> linen modules.

``names()`` lists the catalog; ``build(name, config)`` instantiates one from a
mapping of its fields (``output_dim`` is required; the composed model fills it
from the LLM width). Unknown names and unknown fields are errors that list the
valid ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput

_REGISTRY: dict[str, type[Projector]] = {}


def register(name: str) -> Callable[[type[Projector]], type[Projector]]:
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"projector {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get_class(name: str) -> type[Projector]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown projector {name!r}; the registry has: {', '.join(names())}")
  return _REGISTRY[name]


def config_fields(name: str) -> dict[str, Any]:
  """The settable fields of a projector with their defaults (no parent/name)."""
  cls = get_class(name)
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name"):
      continue
    out[f.name] = None if f.default is dataclasses.MISSING else f.default
  return out


def build(name: str, config: Mapping[str, Any], **overrides) -> Projector:
  """Builds projector ``name`` from ``config`` (its 'name' key, if any, is ignored)."""
  cls = get_class(name)
  fields = config_fields(name)
  kwargs = {k: v for k, v in dict(config).items() if k != "name"}
  kwargs.update(overrides)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"projector {name!r} has no field(s) {unknown}; valid fields: "
                     f"{sorted(fields)}")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
  if "output_dim" not in kwargs:
    raise ValueError(f"projector {name!r} needs 'output_dim' (the LLM embedding width)")
  return cls(**kwargs)


def _import_catalog() -> None:
  """Imports every module of this package: each registers its projectors."""
  import importlib
  import pkgutil
  for info in pkgutil.iter_modules(__path__):
    if info.name != "base":
      importlib.import_module(f"{__name__}.{info.name}")


_import_catalog()

__all__ = ["Projector", "ProjectorOutput", "build", "config_fields", "get_class", "names",
           "register"]
