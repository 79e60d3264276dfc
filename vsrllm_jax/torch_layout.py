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

Which rule applies comes from the module that owns the param, found by running
the model abstractly with flax's method interceptor (``plan``); modules with
custom conv-shaped params declare ``TORCH_LAYOUT = {"kernel": "conv"}``.
"""
from __future__ import annotations

import dataclasses
import math
import flax
import flax.linen as nn
import jax
import numpy as np

STACK_NAME = "layers"   # the logical axis of scan-stacked params (layers.scan_layers)
SCAN_NAMES = ("layers", "iterations")   # what our scanned stacks are called


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one leaf maps: its torch name and layout kind ('linear', 'conv', 'same')."""
  torch_key: str
  kind: str
  stacked: bool
  in_dims: int = 1          # linear: how many leading dims of the kernel are inputs
  shape: tuple = ()         # the flax leaf's shape (stacked: with the layer axis)


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


def _leaf_rule(module, leaf: str) -> tuple[str, str, int]:
  """(torch leaf name, kind, in_dims) for ``leaf`` of ``module``."""
  from vsrllm_jax.models import layers  # pylint: disable=g-import-not-at-top
  declared = getattr(type(module), "TORCH_LAYOUT", {}).get(leaf)
  if declared == "conv":
    return "weight", "conv", 1
  if isinstance(module, (layers.Dense, nn.Dense, nn.DenseGeneral)):
    if leaf == "kernel":
      axis = getattr(module, "axis", -1)
      return "weight", "linear", len(axis) if isinstance(axis, (tuple, list)) else 1
    return leaf, "same", 1
  if isinstance(module, (nn.Conv, nn.ConvTranspose)) and leaf == "kernel":
    return "weight", "conv", 1
  if leaf == "scale":
    return "weight", "same", 1
  if isinstance(module, nn.Embed) and leaf == "embedding":
    return "weight", "same", 1
  if leaf in ("mean", "var"):
    return f"running_{leaf}", "same", 1
  return leaf, "same", 1


def plan(model: nn.Module, boxed_params, *, variables, args=(), method=None, kwargs=None,
         prefix=()) -> dict[tuple[str, ...], Rule]:
  """Rules for every leaf of ``boxed_params`` (abstract, with logical axes) that lives
  under ``prefix`` (e.g. ('projector',)); torch keys drop the prefix.

  The owning modules come from running ``model.apply(variables, *args,
  method=method, **kwargs)`` abstractly.
  """
  modules = _module_kinds(model, variables, *args, method=method, **(kwargs or {}))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed_params))
  leaves = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed_params))
  rules = {}
  for path, leaf in leaves.items():
    if tuple(path[:len(prefix)]) != tuple(prefix):
      continue
    owner = modules.get(tuple(path[:-1]))
    name, kind, in_dims = (_leaf_rule(owner, path[-1]) if owner is not None
                           else (path[-1], "same", 1))
    stacked = bool(tuple(specs[path])) and tuple(specs[path])[0] == STACK_NAME
    inner = list(path[len(prefix):-1])
    if stacked:   # the layer index goes right after the scan's name
      scan = next((j for j, part in enumerate(inner) if part in SCAN_NAMES), None)
      if scan is None:
        raise ValueError(f"{'/'.join(path)} is stacked on 'layers' but no module on its path "
                         f"has a scan's name {SCAN_NAMES}")
      inner.insert(scan + 1, "{i}")
    rules[tuple(path)] = Rule(".".join(inner + [name]), kind, stacked, in_dims,
                              tuple(leaf.shape))
  return rules


def _contiguous(x) -> np.ndarray:
  return np.array(x, order="C", copy=True)   # keeps 0-d arrays 0-d (ascontiguousarray does not)


def _to_torch(x: np.ndarray, rule: Rule) -> np.ndarray:
  if rule.kind == "linear":
    inp, out = x.shape[:rule.in_dims], x.shape[rule.in_dims:]
    return _contiguous(x.reshape(math.prod(inp), math.prod(out)).T)
  if rule.kind == "conv":
    return _contiguous(np.moveaxis(x, (-1, -2), (0, 1)))
  return _contiguous(x)


def _from_torch(t: np.ndarray, rule: Rule, shape: tuple) -> np.ndarray:
  if rule.kind == "linear":
    return _contiguous(t.T.reshape(shape))
  if rule.kind == "conv":
    return _contiguous(np.moveaxis(t, (0, 1), (-1, -2)))
  return _contiguous(t.reshape(shape))


def to_state_dict(params, rules: dict[tuple[str, ...], Rule]) -> dict[str, np.ndarray]:
  """Flax params (host or device arrays; the full tree) -> {torch key: array}."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  out = {}
  for path, rule in rules.items():
    if path not in flat:
      raise KeyError(f"params have no {'/'.join(path)}")
    x = np.asarray(flat[path])
    pieces = list(x) if rule.stacked else [x]
    for i, piece in enumerate(pieces):
      key = rule.torch_key.replace("{i}", str(i))
      if rule.kind == "same" and path[-1] == "bias" and piece.ndim > 1:
        piece = piece.reshape(-1)        # a multi-dim Dense's bias: torch's Linear is 1-D
      out[key] = _to_torch(piece, rule)
  return out


def from_state_dict(state: dict[str, np.ndarray], rules: dict[tuple[str, ...], Rule]) -> dict:
  """{torch key: array} -> the flax param tree of ``rules`` (nested dict of numpy).

  Every rule's key must be present with the right size; extra keys are errors.
  """
  out, used = {}, set()
  for path, rule in rules.items():
    count = rule.shape[0] if rule.stacked else 1
    shape = rule.shape[1:] if rule.stacked else rule.shape
    pieces = []
    for i in range(count):
      key = rule.torch_key.replace("{i}", str(i))
      if key not in state:
        raise KeyError(f"state dict has no {key!r} (for {'/'.join(path)})")
      t = np.asarray(state[key])
      if t.size != math.prod(shape):
        raise ValueError(f"{key!r} has {t.size} values ({t.shape}); {'/'.join(path)} needs "
                         f"{shape}")
      used.add(key)
      pieces.append(_from_torch(t, rule, shape))
    out[path] = np.stack(pieces) if rule.stacked else pieces[0]
  extra = sorted(set(state) - used)
  if extra:
    raise KeyError(f"state dict has keys the model does not: {extra[:10]}")
  return flax.traverse_util.unflatten_dict(out)
