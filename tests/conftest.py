"""Test setup: 8 simulated CPU devices (set before jax is imported)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def torch_single_thread():
  """Tiny torch ops are far slower multi-threaded when XLA's threads share the cores."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def encoded():
  """The padded batch every PyTorch-port parity test reads (``torch_port_parity``), built
  once for all of them; read-only (tests copy before they change it)."""
  from tests.helpers.torch_port_parity import encoded_batch  # pylint: disable=g-import-not-at-top
  return encoded_batch()
