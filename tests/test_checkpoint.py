"""Orbax checkpoints: exact round trip, best kept apart, crash-safe saves."""
import os
import subprocess
import sys
import textwrap

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsrllm_jax.run import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loader():
  return grain.DataLoader(
      data_source=grain.RangeDataSource(0, 100, 1),
      sampler=grain.IndexSampler(100, shard_options=grain.NoSharding(), shuffle=True, seed=3,
                                 num_epochs=None),
      operations=[grain.Batch(4)], worker_count=0)


def _state(seed):
  k = jax.random.key(seed)
  return {"step": jnp.int32(seed), "params": {"w": jax.random.normal(k, (5, 3)),
                                              "b": jnp.arange(3, dtype=jnp.bfloat16)}}


def test_round_trip_is_exact_and_restores_the_data_iterator(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  it = iter(_loader())
  for _ in range(3):
    next(it)
  state = _state(1)
  ckpts.save(3, state, it)
  want_next = [next(it) for _ in range(2)]

  it2 = iter(_loader())
  restored, meta = ckpts.restore(3, checkpoint.abstract_like(state))
  ckpts.restore_data(3, it2)
  assert meta["step"] == 3 and meta["format_version"] == checkpoint.FORMAT_VERSION
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  for want in want_next:
    np.testing.assert_array_equal(next(it2), want)


def test_keep_k_never_deletes_the_best(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  it = iter(_loader())
  for step, wer in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6), (5, 0.45)]:
    ckpts.save(step, _state(step), it)
    ckpts.save_best(step, _state(step), wer)
  assert ckpts.latest.all_steps() == [4, 5]
  assert ckpts.best.best_step() == 2
  restored, meta = ckpts.restore(2, checkpoint.abstract_like(_state(2)), best=True)
  assert meta["val/wer"] == 0.3
  np.testing.assert_array_equal(restored["params"]["w"], _state(2)["params"]["w"])


def test_crash_during_save_leaves_previous_checkpoint_latest(tmp_path):
  # The child saves step 1, then dies (SIGKILL) in the middle of saving step 2:
  # the data iterator's state is read while orbax writes the checkpoint.
  code = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {REPO!r})
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax.numpy as jnp
      from test_checkpoint import _loader, _state
      from vsrllm_jax.run import checkpoint
      ckpts = checkpoint.Checkpoints({str(tmp_path)!r}, keep=3)
      it = iter(_loader())
      next(it)
      ckpts.save(1, _state(1), it)

      class Bomb:
        def __init__(self, inner): self.inner = inner
        def get_state(self):
          os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name): return getattr(self.inner, name)
      ckpts.save(2, _state(2), Bomb(it))
      print("not reached")
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert "not reached" not in proc.stdout
  half_written = [p for p in os.listdir(tmp_path / checkpoint.LATEST_DIR) if "tmp" in p]
  assert half_written, "the child should have died with step 2 half written"
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  assert ckpts.latest_step() == 1
  restored, _ = ckpts.restore(1, checkpoint.abstract_like(_state(1)))
  ckpts.restore_data(1, iter(_loader()))
  np.testing.assert_array_equal(restored["params"]["w"], _state(1)["params"]["w"])
  leftovers = [p for p in os.listdir(tmp_path / checkpoint.LATEST_DIR) if p != "1"]
  assert leftovers == [], leftovers   # the half-written step 2 was cleaned up


def test_weights_alone_restore_without_optimizer_or_data_state(tmp_path):
  """What inference reads: params and model state only, from a checkpoint that holds more."""
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  state = dict(_state(4), opt_state={"mu": jnp.ones((5, 3))}, model_state={})
  ckpts.save(4, state, iter(_loader()))
  abstract = checkpoint.abstract_like({"params": state["params"], "model_state": {}})
  weights, meta = ckpts.restore_weights(4, abstract)
  assert set(weights) == {"params", "model_state"} and meta["step"] == 4
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(weights["params"])):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  ckpts.close()


def test_select_names_what_exists(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  with pytest.raises(FileNotFoundError, match="holds no checkpoint; pass --step"):
    ckpts.select(None)
  ckpts.save(2, _state(2), None)
  ckpts.save_best(2, _state(2), 0.5)
  assert ckpts.select(None) == (2, True) and ckpts.select(2) == (2, False)
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 .* have \[2\]"):
    ckpts.select(7)
  ckpts.close()
