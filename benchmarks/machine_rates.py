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
