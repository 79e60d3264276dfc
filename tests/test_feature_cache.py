"""The feature cache: keys that change with what matters, atomic entries."""
import json
import os

import numpy as np
import pytest

from vsrllm_jax.data import feature_cache

BASE = dict(encoder_digest="abc", encoder_config={"hidden_dim": 8}, data_fingerprint="f1",
            split="train", preprocessing={"pixel_mean": 0.421})


def test_tree_digest_sees_every_value():
  tree = {"a": np.zeros((2, 2), np.float32), "b": {"c": np.ones(3)}}
  d = feature_cache.tree_digest(tree)
  assert d == feature_cache.tree_digest({"b": {"c": np.ones(3)}, "a": np.zeros((2, 2), np.float32)})
  changed = {"a": np.zeros((2, 2), np.float32), "b": {"c": np.array([1, 1, 1.0001])}}
  assert feature_cache.tree_digest(changed) != d
  assert feature_cache.tree_digest({**tree, "a": tree["a"].astype(np.float16)}) != d


@pytest.mark.parametrize("field,value", [("encoder_digest", "abd"),
                                         ("encoder_config", {"hidden_dim": 9}),
                                         ("data_fingerprint", "f2"), ("split", "test"),
                                         ("preprocessing", {"pixel_mean": 0.5})])
def test_cache_key_changes_with_each_input(field, value):
  assert feature_cache.cache_key(**{**BASE, field: value}) != feature_cache.cache_key(**BASE)


def test_build_or_load_computes_once_and_never_leaves_a_partial_entry(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    for i in range(3):
      yield dict(id=f"id{i}", text=f"text {i}", features=np.full((i + 1, 4), i, np.float32),
                 task="vsr", cluster_counts=np.ones(i + 1, np.int32))

  entry = str(tmp_path / "key1")
  src = feature_cache.build_or_load(entry, compute)
  assert len(src) == 3 and src.feature_dim == 4
  rec = src[2]
  assert rec["id"] == "id2" and rec["features"].shape == (3, 4) and rec["num_frames"] == 3
  np.testing.assert_array_equal(rec["features"], 2.0)
  np.testing.assert_array_equal(src[0]["features"], np.zeros((1, 4)))   # ragged, no padding
  assert rec["task"] == "vsr" and rec["cluster_counts"].tolist() == [1, 1, 1]
  np.testing.assert_array_equal(src.lengths, [1, 2, 3])
  feature_cache.build_or_load(entry, compute)
  assert len(calls) == 1

  def broken():
    yield dict(id="x", text="y", features=np.zeros((1, 4), np.float32))
    raise RuntimeError("encoder crashed")

  with pytest.raises(RuntimeError):
    feature_cache.build_or_load(str(tmp_path / "key2"), broken)
  assert sorted(os.listdir(tmp_path)) == ["key1"]
  assert json.load(open(os.path.join(entry, "records.json")))["ids"] == ["id0", "id1", "id2"]
