# Shared by the launch scripts (sourced, not run): the repository root, quoting
# for printed commands, DRY_RUN and errors.

VSR_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

vsr_die() {
  echo "error: $*" >&2
  exit 2
}

# One shell word per argument, quoted only where needed (copy-pastable output).
vsr_quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+=("$arg")
    else
      out+=("${arg@Q}")
    fi
  done
  echo "${out[*]}"
}

# Runs a command, or with DRY_RUN=1 prints it (prefixed with '+ ') instead.
vsr_run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "+ $(vsr_quote "$@")"
  else
    "$@"
  fi
}

vsr_require_int() {   # NAME VALUE: a non-negative integer or a clear error
  [[ $2 =~ ^[0-9]+$ ]] || vsr_die "$1 must be a non-negative integer, got '$2'"
}
