#!/usr/bin/env bash
# Multi-node GPU training: run this once on every node (one process per node, all
# of its GPUs); the processes join through jax.distributed.initialize().
#
#   COORDINATOR_ADDRESS=10.0.0.1:8476 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/shared/run \
#     launch/gpu_multinode.sh [extra train flags, e.g. --config.total_steps=50]
#   srun --nodes=2 --ntasks-per-node=1 env WORKDIR=/shared/run launch/gpu_multinode.sh
#
# Environment (defaults in brackets; launch/README.md has the details):
#   COORDINATOR_ADDRESS host:port of process 0 [Slurm: first host of SLURM_JOB_NODELIST
#                       : COORDINATOR_PORT, which defaults to 61440 + SLURM_JOB_ID % 4096]
#   NUM_PROCESSES       [Slurm: SLURM_NTASKS]    PROCESS_ID  [Slurm: SLURM_PROCID]
#   CONFIG [configs/conv_abstractor.py]  WORKDIR [required]  PYTHON [python]  VSRLLM_DATA_DIR
#   DRY_RUN [0]: 1 prints the environment and the command instead of running it.
# Relative paths are relative to the repository root (the command runs there).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=${CONFIG:-configs/conv_abstractor.py}
WORKDIR=${WORKDIR:-}
PYTHON=${PYTHON:-python}

# First host of a Slurm node list: node[001-004,007],gpu2 -> node001.
first_slurm_host() {
  local list=$1 host
  if command -v scontrol >/dev/null 2>&1; then
    host=$(scontrol show hostnames "$list" | sed -n 1p)
  else
    local head=${list%%,*}
    if [[ $list =~ ^([^,\[]*)\[([^],-]*) ]]; then
      head=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
    fi
    host=$head
  fi
  [[ -n $host ]] || vsr_die "cannot read a host name from SLURM_JOB_NODELIST='$list'"
  echo "$host"
}

from_slurm=()
if [[ -z ${NUM_PROCESSES:-} && -n ${SLURM_NTASKS:-} ]]; then
  NUM_PROCESSES=$SLURM_NTASKS
  from_slurm+=(NUM_PROCESSES)
fi
if [[ -z ${PROCESS_ID:-} && -n ${SLURM_PROCID:-} ]]; then
  PROCESS_ID=$SLURM_PROCID
  from_slurm+=(PROCESS_ID)
fi
if [[ -z ${COORDINATOR_ADDRESS:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
  port=${COORDINATOR_PORT:-}
  if [[ -z $port && -n ${SLURM_JOB_ID:-} ]]; then
    vsr_require_int SLURM_JOB_ID "$SLURM_JOB_ID"
    port=$(( 61440 + SLURM_JOB_ID % 4096 ))   # the same port on every node of the job
  fi
  [[ -n $port ]] || vsr_die "set COORDINATOR_PORT (or SLURM_JOB_ID) to build COORDINATOR_ADDRESS" \
      "from SLURM_JOB_NODELIST"
  COORDINATOR_ADDRESS=$(first_slurm_host "$SLURM_JOB_NODELIST"):$port
  from_slurm+=(COORDINATOR_ADDRESS)
fi

missing=()
for name in COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR; do
  [[ -n ${!name:-} ]] || missing+=("$name")
done
if (( ${#missing[@]} )); then
  vsr_die "missing ${missing[*]}: set COORDINATOR_ADDRESS (host:port of process 0)," \
      "NUM_PROCESSES and PROCESS_ID (or run under Slurm's srun, which provides SLURM_NTASKS," \
      "SLURM_PROCID and SLURM_JOB_NODELIST), and WORKDIR (a path every node shares)"
fi
vsr_require_int NUM_PROCESSES "$NUM_PROCESSES"
vsr_require_int PROCESS_ID "$PROCESS_ID"
(( NUM_PROCESSES >= 1 )) || vsr_die "NUM_PROCESSES must be at least 1, got $NUM_PROCESSES"
(( PROCESS_ID < NUM_PROCESSES )) || \
    vsr_die "PROCESS_ID=$PROCESS_ID is not below NUM_PROCESSES=$NUM_PROCESSES"
[[ $COORDINATOR_ADDRESS =~ ^[^:]+:[0-9]+$ || $COORDINATOR_ADDRESS =~ ^\[.*\]:[0-9]+$ ]] || \
    vsr_die "COORDINATOR_ADDRESS must be host:port, got '$COORDINATOR_ADDRESS'"
nodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}
if [[ " ${from_slurm[*]} " == *" NUM_PROCESSES "* && -n $nodes && $nodes != "$NUM_PROCESSES" ]]
then
  vsr_die "SLURM_NTASKS=$NUM_PROCESSES tasks on $nodes nodes: run one task per node" \
      "(srun --ntasks-per-node=1); each process drives all GPUs of its node"
fi

# JAX_COORDINATOR_ADDRESS is read by jax.distributed.initialize() itself; the
# process count and id are passed on by vsrllm_jax.train (see launch/README.md).
export JAX_COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS
export JAX_NUM_PROCESSES=$NUM_PROCESSES
export JAX_PROCESS_ID=$PROCESS_ID
cmd=("$PYTHON" -m vsrllm_jax.train --config="$CONFIG" --workdir="$WORKDIR" --distributed "$@")
cd "$VSR_REPO_ROOT"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  for name in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID VSRLLM_DATA_DIR; do
    [[ -n ${!name:-} ]] && echo "export $name=$(vsr_quote "${!name}")"
  done
  (( ${#from_slurm[@]} )) && echo "# from Slurm: ${from_slurm[*]}"
  echo "+ cd $(vsr_quote "$VSR_REPO_ROOT")"
  echo "+ $(vsr_quote "${cmd[@]}")"
  exit 0
fi
exec "${cmd[@]}"
