"""The query-based projectors (qformer family, attention resamplers) and their blocks."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.numerics import assert_close
from vsrllm_jax.models import projectors
from vsrllm_jax.models.projectors import blocks

NAMES = ["qformer", "enhanced_qformer", "blip2_qformer", "cross_attention", "perceiver",
         "adaptive_query", "fusion_refinement", "gated_cross_attention"]
TINY = dict(output_dim=16, num_queries=3, num_layers=2, num_heads=2, mlp_ratio=2,
            time_embedding_dim=8)
EXTRA = {"blip2_qformer": dict(cross_attention_frequency=2), "perceiver": dict(num_layers=1)}
B, D, N = 2, 12, 3
LENGTHS = np.array([6, 3])       # real frames per clip


def _fast_compile_options() -> dict:
  """XLA:CPU options that cut compile time ~3x on these tiny graphs (compiling, not
  running, is what takes the time here); {} where this XLA does not know them."""
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros(()))
  except (RuntimeError, ValueError):
    return {}
  return options


jit = functools.partial(jax.jit, compiler_options=_fast_compile_options())


def features(t, seed=0, garbage_seed=1):
  """[B, t, D] features whose padded frames (past LENGTHS) hold random garbage."""
  real = np.random.default_rng(seed).normal(size=(B, 9, D)).astype(np.float32)[:, :t]
  mask = np.arange(t)[None] < LENGTHS[:, None]
  garbage = 5 * np.random.default_rng(garbage_seed).normal(size=real.shape).astype(np.float32)
  return np.where(mask[..., None], real, garbage), mask


def perturb(params, seed=0, scale=0.2):
  """Noise on every leaf, so that zero-initialised gates and biases are open."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def make(name, **overrides):
  return projectors.build(name, {**TINY, **EXTRA.get(name, {}), "reconstruction": True,
                                 "name": name, **overrides})


