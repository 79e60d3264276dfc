"""What this machine's XLA can do at best: the rates the benchmarks' floors are built from."""
import statistics
import time

import numpy as np


def median_time(fn, runs: int = 15) -> float:
  fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_flops_per_s(m: int, k: int, n: int) -> float:
  """FLOP/s of one jitted fp32 [m, k] @ [k, n] (for m in the hundreds: the compute peak)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((m, k), np.float32))
  w = jnp.asarray(rng.random((k, n), np.float32))
  mm = jax.jit(jnp.matmul)
  return 2 * m * k * n / median_time(lambda: mm(x, w).block_until_ready())


def weight_bytes_per_s(rows: int, k: int, n: int) -> float:
  """Bytes of weights per second through a skinny fp32 [rows, k] @ [k, n] (decode steps)."""
  return 4 * k * n * matmul_flops_per_s(rows, k, n) / (2 * rows * k * n)


def time_train_step(config, batch, *, warmup: int, steps: int):
  """Builds the config's model, state and jitted train step on the default mesh and times it.

  ``batch``: host arrays. Returns (compile seconds, per-step seconds of the
  ``steps`` timed steps after ``warmup`` untimed ones).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models import build as build_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import state as state_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh.shape)
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  step = step_lib.make_train_step(model, config, layout)
  batch = sharding.global_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return compile_s, times
