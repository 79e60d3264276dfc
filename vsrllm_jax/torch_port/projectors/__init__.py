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

from typing import Any, Mapping

from vsrllm_jax.torch_port.projectors import (adapters, attention_family,  # noqa: F401
                                              conv_abstractor, linear, mlp, moe,
                                              multiscale_contrastive, pooling, query, text_aware)
from vsrllm_jax.torch_port.projectors.base import Projector, ProjectorOutput
from vsrllm_jax.torch_port.projectors.registry import (CATALOG, SHARED_FIELDS, config_fields,
                                                       register)

names = CATALOG.names
get_class = CATALOG.get


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


__all__ = ["Projector", "ProjectorOutput", "SHARED_FIELDS", "build", "config_fields", "get_class",
           "names", "register"]
