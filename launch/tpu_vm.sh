#!/usr/bin/env bash
# Cloud TPU VM lifecycle with gcloud: one script for a single host and for a pod
# slice (every remote step runs with --worker=all, i.e. on each host).
#
#   launch/tpu_vm.sh [--dry-run] create [extra gcloud create flags]
#   launch/tpu_vm.sh [--dry-run] setup
#   launch/tpu_vm.sh [--dry-run] train [extra train flags, e.g. --config.total_steps=50]
#   launch/tpu_vm.sh [--dry-run] ssh 'shell command'   (on every worker, e.g. to mount a bucket)
#   launch/tpu_vm.sh [--dry-run] delete
#
# Environment (defaults in brackets; launch/README.md has the details):
#   TPU_NAME [vsrllm]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-8]  PROJECT [gcloud's]
#   RUNTIME_VERSION [by accelerator: v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
#                    v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]   SPOT [0]
#   NUM_HOSTS [from ACCELERATOR_TYPE]  DISTRIBUTED [auto: --distributed when NUM_HOSTS > 1]
#   REPO_URL [''  = copy this checkout's files]  GIT_REF ['']  REMOTE_DIR [vsrllm_jax, in ~]
#   PYTHON [python3.11]
#   CONFIG [configs/conv_abstractor.py]  WORKDIR [required for train]  VSRLLM_DATA_DIR
#   DRY_RUN [0]: 1 (or --dry-run) prints the commands instead of running them.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {   # the header comment above
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  exit 2
}

if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
[[ $# -ge 1 ]] || usage
SUBCOMMAND=$1
shift

TPU_NAME=${TPU_NAME:-vsrllm}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
GIT_REF=${GIT_REF:-}
REMOTE_DIR=${REMOTE_DIR:-vsrllm_jax}
PYTHON=${PYTHON:-python3.11}
CONFIG=${CONFIG:-configs/conv_abstractor.py}
WORKDIR=${WORKDIR:-}
DATA_DIR=${VSRLLM_DATA_DIR:-}
DISTRIBUTED=${DISTRIBUTED:-auto}

# The TPU software version Google recommends for JAX on each generation.
default_runtime_version() {
  case $1 in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) vsr_die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1 (expected v2-*, v3-*, v4-*," \
               "v5litepod-*, v5p-* or v6e-*): set RUNTIME_VERSION" ;;
  esac
}

# Hosts in a slice: v2/v3/v4/v5p sizes count TensorCores (8 per host), v5e/v6e
# sizes count chips (up to 8 on one host, 4 per host in multi-host slices).
default_num_hosts() {
  local size=${1##*-}
  [[ $size =~ ^[0-9]+$ ]] || vsr_die "ACCELERATOR_TYPE=$1: expected <generation>-<size>, e.g. v4-8"
  case $1 in
    v2-*|v3-*|v4-*|v5p-*) echo $(( size <= 8 ? 1 : size / 8 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( size <= 8 ? 1 : size / 4 )) ;;
    *) vsr_die "cannot tell the host count of ACCELERATOR_TYPE=$1: set NUM_HOSTS" ;;
  esac
}

RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
NUM_HOSTS=${NUM_HOSTS:-$(default_num_hosts "$ACCELERATOR_TYPE")}
vsr_require_int NUM_HOSTS "$NUM_HOSTS"
(( NUM_HOSTS >= 1 )) || vsr_die "NUM_HOSTS must be at least 1, got $NUM_HOSTS"

TPU_FLAGS=(--zone="$ZONE")
[[ -n $PROJECT ]] && TPU_FLAGS+=(--project="$PROJECT")

remote() {   # runs the given shell steps, joined by '; ', on every worker
  local steps
  steps=$(printf '%s; ' "$@")
  vsr_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all \
    --command="set -e; ${steps%; }"
}

no_extra_args() {
  [[ $# -eq 0 ]] || vsr_die "'$SUBCOMMAND' takes no extra arguments, got: $*"
}

cmd_create() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 ]] && flags+=(--spot)
  vsr_run gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" "${flags[@]}" "$@"
}

