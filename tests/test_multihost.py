"""Two real CPU processes on localhost joined by jax.distributed (tests/helpers/multihost_worker.py).

Each reads its own shard of the global batch, the global batch is assembled
from them, one train step runs over both processes' devices, and orbax saves
and restores the state from both. The loss must equal that of one process
holding all four devices and the whole batch.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(process_id, num_processes, devices, port, workdir, out):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, "-m", "tests.helpers.multihost_worker", str(process_id), str(num_processes),
       str(port), str(workdir), str(out)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=600):
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  procs = [_launch(i, 2, 2, port, tmp / "two", tmp / f"two_{i}.json") for i in range(2)]
  procs.append(_launch(0, 1, 4, 0, tmp / "one", tmp / "one.json"))
  _wait(procs)
  read = lambda name: json.loads((tmp / name).read_text())
  return [read("two_0.json"), read("two_1.json")], read("one.json")


def test_processes_join_and_each_reads_its_own_shard(runs):
  hosts, single = runs
  assert [h["process_index"] for h in hosts] == [0, 1]
  assert all(h["process_count"] == 2 and h["devices"] == 4 and h["local_devices"] == 2
             for h in hosts)
  first, second = hosts[0]["ids"], hosts[1]["ids"]
  assert len(first) == len(second) == 4 and not set(first) & set(second)
  # Together the hosts read exactly the global batch one process reads alone:
  # grain hands stream positions p, p + 2, ... to process p.
  assert first == single["ids"][0::2] and second == single["ids"][1::2]


def test_global_step_loss_equals_the_single_process_loss(runs):
  hosts, single = runs
  assert hosts[0]["loss"] == hosts[1]["loss"]
  assert hosts[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)
  # Params really are split across the processes' devices (fsdp over 2 of them).
  assert hosts[0]["embedding_spec"] == single["embedding_spec"]
  assert "fsdp" in hosts[0]["embedding_spec"]


def test_orbax_saves_and_restores_from_both_processes(runs):
  hosts, _ = runs
  assert all(h["restored_equal"] and h["restored_step"] == 1 for h in hosts)


def test_distributed_settings_from_the_environment_must_be_complete():
  from absl import app  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import distributed  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
    distributed.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  with pytest.raises(app.UsageError, match="must be integers"):
    distributed.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                                  "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