@pytest.fixture(scope="module", params=NAMES)
def setup(request):
  """One jitted init and one jitted forward-and-backward per projector."""
  name = request.param
  module = make(name)
  init = jit(module.init)
  variables = init(jax.random.key(0), *features(6))
  params = nn.meta.unbox(variables["params"])

  @jit
  def step(params, feats, mask):
    """(output, reconstruction [B,T,D], grads of mean(tokens^2) + reconstruction loss)."""
    def loss(p):
      out, state = module.apply({"params": p}, feats, mask, mutable=["intermediates"])
      (recon,) = state["intermediates"]["reconstruction"]["reconstruction"]
      return jnp.mean(jnp.square(out.tokens)) + out.aux_losses["reconstruction"], (out, recon)
    (_, (out, recon)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, recon, grads

  forward = lambda params, feats, mask: step(params, feats, mask)[:2]
  grads = lambda params, feats, mask: step(params, feats, mask)[2]
  return dict(name=name, module=module, init=init, variables=variables, params=params,
              noisy=perturb(params), forward=forward, grads=grads)


def test_forward_and_backward_at_two_lengths(setup):
  for t in (6, 9):
    feats, mask = features(t)
    out, recon = setup["forward"](setup["noisy"], feats, mask)
    assert out.tokens.shape == (B, N, 16)
    np.testing.assert_array_equal(out.mask, np.ones((B, N), bool))
    assert recon.shape == (B, t, D)
    assert set(out.aux_losses) == {"reconstruction"}
    assert np.isfinite(np.asarray(out.tokens)).all()
    assert np.isfinite(float(out.aux_losses["reconstruction"]))
    g = setup["grads"](setup["noisy"], feats, mask)
    assert jax.tree.structure(g) == jax.tree.structure(setup["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_padding_changes_nothing(setup):
  fwd, params = setup["forward"], setup["noisy"]
  short, short_mask = features(6, garbage_seed=1)
  long, long_mask = features(9, garbage_seed=2)            # more padding, other garbage
  out_s, recon_s = fwd(params, short, short_mask)
  out_l, recon_l = fwd(params, long, long_mask)
  np.testing.assert_allclose(out_l.tokens, out_s.tokens, atol=1e-5, rtol=1e-5)
  assert_close(out_l.embeddings["pooled"], out_s.embeddings["pooled"], rtol=1e-5, atol_frac=1e-6)
  np.testing.assert_allclose(float(out_l.aux_losses["reconstruction"]),
                             float(out_s.aux_losses["reconstruction"]), rtol=1e-5)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(recon_l[b, :n], recon_s[b, :n], atol=1e-5, rtol=1e-5)
  # The converse, so the check above has teeth: a real frame does move the tokens.
  moved = short.copy()
  moved[1, LENGTHS[1] - 1] += 1.0
  assert np.abs(np.asarray(fwd(params, moved, short_mask)[0].tokens - out_s.tokens))[1].max() > 1e-4


def test_frame_order_is_visible(setup):
  """The time embedding lets the projector tell a clip from its reversal."""
  feats, mask = features(6)
  mask = np.ones_like(mask)
  rev = setup["forward"](setup["noisy"], feats[:, ::-1].copy(), mask)[0]
  full = setup["forward"](setup["noisy"], feats, mask)[0]
  assert np.abs(np.asarray(rev.tokens - full.tokens)).max() > 1e-4


def test_deterministic(setup):
  feats, mask = features(6)
  again = nn.meta.unbox(setup["init"](jax.random.key(0), feats, mask)["params"])
  other = nn.meta.unbox(setup["init"](jax.random.key(1), feats, mask)["params"])
  for a, b, c in zip(*map(jax.tree.leaves, (again, setup["params"], other))):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(a != c) for a, c in zip(*map(jax.tree.leaves, (again, other))))
  out1, recon1 = setup["forward"](setup["noisy"], feats, mask)
  out2, recon2 = setup["forward"](perturb(again), feats, mask)
  np.testing.assert_array_equal(out1.tokens, out2.tokens)
  np.testing.assert_array_equal(recon1, recon2)


def test_every_param_has_logical_axis_names(setup):
  params = setup["variables"]["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert not unnamed, f"{len(unnamed)} params without logical axis names"
  specs = jax.tree.leaves(nn.get_partition_spec(params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for spec, x in zip(specs, jax.tree.leaves(nn.meta.unbox(params))):
    assert len(spec) == x.ndim


def test_every_param_gets_a_gradient(setup):
  feats, mask = features(6)
  g = setup["grads"](setup["noisy"], feats, mask)
  flat = jax.tree_util.tree_flatten_with_path(g)[0]
  dead = [jax.tree_util.keystr(p) for p, x in flat if not np.abs(np.asarray(x)).max() > 0]
  assert not dead, f"params without gradient: {dead}"


def test_reconstruction_loss_is_the_masked_mse(setup):
  feats, mask = features(9)
  out, recon = setup["forward"](setup["noisy"], feats, mask)
  recon = np.asarray(recon, np.float64)
  errs = [np.square(recon[b, :n] - feats[b, :n]) for b, n in enumerate(LENGTHS)]
  expected = sum(e.sum() for e in errs) / (LENGTHS.sum() * D)
  np.testing.assert_allclose(float(out.aux_losses["reconstruction"]), expected, rtol=1e-5)


def test_build_checks_fields(setup):
  name = setup["name"]
  with pytest.raises(ValueError, match=r"no field\(s\) \['num_querys'\]"):
    projectors.build(name, {"output_dim": 16, "num_querys": 4})
  with pytest.raises(ValueError, match="multiple of num_heads"):
    make(name, num_heads=5).init(jax.random.key(0), *features(6))
  off = make(name, reconstruction=False)
  out, _ = jax.eval_shape(lambda: off.init_with_output(jax.random.key(0), *features(6)))
  assert out.aux_losses == {} and out.tokens.shape == (B, N, 16)
  assert not type(off).sequence_preserving and not type(off).text_aware
  half = make(name, dtype=jnp.bfloat16)
  (out, variables) = jax.eval_shape(lambda: half.init_with_output(jax.random.key(0),
                                                                  *features(6)))
  assert out.tokens.dtype == jnp.bfloat16
  assert out.aux_losses["reconstruction"].dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype("float32")}


def test_perceiver_shares_weights_across_iterations():
  shapes = {}
  for share in (False, True):
    module = make("perceiver", num_iterations=3, share_weights=share)
    out, variables = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0),
                                                                    *features(6)))
    assert out.tokens.shape == (B, N, 16)
    shapes[share] = variables["params"]
  unshared = jax.tree.leaves(nn.meta.unbox(shapes[False]["iterations"]))
  shared = jax.tree.leaves(nn.meta.unbox(shapes[True]["iteration"]))
  assert [x.shape for x in unshared] == [(3,) + x.shape for x in shared]


def test_only_gated_cross_attention_starts_blind(setup):
  """At initialisation tanh(0) = 0 closes the gates: only gated_cross_attention
  ignores the video then; every other projector reads it from the start."""
  feats, mask = features(6)
  a = setup["forward"](setup["params"], feats, mask)[0].tokens
  b = setup["forward"](setup["params"], features(6, seed=3)[0], mask)[0].tokens
  if setup["name"] == "gated_cross_attention":
    np.testing.assert_array_equal(a, b)
  else:
    assert np.abs(np.asarray(a - b)).max() > 1e-6


# One projector per block kind: QueryBlock, PostLNQueryBlock, gated CrossSelfBlock,
# JointQueryLayer.
@pytest.mark.parametrize("name", ["qformer", "blip2_qformer", "gated_cross_attention",
                                  "adaptive_query"])
def test_blocks_take_text_as_a_second_source(name):
  """A text-aware subclass (as the text_* variants will be) reads the text, masked."""
  cls = type(f"Text{name}", (projectors.get_class(name),), {"text_aware": True})
  module = cls(**{**TINY, **EXTRA.get(name, {}), "num_layers": 1})
  feats, mask = features(6)
  rng = np.random.default_rng(5)
  text = rng.normal(size=(B, 4, 16)).astype(np.float32)
  text_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  hidden = text.copy()
  hidden[1, 2:] = 7.0                                       # masked text positions
  seen = text.copy()
  seen[1, 0] += 1.0

  @jit
  def run(texts):                                           # one compile: init, then apply
    variables = module.init(jax.random.key(0), feats, mask, text=texts[0], text_mask=text_mask)
    params = {"params": perturb(nn.meta.unbox(variables["params"]))}
    return jax.vmap(lambda t: module.apply(params, feats, mask, text=t,
                                           text_mask=text_mask).tokens)(texts)

  base, masked, moved = np.asarray(run(np.stack([text, hidden, seen])))
  np.testing.assert_allclose(masked, base, atol=1e-5, rtol=1e-5)
  assert np.abs(moved - base)[1].max() > 1e-4
  with pytest.raises(ValueError, match="text-aware"):
    module.init(jax.random.key(0), feats, mask)


def test_masked_mse_against_numpy():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(3, 5, 4)).astype(np.float32)
  target = rng.normal(size=(3, 5, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  expected = np.mean(np.square(pred - target)[mask])
  np.testing.assert_allclose(float(blocks.masked_mse(pred, target, mask)), expected, rtol=1e-6)
  assert float(blocks.masked_mse(pred, target, np.zeros_like(mask))) == 0.0
