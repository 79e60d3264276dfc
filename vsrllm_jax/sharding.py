"""The device mesh and where every array lives on it.

Parameters carry logical axis names (flax partitioning); rules map them to the
mesh axes ``data``, ``fsdp`` and ``tensor``: a preset (``config.sharding``:
'dp', 'fsdp' or 'fsdp_tp') or ``config.sharding_rules`` spelled out.
Activations are constrained at the key points of the models through
``constrain`` with ``act_*`` names, under the rules of the step being traced
(``activation_sharding``). A mesh axis that does not divide a dimension is
dropped for that array (and logged), so small models still run on big meshes.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# Activations: batch over data x fsdp in every preset; what else is split
# follows the weights (tensor parallel splits heads, MLP and vocab).
_ACT_DP = (("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None))
_ACT_TP = (("act_heads", "tensor"), ("act_kv_heads", "tensor"), ("act_mlp", "tensor"),
           ("act_vocab", "tensor"))
PRESETS = {
    # Pure data parallel: every weight replicated (small LLMs, many chips).
    "dp": (("batch", BATCH_AXES),) + _ACT_DP,
    # FSDP: every weight split on its model dimension over fsdp (frozen 7-8B
    # LLMs), gathered layer by layer inside the scan.
    "fsdp": (("batch", BATCH_AXES), ("embed", "fsdp")) + _ACT_DP,
    # FSDP plus Megatron-style tensor parallelism over heads, MLP and vocab.
    "fsdp_tp": (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("vocab", "tensor")) + _ACT_DP + _ACT_TP,
}


def rules(config) -> tuple:
  """The logical-axis rules of a run: ``config.sharding_rules`` when given, else the
  ``config.sharding`` preset."""
  explicit = tuple(config.get("sharding_rules", ()) or ())
  if explicit:
    return explicit
  name = config.get("sharding", "fsdp_tp")
  if name not in PRESETS:
    raise ValueError(f"config.sharding={name!r} is not a preset; use one of {sorted(PRESETS)} "
                     "or spell out config.sharding_rules")
  return PRESETS[name]


_ACTIVATIONS = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules_: Sequence):
  """Inside, ``constrain`` pins activations to ``mesh`` by ``rules_`` (else no-op)."""
  token = _ACTIVATIONS.set((mesh, _normalise(rules_)))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names (``act_batch``, ...) under the
  current ``activation_sharding``; unchanged outside one."""
  active = _ACTIVATIONS.get()
  if active is None:
    return x
  mesh, rules_ = active
  spec = _fit_spec(nn.logical_to_mesh_axes(tuple(names), rules_), x.shape, mesh,
                   f"activation {tuple(names)}")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _normalise(rules_) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules_)


def make_mesh(shape: Sequence[int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry of ``shape`` may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"config.mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape may have at most one -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape={tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"have {len(devices)}")
  grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str) -> P:
  """Drops mesh axes that do not divide the dimension they shard."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in names:
      size = math.prod(mesh.shape[k] for k in kept + [a])
      if dim % size == 0:
        kept.append(a)
      elif mesh.shape[a] > 1:
        logging.info("sharding: %s dim %d not divisible by mesh axis %r; replicating it",
                     what, dim, a)
    out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*out)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """Tree of NamedSharding for a (possibly abstract) tree of boxed params.

  Unboxed leaves (e.g. batch-norm statistics) are replicated.
  """
  rules = _normalise(rules)
  specs = nn.get_partition_spec(boxed_tree)   # logical names per leaf (P() if unboxed)
  unboxed = nn.meta.unbox(boxed_tree)
  paths = jax.tree_util.tree_flatten_with_path(unboxed)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  shardings = []
  for (path, leaf), logical in zip(paths, spec_leaves):
    mesh_spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    what = jax.tree_util.keystr(path)
    shardings.append(NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh, what)))
  return jax.tree.unflatten(jax.tree.structure(unboxed), shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's numeric arrays -> global jax.Arrays sharded on the batch axes.

  String fields (ids, texts) stay on the host and are dropped here.
  """
  out = {}
  for k, v in host_batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "OUS":
      continue
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out
