"""The torch projector catalog's registry (``vsrllm_jax.registry``, no JAX)."""
from __future__ import annotations

from typing import Any

from vsrllm_jax.registry import Registry
from vsrllm_jax.torch_port.projectors.base import Projector

CATALOG: Registry[type[Projector]] = Registry("projector of the PyTorch port")
register = CATALOG.register

# Fields every one of ours has; here the widths are arguments and the dtype
# is the module's (``.to(dtype)``), so a config may hold them and they are ignored.
SHARED_FIELDS = ("output_dim", "dtype", "param_dtype")


def config_fields(name: str) -> dict[str, Any]:
  """The settable fields of projector ``name`` with their defaults (as ours, less
  SHARED_FIELDS)."""
  return CATALOG.get(name).config_fields()
