"""The MoE, adapter and pooling projectors: shapes, padding, determinism, gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsrllm_jax.models import projectors
from vsrllm_jax.models.projectors import adapters, moe

FIELDS = {
    "hierarchical_moe": dict(num_heads=2, hidden_dim=16, time_embedding_dim=8),
    "pevl_adapter": dict(num_adapters=2, bottleneck_dim=4),
    "self_aggregating_linear": dict(num_output_tokens=4, num_heads=2, time_embedding_dim=8),
    "self_aggregating_mlp": dict(num_output_tokens=4, num_heads=2, hidden_dim=24,
                                 time_embedding_dim=8),
    "temporal_pool_mlp": dict(stride=3, hidden_dim=24),
}
NAMES = sorted(FIELDS)
FEATURE_DIM, LENGTHS = 12, np.array([10, 7, 4])
KEY = jax.random.key(0, impl="rbg")


def _inputs(t, seed=0):
  """Real frames are the same for every t and seed 0; padded frames are garbage per seed."""
  real = np.random.default_rng(0).normal(size=(3, 10, FEATURE_DIM)).astype(np.float32)
  feats = 100 * np.random.default_rng(seed + 1).normal(size=(3, t, FEATURE_DIM)).astype(
      np.float32)
  mask = np.arange(t)[None] < LENGTHS[:, None]
  feats[mask] = real[mask[:, :10]]
  return feats, mask


class Setup:
  """One built projector, its params and one jitted forward+gradient (shared per module).

  Forward and gradient share one compilation per input shape (compiling is
  what costs time on CPU); init is jitted and draws from an 'rbg' key, whose
  random bits compile about 3x faster than threefry's.
  """

  def __init__(self, name):
    self.module = projectors.build(name, {"output_dim": 16, **FIELDS[name]})
    self.init = jax.jit(self.module.init)
    self.boxed = self.init(KEY, *_inputs(10))["params"]
    self.params = nn.meta.unbox(self.boxed)
    self._run = jax.jit(jax.value_and_grad(self.loss, has_aux=True))

  def loss(self, params, feats, mask):
    out, inter = self.module.apply({"params": params}, feats, mask, mutable=["intermediates"])
    m = out.mask.astype(jnp.float32)[..., None]
    loss = jnp.sum(jnp.square(out.tokens) * m) / jnp.maximum(jnp.sum(m) * out.tokens.shape[-1], 1)
    return loss + sum(out.aux_losses.values()), (out, inter)

  def run(self, params, feats, mask):
    """-> (ProjectorOutput, intermediates, grads of mean(tokens^2) + aux losses)."""
    (_, (out, inter)), grads = self._run(params, feats, mask)
    return out, inter, grads


@pytest.fixture(scope="module")
def setups():
  cache = {}
  def get(name):
    if name not in cache:
      cache[name] = Setup(name)
    return cache[name]
  return get


def _perturbed(params, seed=0, scale=0.3):
  """params + scale * N(0, 1) (numpy: no per-shape compiles). Routers are redrawn with
  zero bias and unit-scale kernels, so that routing depends strongly on the token and every
  expert gets some."""
  rng = np.random.default_rng(seed)
  def one(path, x):
    keys = [getattr(k, "key", None) for k in path]
    noise = rng.normal(size=x.shape).astype(np.float32)
    if "router" in keys:
      return noise if keys[-1] == "kernel" else np.zeros_like(noise)
    return np.asarray(x) + scale * noise
  return jax.tree_util.tree_map_with_path(one, params)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_at_two_lengths(setups, name):
  s = setups(name)
  assert name in projectors.names() and not s.module.text_aware
  for t in (10, 16):
    feats, mask = _inputs(t)
    out, _, grads = s.run(s.params, feats, mask)
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 16
    assert out.mask.shape == out.tokens.shape[:2] and out.mask.dtype == jnp.bool_
    assert np.isfinite(np.asarray(out.tokens)).all()
    if s.module.sequence_preserving:
      assert out.tokens.shape[1] == t
      np.testing.assert_array_equal(out.mask, mask)
    assert set(out.aux_losses) == ({"routing"} if name == "hierarchical_moe" else set())
    for v in out.aux_losses.values():
      assert np.isfinite(float(v))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_reaches_real_outputs(setups, name):
  """Other garbage in padded frames and 6 more padded frames: real outputs unchanged."""
  s = setups(name)
  short = s.run(s.params, *_inputs(10, seed=0))[0]
  long = s.run(s.params, *_inputs(16, seed=5))[0]
  n = short.mask.shape[1]
  np.testing.assert_array_equal(long.mask[:, :n], short.mask)
  assert not np.asarray(long.mask[:, n:]).any()
  real = np.asarray(short.mask)
  assert real.sum() > 0
  np.testing.assert_allclose(np.asarray(long.tokens[:, :n])[real], np.asarray(short.tokens)[real],
                             atol=1e-5, rtol=1e-5)
  for k in short.aux_losses:
    np.testing.assert_allclose(float(long.aux_losses[k]), float(short.aux_losses[k]), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(setups, name):
  s = setups(name)
  again = s.init(KEY, *_inputs(10))["params"]
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(again), s.params)
  a = s.run(s.params, *_inputs(10))[0]
  b = s.run(s.params, *_inputs(10))[0]
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  for k in a.aux_losses:
    assert float(a.aux_losses[k]) == float(b.aux_losses[k])


@pytest.mark.parametrize("name", NAMES)
def test_every_param_has_logical_axis_names(setups, name):
  leaves = jax.tree.leaves(setups(name).boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert leaves and not unnamed, f"{len(unnamed)} params without logical axis names"
  for x in leaves:
    assert len(x.names) == x.value.ndim


@pytest.mark.parametrize("name", NAMES)
def test_every_param_and_every_expert_gets_gradient(setups, name):
  """From perturbed params (so zero-initialised adapters and LN scales are not special)."""
  s = setups(name)
  params = _perturbed(s.params)
  feats = np.random.default_rng(7).normal(size=(3, 16, FEATURE_DIM)).astype(np.float32)
  mask = np.ones(feats.shape[:2], bool)        # 48 real frames, 24 pooled tokens
  _, inter, grads = s.run(params, feats, mask)
  counts = jax.tree.leaves(inter.get("intermediates", {}))
  if name == "hierarchical_moe":
    assert len(counts) == 2                              # one MoE layer per stage
    for c in counts:                                     # every expert gets real tokens
      assert np.asarray(c).min() >= 1, np.asarray(c)
  names = jax.tree.leaves(s.boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(names)
  for (path, g), box in zip(flat, names):
    where = jax.tree_util.keystr(path)
    if where.endswith("['key']['bias']"):
      continue    # softmax is shift-invariant: the key bias provably gets no gradient
    g = np.abs(np.asarray(g))
    assert g.max() > 0, f"{where} gets no gradient"
    if "experts" in box.names:                           # each expert's slice separately
      per_expert = np.moveaxis(g, box.names.index("experts"), 0).reshape(g.shape[
          box.names.index("experts")], -1).max(-1)
      assert per_expert.min() > 0, f"{where}: an expert gets no gradient: {per_expert}"


def _moe_params(seed, d=6, e=4, h=8):
  """Random MoeFfn params made directly (no init compile), named as the layer names them."""
  rng = np.random.default_rng(seed)
  shapes = {"router": {"kernel": (d, e), "bias": (e,)}, "wi": (e, d, h), "bi": (e, h),
            "wo": (e, h, d), "bo": (e, d)}
  return jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32) * 0.5, shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_moe_dense_dispatch_matches_per_token_reference():
  x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  for k in (1, 2):
    layer = moe.MoeFfn(num_experts=4, top_k=k, hidden_dim=8)
    p = _moe_params(k)
    y, probs, expert_mask = jax.jit(layer.apply)({"params": p}, x, mask)
    logits = x @ p["router"]["kernel"] + p["router"]["bias"]
    ref_probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), ref_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(expert_mask).sum(-1), k)
    ref = np.zeros_like(x)
    for b in range(2):
      for t in range(5):
        top = np.argsort(-ref_probs[b, t])[:k]
        gates = ref_probs[b, t, top] / (ref_probs[b, t, top].sum() if k > 1 else 1.0)
        assert set(np.flatnonzero(np.asarray(expert_mask[b, t]))) == set(top)
        for e, gate in zip(top, gates):
          h = np.asarray(jax.nn.gelu(x[b, t] @ p["wi"][e] + p["bi"][e], approximate=False))
          ref[b, t] += gate * (h @ p["wo"][e] + p["bo"][e])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_moe_router_bias_steers_routing_and_checks_its_shape():
  x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  layer = moe.MoeFfn(num_experts=4, top_k=1, hidden_dim=8)
  variables = {"params": _moe_params(0)}
  bias = np.zeros((2, 4), np.float32)
  bias[0, 3], bias[1, 1] = 50.0, 50.0
  _, _, expert_mask = jax.jit(layer.apply)(variables, x, mask, bias)
  assert np.asarray(expert_mask[0, :, 3]).all() and np.asarray(expert_mask[1, :, 1]).all()
  with pytest.raises(ValueError, match=r"router_bias must be \[batch, num_experts\]"):
    layer.apply(variables, x, mask, np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="top_k"):
    moe.MoeFfn(num_experts=2, top_k=3, hidden_dim=8).apply(variables, x, mask)


def test_adapter_condition_starts_neutral_then_acts():
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  cond = np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)
  layer = adapters.BottleneckAdapter(bottleneck_dim=4)
  params = nn.meta.unbox(layer.init(jax.random.key(0), x, cond)["params"])
  plain = {k: v for k, v in params.items() if not k.startswith("cond_")}
  perturbed = _perturbed(params)
  # Zero-initialised FiLM: the conditioned adapter equals the unconditioned one.
  np.testing.assert_allclose(layer.apply({"params": params}, x, cond),
                             layer.apply({"params": plain}, x), rtol=1e-6)
  per_clip = layer.apply({"params": perturbed}, x, cond)
  per_frame = layer.apply({"params": perturbed}, x, np.repeat(cond[:, None], 5, axis=1))
  np.testing.assert_allclose(per_clip, per_frame, rtol=1e-5, atol=1e-6)
  unconditioned = layer.apply({"params": {k: perturbed[k] for k in plain}}, x)
  assert np.abs(np.asarray(per_clip - unconditioned)).max() > 1e-3
  with pytest.raises(ValueError, match=r"condition must be \[B, C\] or \[B, T, C\]"):
    layer.apply({"params": perturbed}, x, cond[:1])
