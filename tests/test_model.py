"""The composed model: padding invariance, label isolation, logical axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import deduplication
from vsrllm_jax.models.vsr_model import previous_real_index

# A per-frame, a query-pooling and a convolutional resampling projector.
PROJECTORS = ["mlp", "multiscale_contrastive", "conv_abstractor"]


@pytest.fixture(scope="module", params=PROJECTORS)
def setup(request):
  config = tiny_config(request.param)
  model = build_lib.build_model(config)
  batch = random_batch(config, 2)
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  apply = jax.jit(lambda v, b: model.apply(v, b)["logits"])
  return config, model, variables, batch, apply


def _repad(batch, key, new_len):
  """Moves each row's real entries of segment ``key`` into a segment of ``new_len``."""
  mask_key = {"video": "video_mask", "instruction_ids": "instruction_mask",
              "label_ids": "label_mask"}[key]
  out = dict(batch)
  vals, mask = batch[key], batch[mask_key]
  new_vals = np.zeros((vals.shape[0], new_len) + vals.shape[2:], vals.dtype)
  new_mask = np.zeros((vals.shape[0], new_len), bool)
  for i in range(vals.shape[0]):
    real = vals[i][mask[i]]
    new_vals[i, :len(real)] = real
    new_mask[i, :len(real)] = True
  out[key], out[mask_key] = new_vals, new_mask
  return out


def _real_label_logits(logits, batch):
  return [np.asarray(logits[i])[batch["label_mask"][i]] for i in range(len(logits))]


@pytest.mark.parametrize("segment,extra", [("instruction_ids", 3), ("video", 5),
                                           ("label_ids", 4)])
def test_padding_in_any_segment_does_not_change_logits(setup, segment, extra):
  _, _, variables, batch, apply = setup
  base = apply(variables, batch)
  padded_batch = _repad(batch, segment, batch[segment].shape[1] + extra)
  padded = apply(variables, padded_batch)
  for a, b in zip(_real_label_logits(base, batch), _real_label_logits(padded, padded_batch)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_holes_inside_a_segment_do_not_change_logits(setup):
  _, _, variables, batch, apply = setup
  base = apply(variables, batch)
  # Insert a padded hole after the first instruction token of every row.
  holed = dict(batch)
  ids, mask = batch["instruction_ids"], batch["instruction_mask"]
  holed["instruction_ids"] = np.concatenate([ids[:, :1], np.full((2, 2), 7, np.int32), ids[:, 1:]], 1)
  holed["instruction_mask"] = np.concatenate([mask[:, :1], np.zeros((2, 2), bool), mask[:, 1:]], 1)
  np.testing.assert_allclose(np.asarray(apply(variables, holed))[batch["label_mask"]],
                             np.asarray(base)[batch["label_mask"]], atol=1e-5, rtol=1e-5)


def test_projector_never_sees_labels(setup):
  _, model, variables, batch, _ = setup
  @jax.jit
  def tokens(b):
    _, state = model.apply(variables, b, mutable=["intermediates"])
    return state["intermediates"]["projector_tokens"][0]
  other = dict(batch, label_ids=(batch["label_ids"] + 1) % 40)
  np.testing.assert_array_equal(tokens(batch), tokens(other))


def test_every_param_has_logical_axis_names(setup):
  _, _, variables, _, _ = setup
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert not unnamed, f"{len(unnamed)} params without logical axis names"


def test_previous_real_index():
  mask = jnp.array([[1, 1, 0, 1, 0, 1]], bool)
  np.testing.assert_array_equal(previous_real_index(mask), [[0, 0, 1, 1, 3, 3]])


def test_deduplication_averages_runs_per_sample():
  tokens = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5, 1)
  mask = jnp.ones((2, 5), bool)
  counts = jnp.array([[2, 3, 0, 0, 0], [1, 1, 1, 2, 0]])
  out, out_mask = deduplication.average_runs(tokens, mask, counts)
  np.testing.assert_allclose(out[0, :2, 0], [0.5, 3.0])
  np.testing.assert_allclose(out[1, :4, 0], [5, 6, 7, 8.5])
  np.testing.assert_array_equal(out_mask, [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])


def test_cached_features_give_the_same_logits_as_video(setup):
  _, model, variables, batch, apply = setup
  from vsrllm_jax.models.vsr_model import VSRModel
  feats, mask = jax.jit(lambda v, b: model.apply(v, b, method=VSRModel.encode))(variables, batch)
  cached = {k: v for k, v in batch.items() if k not in ("video", "video_mask")}
  cached.update(features=np.asarray(feats), features_mask=np.asarray(mask))
  np.testing.assert_allclose(np.asarray(apply(variables, cached)),
                             np.asarray(apply(variables, batch)), atol=1e-5, rtol=1e-5)