# Code onto every worker: a clone of REPO_URL, or this checkout's tracked and
# untracked-but-not-ignored files as a tarball (no .venv, no data, no .git).
push_code() {
  local dir
  dir=$(vsr_quote "$REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    local update="git -C $dir pull -q --ff-only"
    if [[ -n $GIT_REF ]]; then
      update="git -C $dir fetch -q origin $(vsr_quote "$GIT_REF")"
      update+=" && git -C $dir checkout -q FETCH_HEAD"
    fi
    remote "[ -d $dir/.git ] || git clone -q $(vsr_quote "$REPO_URL") $dir" "$update"
    return
  fi
  local tarball=${TMPDIR:-/tmp}/vsrllm_jax_src.tgz
  local pack="git ls-files -z -co --exclude-standard"
  pack+=" | tar czf $(vsr_quote "$tarball") --ignore-failed-read --null -T -"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "+ (cd $(vsr_quote "$VSR_REPO_ROOT") && $pack)"
  else
    (cd "$VSR_REPO_ROOT" && eval "$pack")
  fi
  vsr_run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:vsrllm_jax_src.tgz" \
    "${TPU_FLAGS[@]}" --worker=all
  # Unpacked over the previous copy: the venv and any workdir inside it stay.
  remote "mkdir -p $dir" "tar xzf vsrllm_jax_src.tgz -C $dir" "rm vsrllm_jax_src.tgz"
}

cmd_setup() {
  no_extra_args "$@"
  local py
  py=$(vsr_quote "$PYTHON")
  push_code
  # The package with its "tpu" extra, requirements.txt as constraints: the light set (no torch,
  # no TensorFlow) at the tested versions and jax[tpu] of the pinned jax version (adds libtpu).
  local versions='import importlib.metadata as m; print(*(m.version(p) for p in ("jax", "libtpu")))'
  local get_python="sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv"
  remote "cd $(vsr_quote "$REMOTE_DIR")" \
    "command -v $py >/dev/null || { $get_python; }" \
    "[ -x .venv/bin/python ] || $py -m venv .venv" \
    ". .venv/bin/activate" \
    "pip install -q -U pip" \
    "pip install -q -e '.[tpu]' -c requirements.txt" \
    "python -c $(vsr_quote "$versions")"
}

cmd_train() {
  [[ -n $WORKDIR ]] || vsr_die "WORKDIR is not set: where checkpoints and metrics go" \
      "(on a pod: storage that every host shares, see launch/README.md)"
  local distributed
  case $DISTRIBUTED in
    auto) distributed=$(( NUM_HOSTS > 1 )) ;;
    0|1) distributed=$DISTRIBUTED ;;
    *) vsr_die "DISTRIBUTED must be auto, 0 or 1, got '$DISTRIBUTED'" ;;
  esac
  if (( NUM_HOSTS > 1 )) && [[ -z $DATA_DIR && " $* " != *" --config.data.data_dir="* ]]; then
    vsr_die "a $NUM_HOSTS-host slice needs VSRLLM_DATA_DIR (or --config.data.data_dir=)" \
        "on storage that every host shares: process 0 writes the feature cache there and" \
        "all hosts read it"
  fi
  local args=(python -m vsrllm_jax.train --config="$CONFIG" --workdir="$WORKDIR")
  (( distributed )) && args+=(--distributed)
  args+=("$@")
  local steps=("cd $(vsr_quote "$REMOTE_DIR")" ". .venv/bin/activate")
  [[ -n $DATA_DIR ]] && steps+=("export VSRLLM_DATA_DIR=$(vsr_quote "$DATA_DIR")")
  remote "${steps[@]}" "$(vsr_quote "${args[@]}")"
}

cmd_ssh() {
  [[ $# -ge 1 ]] || vsr_die "'ssh' needs a shell command to run on every worker"
  remote "$*"
}

cmd_delete() {
  no_extra_args "$@"
  vsr_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
}

case $SUBCOMMAND in
  create) cmd_create "$@" ;;
  setup) cmd_setup "$@" ;;
  train) cmd_train "$@" ;;
  ssh) cmd_ssh "$@" ;;
  delete) cmd_delete "$@" ;;
  -h|--help|help) usage ;;
  *) vsr_die "unknown subcommand '$SUBCOMMAND' (expected create, setup, train, ssh or delete)" ;;
esac
