"""Which trainable params the loss cannot reach, read from the traced gradient.

JAX's autodiff carries a cotangent that no path produces as a symbolic zero
(``ad.Zero``) and instantiates it only at the end, as a literal ``0.0`` or a
``broadcast_in_dim`` of one. So in the jaxpr of ``jax.grad(loss)`` the gradient
of an unreachable param is built from a zero literal alone, while a reachable
one depends on the inputs (a gradient that happens to be zero on some batch
still does). That is decided when tracing, for every batch at once, with
nothing computed: a param used only under ``stop_gradient``, only through
integer ops, or not at all (encoder params while features come from a cache).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core

# Ops that keep a zero zero (the instantiated zero's own shape and dtype changes).
_ZERO_PRESERVING = ("broadcast_in_dim", "convert_element_type", "reshape", "transpose", "copy")
_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _zero_outputs(jaxpr, consts) -> list[bool]:
  """Per output of ``jaxpr`` (a core Jaxpr): whether it is a zero constant."""
  producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  constvals = dict(zip(jaxpr.constvars, consts))

  def is_zero(v) -> bool:
    if isinstance(v, jex_core.Literal):
      return bool(np.all(np.asarray(v.val) == 0))
    if v in constvals:
      return bool(np.all(np.asarray(constvals[v]) == 0))
    eqn = producers.get(v)
    if eqn is None:   # an input
      return False
    name = eqn.primitive.name
    if name in _ZERO_PRESERVING:
      return is_zero(eqn.invars[0])
    inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    if name in _CALLS and inner is not None:
      closed = inner if hasattr(inner, "consts") else jex_core.ClosedJaxpr(inner, ())
      return _zero_outputs(closed.jaxpr, closed.consts)[eqn.outvars.index(v)]
    return False

  return [is_zero(v) for v in jaxpr.outvars]


def unreachable(loss_fn: Callable, trainable: Any, *args) -> list[str]:
  """'a/b/c' paths of the ``trainable`` leaves whose gradient of ``loss_fn(trainable,
  *args)`` is a symbolic zero. Leaves may be abstract (``jax.ShapeDtypeStruct``);
  nothing is computed, the gradient is only traced."""
  closed = jax.make_jaxpr(lambda t, *a: jax.grad(loss_fn)(t, *a))(trainable, *args)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
  zeros = _zero_outputs(closed.jaxpr, closed.consts)
  if len(zeros) != len(paths):
    raise AssertionError(f"{len(zeros)} gradient outputs for {len(paths)} params")
  name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
  return [name(p) for p, zero in zip(paths, zeros) if zero]
