"""The one mapping mechanism: "this tensor of ours is that tensor of theirs, with this
transform", planned against a file and read piece by piece.

A ``Rule`` names one of our params (a path in the param tree), the tensor of
another layout it corresponds to (``{i}`` in the name: one tensor per layer of
a scan-stacked param) and a ``Transform``:

- ``same``: the same array (norm scales, embeddings, biases, batch statistics);
- ``linear(k)``: ours ``[*in, *out]`` (k input axes) <-> theirs ``[prod(out),
  prod(in)]``, torch's ``nn.Linear``: Hugging Face q/k/v (k=1, heads
  flattened) and o_proj (k=2), every Dense;
- ``conv``: ours ``[*window, in, out]`` <-> theirs ``[out, in, *window]``;
- ``flatten``: ours ``[*dims]`` <-> theirs ``[prod(dims)]`` (a multi-axis bias);
- ``lead_ones(k)``: ours ``[*dims]`` <-> theirs ``[1]*k + dims``;
- ``reverse``: the axes in reverse order (fairseq's positional convolution).

``plan`` checks the rules against a reader's tensors (missing, unexpected and
wrongly shaped tensors are one error that names them) and gives ``ParamSpec``s.
A spec reads any slice of its param in chunks of rows, so a loader can place
each device's shard on its own (``place``) and never hold a whole model.
Writing is the inverse, whole arrays (``to_theirs``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import numpy as np

CHUNK_BYTES = 32 << 20  # the most of one stored tensor read (and converted) at once
LAYER = "{i}"           # in a rule's tensor name: the layer index of a scan-stacked param


@dataclasses.dataclass(frozen=True)
class Transform:
  """How our array relates to theirs (module docstring)."""
  kind: str = "same"        # same | linear | conv | flatten
  in_axes: int = 1          # linear: how many leading axes of ours are inputs

  def theirs_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Their shape of one of ours of ``shape`` (per layer)."""
    shape = tuple(shape)
    if self.kind == "linear":
      return (math.prod(shape[self.in_axes:]), math.prod(shape[:self.in_axes]))
    if self.kind == "conv":
      return (shape[-1], shape[-2]) + shape[:-2]
    if self.kind == "flatten":
      return (math.prod(shape),)
    if self.kind == "lead_ones":
      return (1,) * self.in_axes + shape
    if self.kind == "reverse":
      return shape[::-1]
    return shape

  def to_theirs(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if self.kind == "linear":
      return _contiguous(x.reshape(math.prod(x.shape[:self.in_axes]), -1).T)
    if self.kind == "conv":
      return _contiguous(np.moveaxis(x, (-1, -2), (0, 1)))
    if self.kind == "reverse":
      return _contiguous(x.transpose())
    return _contiguous(x.reshape(self.theirs_shape(x.shape)))

  def to_ours(self, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    t = np.asarray(t)
    if self.kind == "linear":
      return _contiguous(t.T.reshape(shape))
    if self.kind == "conv":
      return _contiguous(np.moveaxis(t, (0, 1), (-1, -2)))
    if self.kind == "reverse":
      return _contiguous(t.transpose())
    return _contiguous(t.reshape(shape))

  @property
  def row_axis(self) -> int:
    """Our axis whose index ranges are row ranges of their tensor (chunked reads); -1:
    none, the tensor is read whole."""
    if self.kind in ("conv", "reverse", "lead_ones"):
      return -1
    return self.in_axes if self.kind == "linear" else 0

  def read(self, reader, name: str, shape: tuple[int, ...], index: tuple[slice, ...]):
    """Our ``[index]`` of their tensor ``name`` (``shape``: ours, per layer), reading only
    the rows it needs (``reader.rows``)."""
    if self.row_axis < 0:   # small: read whole
      return self.to_ours(reader.rows(name, 0, reader.shape(name)[0]), shape)[index]
    if self.kind in ("same", "flatten"):
      if self.kind == "same":
        return reader.rows(name, index[0].start, index[0].stop)[(slice(None),) + index[1:]]
      return _flat_rows(reader, name, shape, index)
    k = self.in_axes           # linear: their rows are our output positions
    out_shape, out_idx = shape[k:], index[k:]
    rows = _flat_rows(reader, name, out_shape, out_idx)          # [*out slice, prod(in)]
    rows = rows.reshape(rows.shape[:len(out_shape)] + shape[:k])[(Ellipsis,) + index[:k]]
    return np.moveaxis(rows, tuple(range(len(out_shape))),
                       tuple(range(k, k + len(out_shape))))


def _flat_rows(reader, name: str, shape, index) -> np.ndarray:
  """Our ``[index]`` over ``shape`` whose elements are rows of a tensor with
  ``prod(shape)`` rows: reads the covering row range once, picks the rows."""
  grid = np.ravel_multi_index(np.ix_(*[np.arange(s.start, s.stop) for s in index]), shape)
  lo, hi = int(grid.min()), int(grid.max()) + 1
  block = reader.rows(name, lo, hi)
  return block[grid - lo]


def _contiguous(x) -> np.ndarray:
  return np.array(x, order="C", copy=True)   # keeps 0-d arrays 0-d


SAME, CONV, FLATTEN, REVERSE = (Transform("same"), Transform("conv"), Transform("flatten"),
                                Transform("reverse"))


def linear(in_axes: int = 1) -> Transform:
  return Transform("linear", in_axes)


def lead_ones(count: int) -> Transform:
  return Transform("lead_ones", count)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our param at ``ours`` (a path) is their tensor ``theirs`` (``{i}``: one per layer)."""
  ours: tuple[str, ...]
  theirs: str
  transform: Transform = SAME

  @property
  def stacked(self) -> bool:
    return LAYER in self.theirs


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One of our params and the tensors it is read from (one per layer if stacked)."""
  path: tuple[str, ...]
  shape: tuple[int, ...]      # ours; a stacked param leads with the layers axis
  names: tuple[str, ...]
  transform: Transform
  stacked: bool

  def read(self, reader, index=(), dtype=np.float32) -> np.ndarray:
    """``self[index]`` as ``dtype`` (index: slices over ``shape``), read piece by piece."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
    out = np.empty(tuple(s.stop - s.start for s in index), dtype)
    if self.stacked:
      layers, index = index[0], index[1:]
      targets = [(out[j], self.names[i]) for j, i in enumerate(range(layers.start, layers.stop))]
    else:
      targets = [(out, self.names[0])]
    shape = self.shape[1:] if self.stacked else self.shape
    if not shape:                              # a scalar
      for dest, name in targets:
        dest[...] = np.asarray(reader.rows(name, 0, 1)).reshape(())
      return out
    axis = self.transform.row_axis
    if axis < 0:
      for dest, name in targets:
        dest[...] = self.transform.read(reader, name, shape, index)
      return out
    for dest, name in targets:
      unit = math.prod(shape) // shape[axis] * reader.dtype(name).itemsize  # bytes per row
      step = max(1, CHUNK_BYTES // max(unit, 1))
      rows = index[axis]
      for a in range(rows.start, rows.stop, step):
        b = min(a + step, rows.stop)
        sub = index[:axis] + (slice(a, b),) + index[axis + 1:]
        dest[(slice(None),) * axis + (slice(a - rows.start, b - rows.start),)] = \
            self.transform.read(reader, name, shape, sub)
    return out


def plan(rules: Iterable[Rule], shapes: Mapping[tuple[str, ...], Any], reader, source: str, *,
         tolerated: Callable[[str], bool] = lambda name: False,
         theirs_shape: Callable[[Rule, tuple], tuple] | None = None) -> list[ParamSpec]:
  """A spec for every param in ``shapes`` (flat path -> array or ShapeDtypeStruct) from the
  rule that names it, checked against ``reader``: an error names the params no rule maps,
  and the tensors that are missing, unexpected (unless ``tolerated``) or wrongly shaped."""
  by_path = {r.ours: r for r in rules}
  unmapped = sorted("/".join(p) for p in shapes if p not in by_path)
  if unmapped:
    raise ValueError(f"{source}: no tensor of the file maps to the params {unmapped} (add a "
                     "rule for them to the format's key map)")
  specs, used, missing, wrong = [], set(), [], []
  for path, leaf in shapes.items():
    rule = by_path[path]
    shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    per_layer = shape[1:] if rule.stacked else shape
    names = (tuple(rule.theirs.replace(LAYER, str(i)) for i in range(shape[0])) if rule.stacked
             else (rule.theirs,))
    want = theirs_shape(rule, per_layer) if theirs_shape else rule.transform.theirs_shape(per_layer)
    for name in names:
      if name not in reader:
        missing.append(name)
        continue
      used.add(name)
      if tuple(reader.shape(name)) != tuple(want):
        wrong.append(f"{name}: {tuple(reader.shape(name))} != expected {tuple(want)}")
    specs.append(ParamSpec(path, shape, names, rule.transform, rule.stacked))
  unexpected = sorted(k for k in reader.names() if k not in used and not tolerated(k))
  if missing or unexpected or wrong:
    raise ValueError(f"{source}: tensors do not match the model: missing keys {missing[:10]}"
                     f"{'...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                     f"{'...' if len(unexpected) > 10 else ''}, wrong shapes {wrong[:10]}")
  return specs


def param_tree(specs: list[ParamSpec], leaves) -> dict:
  return flax.traverse_util.unflatten_dict({p.path: leaf for p, leaf in zip(specs, leaves)})


def read_params(specs: list[ParamSpec], reader, dtype, shardings=None) -> dict:
  """The planned params as host arrays of ``dtype``, or, with ``shardings`` (flat path ->
  Sharding), as ``jax.Array``s placed shard by shard (``place``)."""
  if shardings is None:
    return param_tree(specs, [p.read(reader, (), dtype) for p in specs])
  return param_tree(specs, [place(p, reader, dtype, shardings[p.path]) for p in specs])


def place(spec: ParamSpec, reader, dtype, target: jax.sharding.Sharding) -> jax.Array:
  """One param straight into ``target``, one distinct slice in host memory at a time.

  Each slice is read (and converted) once, put on every device that holds it,
  and dropped before the next is read.
  """
  by_slice: dict = {}
  for device, index in target.addressable_devices_indices_map(spec.shape).items():
    key = tuple(s.indices(n)[:2] for s, n in zip(index, spec.shape))
    by_slice.setdefault(key, (index, []))[1].append(device)
  shards = []
  for index, devices in by_slice.values():
    host = spec.read(reader, index, dtype)
    shards += [jax.device_put(host, d) for d in devices]
    del host
  return jax.make_array_from_single_device_arrays(spec.shape, target, shards)


def to_theirs(params, rules: Iterable[Rule], *, strict: bool = True,
              layer_major: bool = False) -> dict[str, np.ndarray]:
  """Our params (a tree; host or device arrays) -> {their name: array}; per-layer tensors
  for stacked params. ``strict``: every rule's param must exist. ``layer_major``: a run
  of consecutive stacked rules comes out layer by layer (a torch state dict's order)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  groups: list[list[Rule]] = []
  for rule in rules:
    if rule.ours not in flat:
      if strict:
        raise KeyError(f"params have no {'/'.join(rule.ours)}")
      continue
    if layer_major and rule.stacked and groups and groups[-1][0].stacked:
      groups[-1].append(rule)
    else:
      groups.append([rule])
  out = {}
  for group in groups:
    pieces = [(r, list(np.asarray(flat[r.ours])) if r.stacked else [np.asarray(flat[r.ours])])
              for r in group]
    for i in range(len(pieces[0][1])):
      for rule, layers in pieces:
        out[rule.theirs.replace(LAYER, str(i))] = rule.transform.to_theirs(layers[i])
  return out


def from_theirs(tensors: Mapping[str, np.ndarray], rules: Iterable[Rule],
                shapes: Mapping[tuple[str, ...], tuple[int, ...]], *, source: str = "state dict"
                ) -> dict:
  """{their name: array} -> our param tree (numpy) of ``shapes`` (flat path -> our shape),
  whole arrays. Every rule's tensors must be present with the right size; tensors no
  rule reads are errors."""
  out, used = {}, set()
  for rule in rules:
    shape = tuple(shapes[rule.ours])
    per_layer = shape[1:] if rule.stacked else shape
    pieces = []
    for i in range(shape[0] if rule.stacked else 1):
      name = rule.theirs.replace(LAYER, str(i))
      if name not in tensors:
        raise KeyError(f"{source} has no {name!r} (for {'/'.join(rule.ours)})")
      t = np.asarray(tensors[name])
      if t.size != math.prod(per_layer):
        raise ValueError(f"{source}: {name!r} has {t.size} values ({t.shape}); "
                         f"{'/'.join(rule.ours)} needs {per_layer}")
      used.add(name)
      pieces.append(rule.transform.to_ours(t, per_layer))
    out[rule.ours] = np.stack(pieces) if rule.stacked else pieces[0]
  extra = sorted(set(tensors) - used)
  if extra:
    raise KeyError(f"{source} has tensors the model does not: {extra[:10]}")
  return flax.traverse_util.unflatten_dict(out)
