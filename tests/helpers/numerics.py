"""Float comparisons whose tolerance scales with the values compared.

A bare ``atol`` on values far from 1 depends on the CPU's float order: another machine (or
another XLA dot library) sums in a different order and moves a value of magnitude 8 by
~1e-5 (relative 2e-6). ``assert_close`` takes a relative tolerance plus an absolute floor
that is a fraction of the largest ``desired`` magnitude, so elements near zero inside a
tensor of large values do not fail on reordering either. Exactness checks (bitwise resume,
round trips) stay ``np.testing.assert_array_equal``.
"""
import numpy as np


def assert_close(actual, desired, *, rtol=1e-5, atol_frac=1e-6, err_msg=""):
  """``np.testing.assert_allclose`` with ``atol = atol_frac * max(|desired|)``."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol_frac * scale,
                             err_msg=err_msg)
