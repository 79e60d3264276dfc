"""Joining a multi-host run: ``jax.distributed.initialize`` for the ``--distributed`` flag."""
from __future__ import annotations

import os

import jax
from absl import app

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(environ=None) -> None:
  """``jax.distributed.initialize`` for ``--distributed``.

  TPU pods, Slurm and Open MPI need no arguments. Other GPU clusters
  (launch/gpu_multinode.sh) set all three DISTRIBUTED_ENV variables: jax reads
  only the coordinator address from the environment, so the process count and
  id are passed here, with cluster auto-detection off (Slurm's would narrow
  each process to one GPU; each process keeps all GPUs of its node).
  """
  environ = os.environ if environ is None else environ
  given = {k: environ.get(k, "") for k in DISTRIBUTED_ENV}
  if not any(given.values()):
    jax.distributed.initialize()
    return
  missing = [k for k, v in given.items() if not v]
  if missing:
    raise app.UsageError(f"--distributed: {', '.join(missing)} not set (set all of "
                     f"{', '.join(DISTRIBUTED_ENV)} or none)")
  try:
    num, pid = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError as e:
    raise app.UsageError("--distributed: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
                     f"integers ({e})") from e
  jax.distributed.initialize(coordinator_address=given["JAX_COORDINATOR_ADDRESS"],
                             num_processes=num, process_id=pid,
                             cluster_detection_method="deactivate")
