"""The MoE routing loss (CV^2 of importance + Switch load balancing) against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsrllm_jax.models.projectors import moe


def _numpy_terms(probs, dispatch, token_mask):
  """Direct computation over the list of real tokens only."""
  real = token_mask.astype(bool)
  p = probs[real].astype(np.float64)                   # [n, E]
  d = dispatch[real].astype(np.float64)
  num_experts = p.shape[1]
  importance = p.sum(0)
  cv2 = importance.var() / importance.mean() ** 2
  f = d.sum(0) / d.sum()
  load_balance = num_experts * np.sum(f * p.mean(0))
  return cv2, load_balance


def _random_routing(seed, b=3, s=7, e=4, k=2):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, s, e)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[..., :k]
  dispatch = np.zeros_like(probs)
  np.put_along_axis(dispatch, top, 1.0, axis=-1)
  token_mask = np.arange(s)[None] < np.array([7, 4, 2])[:, None]
  return probs.astype(np.float32), dispatch.astype(np.float32), token_mask


@pytest.mark.parametrize("k", [1, 2])
def test_matches_numpy(k):
  probs, dispatch, token_mask = _random_routing(0, k=k)
  cv2, lb = _numpy_terms(probs, dispatch, token_mask)
  terms = moe.routing_terms(probs, dispatch, token_mask)
  np.testing.assert_allclose(float(terms["cv2"]), cv2, rtol=1e-5)
  np.testing.assert_allclose(float(terms["load_balance"]), lb, rtol=1e-5)
  np.testing.assert_allclose(float(moe.routing_loss(probs, dispatch, token_mask)), cv2 + lb,
                             rtol=1e-5)
  assert cv2 > 1e-3 and lb > 1.0       # random routing is not balanced


def test_padded_tokens_are_ignored():
  probs, dispatch, token_mask = _random_routing(1)
  base = float(moe.routing_loss(probs, dispatch, token_mask))
  # Garbage at padded positions: all mass on expert 0, dispatched to expert 0 only.
  probs2, dispatch2 = probs.copy(), dispatch.copy()
  probs2[~token_mask] = [1.0, 0.0, 0.0, 0.0]
  dispatch2[~token_mask] = [1.0, 0.0, 0.0, 0.0]
  assert float(moe.routing_loss(probs2, dispatch2, token_mask)) == pytest.approx(base, rel=1e-6)
  # Extra padded positions change nothing either.
  pad = lambda a: np.pad(a, ((0, 0), (0, 5)) + ((0, 0),) * (a.ndim - 2), constant_values=1)
  padded = moe.routing_loss(pad(probs2), pad(dispatch2), pad(token_mask) & (np.arange(12) < 7))
  assert float(padded) == pytest.approx(base, rel=1e-6)
  # Counting the padded tokens would change it.
  assert abs(float(moe.routing_loss(probs2, dispatch2, np.ones_like(token_mask))) - base) > 1e-2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balanced_routing_gives_cv2_zero_and_load_balance_one(k):
  """Uniform probs, round-robin dispatch: CV^2 = 0 and load balance = 1 for any top_k."""
  e, s = 4, 8
  probs = np.full((2, s, e), 1.0 / e, np.float32)
  dispatch = np.zeros((2, s, e), np.float32)
  for t in range(s):
    for j in range(k):
      dispatch[:, t, (t + j) % e] = 1.0
  terms = moe.routing_terms(probs, dispatch, np.ones((2, s), bool))
  assert float(terms["cv2"]) == pytest.approx(0.0, abs=1e-7)
  assert float(terms["load_balance"]) == pytest.approx(1.0, rel=1e-6)


def test_collapsed_routing_is_penalised_maximally():
  """All tokens on one expert with probability 1: CV^2 = E - 1, load balance = E."""
  e = 4
  probs = np.zeros((2, 5, e), np.float32)
  probs[..., 2] = 1.0
  terms = moe.routing_terms(probs, probs, np.ones((2, 5), bool))
  assert float(terms["cv2"]) == pytest.approx(e - 1, rel=1e-6)
  assert float(terms["load_balance"]) == pytest.approx(e, rel=1e-6)


def test_gradient_reaches_probs_but_not_dispatch():
  probs, dispatch, token_mask = _random_routing(2)
  gp, gd = jax.grad(lambda p, d: moe.routing_loss(p, d, token_mask), argnums=(0, 1))(
      jnp.asarray(probs), jnp.asarray(dispatch))
  assert np.abs(np.asarray(gp)[token_mask]).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(gp)[~token_mask], 0.0)
  np.testing.assert_array_equal(np.asarray(gd), 0.0)


def test_no_real_tokens_is_finite():
  probs, dispatch, _ = _random_routing(3)
  loss = moe.routing_loss(probs, dispatch, np.zeros(probs.shape[:2], bool))
  assert np.isfinite(float(loss))
