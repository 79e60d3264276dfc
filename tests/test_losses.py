"""Losses against direct NumPy computations, and the loss-weight checks."""
import numpy as np
import pytest

from vsrllm_jax.models import contrastive
from vsrllm_jax.training import losses


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_lm_cross_entropy_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  lp = _np_log_softmax(logits, -1)
  want = -np.take_along_axis(lp, targets[..., None], -1)[..., 0][mask].mean()
  got = float(losses.lm_cross_entropy(logits, targets, mask))
  assert got == pytest.approx(want, rel=1e-5)
  logits2 = logits.copy()
  logits2[0, 3] = 100.0           # a padded position cannot matter
  assert float(losses.lm_cross_entropy(logits2, targets, mask)) == pytest.approx(got, rel=1e-6)


def test_label_smoothing_is_fairseqs_eps_over_vocab():
  """fairseq's label_smoothed_nll_loss: (1 - eps) * nll + eps / V * sum_v(-log p_v).
  By hand: p = (3/4, 1/4), target 0, eps = 0.2:
  0.8 * ln(4/3) + 0.1 * (ln(4/3) + ln 4) = ln(4/3) + 0.1 * ln 3."""
  logits = np.array([[[np.log(3.0), 0.0]]], np.float32)
  got = float(losses.lm_cross_entropy(logits, np.array([[0]]), np.ones((1, 1), bool), 0.2))
  assert got == pytest.approx(np.log(4 / 3) + 0.1 * np.log(3), rel=1e-6)
  # Against NumPy with padding, and eps = 0 is the plain loss bit for bit.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  lp = _np_log_softmax(logits.astype(np.float64), -1)
  nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
  want = (0.9 * nll - 0.1 / 7 * lp.sum(-1))[mask].mean()
  assert float(losses.lm_cross_entropy(logits, targets, mask, 0.1)) == pytest.approx(want,
                                                                                     rel=1e-5)
  assert (np.asarray(losses.lm_cross_entropy(logits, targets, mask, 0.0)).tobytes()
          == np.asarray(losses.lm_cross_entropy(logits, targets, mask)).tobytes())


def test_label_smoothing_config_key_is_checked():
  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  assert losses.label_smoothing(config) == 0.0
  del config["loss"]                       # a run's config.json from before the key
  assert losses.label_smoothing(config) == 0.0
  config = common.get_base_config()
  config.loss.label_smoothing = 1.0
  with pytest.raises(ValueError, match=r"config\.loss\.label_smoothing=1\.0 must be in \[0, 1\)"):
    losses.label_smoothing(config)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  an = a / np.linalg.norm(a, axis=1, keepdims=True)
  bn = b / np.linalg.norm(b, axis=1, keepdims=True)
  sim = an @ bn.T / 0.2
  l_ab = -np.diag(_np_log_softmax(sim, 1))
  l_ba = -np.diag(_np_log_softmax(sim, 0))
  want = (0.5 * (l_ab + l_ba)).mean()
  assert float(contrastive.info_nce(a, b, 0.2)) == pytest.approx(want, rel=1e-4)
  valid = np.array([1, 1, 1, 0, 0], bool)
  sim3 = sim[:3, :3]
  want3 = (0.5 * (-np.diag(_np_log_softmax(sim3, 1)) - np.diag(_np_log_softmax(sim3, 0)))).mean()
  assert float(contrastive.info_nce(a, b, 0.2, valid)) == pytest.approx(want3, rel=1e-4)


def test_weighted_total_and_name_checks():
  named = {"lm": np.float32(2.0), "contrastive": np.float32(1.0)}
  assert float(losses.weighted_total(named, {"lm": 1.0, "contrastive": 0.5})) == 2.5
  with pytest.raises(ValueError, match="contrastive.*no weight"):
    losses.weighted_total(named, {"lm": 1.0})
  with pytest.raises(ValueError, match="routing.*which no part"):
    losses.weighted_total({"lm": np.float32(1)}, {"lm": 1.0, "routing": 0.1})
