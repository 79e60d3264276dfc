#!/usr/bin/env bash
# Runs the train command on every worker of a TPU VM (single host or pod).
#
#   TPU_NAME=my-tpu ZONE=us-central2-b REPO_URL=<your clone URL> \
#     launch/tpu_vm.sh configs/conv_abstractor.py gs://bucket/runs/exp1 [--config.x=y ...]
#
# Every worker installs the pinned requirements (once), then all start the same
# command; --distributed makes them join through jax.distributed.initialize().
# The workdir must be shared storage (a GCS bucket) so that orbax can write and
# read checkpoints from all hosts.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d vsrllm_jax ] || git clone $REPO_URL vsrllm_jax
  cd vsrllm_jax && git pull --ff-only
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
  pip install -q 'jax[tpu]==0.10.2' && pip install -q -r requirements.txt
  python -m vsrllm_jax.train --distributed --config=$CONFIG --workdir=$WORKDIR $EXTRA
"
