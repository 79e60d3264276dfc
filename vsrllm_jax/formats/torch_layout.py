"""Our parameter trees <-> PyTorch state dicts, exactly (a round trip is the identity).

The torch modules in ``vsrllm_jax/torch_port`` mirror the flax module tree:
an attribute per submodule with the flax name, an ``nn.ModuleList`` with the
scan's name for a scanned stack. So a param's torch key is its flax path joined
with '.', the layer index inserted after the scan's name for scan-stacked
leaves (logical axis 'layers' first; split per layer), and the leaf named and
laid out as torch does:

- Dense (ours, flax's) ``kernel`` [*in, *out] -> ``weight`` [prod(out), prod(in)]
  (``nn.Linear``), ``bias`` -> ``bias`` [prod(out)];
- convolution ``kernel`` [*k, in, out] -> ``weight`` [out, in, *k] (OIW, OIHW, OIDHW);
- norms' ``scale`` -> ``weight``; ``nn.Embed``'s ``embedding`` -> ``weight``;
  batch-norm statistics ``mean``/``var`` -> ``running_mean``/``running_var``;
- anything else (learned queries, expert weight stacks, ...) keeps name and layout.

These are ``tensor_map`` rules (``linear``, ``conv``, ``same``, ``flatten`` for a
multi-axis Dense bias); reading and writing are ``tensor_map``'s.

Which rule applies comes from the module that owns the param, found by running
the model abstractly with flax's method interceptor (``plan``); modules with
custom conv-shaped params declare ``TORCH_LAYOUT = {"kernel": "conv"}``.
"""
from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import numpy as np

from vsrllm_jax.formats import tensor_map

STACK_NAME = "layers"   # the logical axis of scan-stacked params (layers.scan_layers)
SCAN_NAMES = ("layers", "iterations")   # what our scanned stacks are called


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  """The rules of every leaf of a subtree, and our leaves' shapes (stacked: with the
  layer axis), which reading a state dict back needs."""
  rules: tuple[tensor_map.Rule, ...]
  shapes: dict

  def rule(self, path: tuple[str, ...]) -> tensor_map.Rule:
    return next(r for r in self.rules if r.ours == tuple(path))


def _module_kinds(model: nn.Module, variables, *args, method=None, **kwargs) -> dict:
  """{module path: module instance} of every module the call runs (abstractly)."""
  seen = {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    seen.setdefault(tuple(context.module.path), context.module)
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, a, k: model.apply(v, *a, method=method, **k), variables, args,
                   kwargs)
  return seen


def _leaf_rule(module, leaf: str, ndim: int) -> tuple[str, tensor_map.Transform]:
  """(torch leaf name, transform) for ``leaf`` (``ndim`` axes, per layer) of ``module``."""
  from vsrllm_jax.models import layers  # pylint: disable=g-import-not-at-top
  declared = getattr(type(module), "TORCH_LAYOUT", {}).get(leaf)
  if declared == "conv":
    return "weight", tensor_map.CONV
  if isinstance(module, (layers.Dense, nn.Dense, nn.DenseGeneral)):
    if leaf == "kernel":
      axis = getattr(module, "axis", -1)
      return "weight", tensor_map.linear(len(axis) if isinstance(axis, (tuple, list)) else 1)
    return leaf, tensor_map.FLATTEN if leaf == "bias" and ndim > 1 else tensor_map.SAME
  if isinstance(module, (nn.Conv, nn.ConvTranspose)) and leaf == "kernel":
    return "weight", tensor_map.CONV
  if leaf == "scale":
    return "weight", tensor_map.SAME
  if isinstance(module, nn.Embed) and leaf == "embedding":
    return "weight", tensor_map.SAME
  if leaf in ("mean", "var"):
    return f"running_{leaf}", tensor_map.SAME
  return leaf, tensor_map.SAME


def plan(model: nn.Module, boxed_params, *, variables, args=(), method=None, kwargs=None,
         prefix=()) -> TorchLayout:
  """The layout of every leaf of ``boxed_params`` (abstract, with logical axes) that lives
  under ``prefix`` (e.g. ('projector',)); torch keys drop the prefix.

  The owning modules come from running ``model.apply(variables, *args,
  method=method, **kwargs)`` abstractly.
  """
  modules = _module_kinds(model, variables, *args, method=method, **(kwargs or {}))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed_params))
  leaves = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed_params))
  rules, shapes = [], {}
  for path, leaf in leaves.items():
    if tuple(path[:len(prefix)]) != tuple(prefix):
      continue
    stacked = bool(tuple(specs[path])) and tuple(specs[path])[0] == STACK_NAME
    owner = modules.get(tuple(path[:-1]))
    ndim = len(leaf.shape) - int(stacked)
    name, transform = (_leaf_rule(owner, path[-1], ndim) if owner is not None
                       else (path[-1], tensor_map.SAME))
    inner = list(path[len(prefix):-1])
    if stacked:   # the layer index goes right after the scan's name
      scan = next((j for j, part in enumerate(inner) if part in SCAN_NAMES), None)
      if scan is None:
        raise ValueError(f"{'/'.join(path)} is stacked on 'layers' but no module on its path "
                         f"has a scan's name {SCAN_NAMES}")
      inner.insert(scan + 1, tensor_map.LAYER)
    rules.append(tensor_map.Rule(tuple(path), ".".join(inner + [name]), transform))
    shapes[tuple(path)] = tuple(leaf.shape)
  return TorchLayout(tuple(rules), shapes)


def to_state_dict(params, layout: TorchLayout) -> dict[str, np.ndarray]:
  """Flax params (host or device arrays; the full tree) -> {torch key: array}."""
  return tensor_map.to_theirs(jax.device_get(params), layout.rules)


def from_state_dict(state: dict[str, np.ndarray], layout: TorchLayout) -> dict:
  """{torch key: array} -> the flax param tree of ``layout`` (nested dict of numpy).

  Every rule's key must be present with the right size; extra keys are errors.
  """
  return tensor_map.from_theirs(state, layout.rules, layout.shapes)

