#!/usr/bin/env bash
# Run a command as one process driving the local GPUs, with recommended XLA GPU settings.
set -euo pipefail

PROG=launch/gpu.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_common.sh
source "$SCRIPT_DIR/_common.sh"

usage() {
  cat <<EOF
Usage: launch/gpu.sh [options] -- COMMAND [ARG...]

Run COMMAND as a single process that drives all local GPUs (JAX's default: one process per
host sees every GPU of the host), with
  XLA_FLAGS=$DJ_GPU_XLA_FLAGS [your XLA_FLAGS, which win]
  XLA_PYTHON_CLIENT_MEM_FRACTION=$DJ_GPU_MEM_FRACTION (JAX's own default is 0.75)

Options:
  --gpus N              use only the first N GPUs (sets CUDA_VISIBLE_DEVICES; if it is
                        already set, keeps its first N entries); default: all
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION (default $DJ_GPU_MEM_FRACTION)
  --xla-flags FLAGS     extra XLA flags, appended after the recommended ones
  --compile-cache DIR   persistent compilation cache (JAX_COMPILATION_CACHE_DIR)
  --dry-run             print the command it would run (one line) and run nothing
  -h, --help            show this help

Example:
  launch/gpu.sh --gpus 8 -- distill-jax train configs/qwen2.5-7b_to_0.5b.yaml mesh.fsdp=8
EOF
}

gpus=""
mem_fraction=$DJ_GPU_MEM_FRACTION
extra_flags=""
compile_cache=""
DRY_RUN=0
while (($#)); do
  case $1 in
    --gpus) need_value "$1" $#; gpus=$2; shift 2 ;;
    --mem-fraction) need_value "$1" $#; mem_fraction=$2; shift 2 ;;
    --xla-flags) need_value "$1" $#; extra_flags=$2; shift 2 ;;
    --compile-cache) need_value "$1" $#; compile_cache=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (the command goes after '--')" ;;
  esac
done
(($#)) || die "no command given: put it after '--', e.g. -- distill-jax train CONFIG"
[[ -z $gpus ]] || check_int --gpus "$gpus" 1
check_fraction --mem-fraction "$mem_fraction"

cmd=(env)
if [[ -n $gpus ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  else
    visible=()
    for ((g = 0; g < gpus; g++)); do visible+=("$g"); done
    total=$(count_gpus)
    if ((total > 0 && gpus > total)); then die "--gpus $gpus: nvidia-smi lists only $total GPU(s)"; fi
  fi
  ((gpus <= ${#visible[@]})) || die "--gpus $gpus: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES has only ${#visible[@]}"
  chosen=("${visible[@]:0:gpus}")
  cmd+=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${chosen[*]}")")
fi
flags="$DJ_GPU_XLA_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}${extra_flags:+ $extra_flags}"
cmd+=("XLA_FLAGS=$flags" "XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
[[ -z $compile_cache ]] || cmd+=("JAX_COMPILATION_CACHE_DIR=$compile_cache")
cmd+=("$@")

if ((DRY_RUN)); then
  quote_args "${cmd[@]}"
  exit 0
fi
require_command "$1"
exec "${cmd[@]}"
