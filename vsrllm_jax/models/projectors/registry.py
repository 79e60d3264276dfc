"""The projector catalog's registry: names -> linen classes, built from a config section.

``build(name, config)`` instantiates one from a mapping of its fields
(``output_dim`` is required; the composed model fills it from the LLM width).
Unknown names and unknown fields are errors that list the valid ones.
``loss_names(config)`` lists the auxiliary losses a configured projector
produces, read from the projector itself (an abstract evaluation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vsrllm_jax.models.projectors.base import Projector
from vsrllm_jax.registry import Registry

CATALOG: Registry[type[Projector]] = Registry("projector")
register = CATALOG.register
names = CATALOG.names
get_class = CATALOG.get


def config_fields(name: str) -> dict[str, Any]:
  """The settable fields of a projector with their defaults (no parent/name)."""
  out = {}
  for f in dataclasses.fields(get_class(name)):
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


def loss_names(config: Mapping[str, Any]) -> list[str]:
  """Names of the auxiliary losses the configured projector adds to ``lm``: its own
  and its label losses (``Projector.label_losses``). Nothing is computed."""
  module = build(config["name"], dict(config, output_dim=16))
  features, mask = jnp.zeros((2, 8, 8)), jnp.ones((2, 8), bool)
  text = dict(text=jnp.zeros((2, 3, 16)), text_mask=jnp.ones((2, 3), bool))
  kwargs = text if module.text_aware else {}

  def run():
    variables = module.init(jax.random.key(0), features, mask, **kwargs)
    out = module.apply(variables, features, mask, **kwargs)
    label = module.apply(variables, out, text["text"], text["text_mask"],
                         method=type(module).label_losses)
    return {**out.aux_losses, **label}

  return sorted(jax.eval_shape(run))
