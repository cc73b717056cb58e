# Helpers shared by the launchers in launch/ (sourced, never run).
# shellcheck shell=bash

# XLA flags recommended for multi-GPU training (JAX GPU performance tips, NVIDIA JAX-Toolbox):
# overlap collectives with compute, and prefetch the next scanned layer's weights.
# The flag names are checked against the installed jaxlib by tests/test_launch.py.
# shellcheck disable=SC2034  # used by the scripts that source this file
DJ_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
DJ_GPU_XLA_FLAGS+=" --xla_gpu_enable_highest_priority_async_stream=true"
DJ_GPU_XLA_FLAGS+=" --xla_gpu_enable_while_loop_double_buffering=true"
# shellcheck disable=SC2034
DJ_GPU_MEM_FRACTION="0.90"

# die MESSAGE: print "PROG: error: MESSAGE" and a pointer to --help, exit 2.
die() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Try '%s --help'.\n" "$PROG" >&2
  exit 2
}

# quote_args ARG...: print the arguments as one line that a POSIX shell reads back exactly.
quote_args() {
  local out="" arg esc sq="'\\''"
  for arg in "$@"; do
    if [[ -n $arg && $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$arg "
    else
      esc=${arg//\'/$sq}
      out+="'$esc' "
    fi
  done
  printf '%s\n' "${out% }"
}

# run_cmd ARG...: run the command, or under --dry-run print it (one line) and run nothing.
run_cmd() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_args "$@"
  else
    "$@"
  fi
}

# need_value OPTION NUMBER_OF_REMAINING_ARGS: an option that takes a value must have one.
need_value() {
  if (($2 < 2)); then die "$1 needs a value"; fi
}

# check_int OPTION VALUE MIN [MAX]: VALUE must be an integer in [MIN, MAX].
check_int() {
  local opt=$1 value=$2 min=$3 max=${4:-}
  if ! [[ $value =~ ^[0-9]+$ ]] || ((10#$value < min)) || { [[ -n $max ]] && ((10#$value > max)); }; then
    die "$opt must be an integer >= $min${max:+ and <= $max}, got '$value'"
  fi
}

# check_fraction OPTION VALUE: VALUE must be a decimal in (0, 1].
check_fraction() {
  if ! [[ $2 =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then
    die "$1 must be a fraction in (0, 1], e.g. 0.9, got '$2'"
  fi
}

# count_gpus: the number of NVIDIA GPUs nvidia-smi lists (0 without nvidia-smi).
count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  else
    echo 0
  fi
}

# require_command NAME: the command must be on PATH (checked before launching anything).
require_command() {
  if ! command -v "$1" >/dev/null 2>&1; then
    die "command not found: $1 (activate the virtualenv that has distill-jax, e.g. 'source .venv/bin/activate')"
  fi
}
