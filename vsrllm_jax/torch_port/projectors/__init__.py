"""The torch projector catalog: registry names -> ``nn.Module``s mirroring ours.

``build(name, config, output_dim, input_dim)`` takes the same ``projector``
config section as ``vsrllm_jax.models.projectors.build`` (its 'name' key is
ignored). Torch modules are built before they see an input, so the widths
come as arguments: ``output_dim`` (the LLM width), ``input_dim`` (the
encoder-feature width) and, for text-aware projectors, ``text_dim`` (the
instruction embeddings; default ``output_dim``). Unknown names and unknown
fields are errors that list the valid ones.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput

_REGISTRY: dict[str, type[Projector]] = {}

# Fields every one of ours has; here the widths are arguments and the dtype
# is the module's (``.to(dtype)``), so a config may hold them and they are ignored.
SHARED_FIELDS = ("output_dim", "dtype", "param_dtype")


def register(name: str) -> Callable[[type[Projector]], type[Projector]]:
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"torch projector {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get_class(name: str) -> type[Projector]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown projector {name!r} for the PyTorch port "
                     f"(vsrllm_jax/torch_port/projectors); it has: {', '.join(names())}")
  return _REGISTRY[name]


def config_fields(name: str) -> dict[str, Any]:
  """The settable fields of projector ``name`` with their defaults (as ours, less
  SHARED_FIELDS)."""
  return get_class(name).config_fields()


def build(name: str, config: Mapping[str, Any], output_dim: int, input_dim: int, *,
          text_dim: int | None = None) -> Projector:
  """Builds torch projector ``name`` from its config section (fp32; ``.to()`` to cast)."""
  cls = get_class(name)
  fields = config_fields(name)
  kwargs = {k: v for k, v in dict(config).items() if k != "name" and k not in SHARED_FIELDS}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"projector {name!r} has no field(s) {unknown}; valid fields: "
                     f"{sorted(fields)}")
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
  if cls.text_aware:
    return cls(output_dim, input_dim, output_dim if text_dim is None else text_dim, **kwargs)
  if text_dim is not None:
    raise ValueError(f"projector {name!r} does not read the instruction; text_dim must be None")
  return cls(output_dim, input_dim, **kwargs)


def _import_catalog() -> None:
  """Imports every module of this package: each registers its projectors."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  for info in pkgutil.iter_modules(__path__):
    if info.name != "base":
      importlib.import_module(f"{__name__}.{info.name}")


_import_catalog()

__all__ = ["Projector", "ProjectorOutput", "build", "config_fields", "get_class", "names",
           "register"]
