#!/usr/bin/env bash
# Submit a multi-node JAX job to SLURM: one process per node, each driving all its GPUs.
set -euo pipefail

PROG=launch/slurm.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_common.sh
source "$SCRIPT_DIR/_common.sh"

usage() {
  cat <<EOF
Usage: launch/slurm.sh [options] -- COMMAND [ARG...]

Write an sbatch script that runs COMMAND with srun as one process per node (each process
drives all GPUs of its node), and submit it with sbatch. Inside the job:
  DISTILL_JAX_COORDINATOR    first host of \$SLURM_JOB_NODELIST (scontrol show hostnames):PORT
  DISTILL_JAX_NUM_PROCESSES  \$SLURM_NTASKS (= number of nodes)
  DISTILL_JAX_PROCESS_ID     \$SLURM_PROCID (read inside each task)
plus the recommended XLA GPU flags and XLA_PYTHON_CLIENT_MEM_FRACTION (see launch/gpu.sh).
The job starts in the current directory and inherits the current environment (sbatch's
default --export=ALL), so activate the virtualenv with distill-jax before submitting.

Options:
  --nodes N             number of nodes (default 1)
  --gpus-per-node G     GPUs per node (default 8; 0 requests none)
  --partition P         SLURM partition
  --time T              time limit, e.g. 24:00:00
  --account A           account to charge
  --job-name NAME       job name (default distill-jax)
  --output PATTERN      log file (default distill-jax-%j.out)
  --port P              coordinator port on the first node (default 12355)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION (default $DJ_GPU_MEM_FRACTION)
  --compile-cache DIR   persistent compilation cache on a shared filesystem
                        (JAX_COMPILATION_CACHE_DIR)
  --sbatch-arg ARG      an extra sbatch option written as '#SBATCH ARG' (repeatable),
                        e.g. --sbatch-arg=--exclusive --sbatch-arg=--qos=high
  --script-out FILE     write the sbatch script to FILE (kept) instead of a temp file
  --dry-run             print the sbatch script, then the sbatch command; submit nothing
  -h, --help            show this help

Example:
  launch/slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 -- \\
      distill-jax train configs/qwen2.5-7b_to_0.5b.yaml mesh.fsdp=32
EOF
}

nodes=1
gpus_per_node=8
partition=""
time_limit=""
account=""
job_name=distill-jax
output="distill-jax-%j.out"
port=12355
mem_fraction=$DJ_GPU_MEM_FRACTION
compile_cache=""
extra_sbatch=()
script_out=""
DRY_RUN=0
while (($#)); do
  case $1 in
    --nodes) need_value "$1" $#; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" $#; gpus_per_node=$2; shift 2 ;;
    --partition) need_value "$1" $#; partition=$2; shift 2 ;;
    --time) need_value "$1" $#; time_limit=$2; shift 2 ;;
    --account) need_value "$1" $#; account=$2; shift 2 ;;
    --job-name) need_value "$1" $#; job_name=$2; shift 2 ;;
    --output) need_value "$1" $#; output=$2; shift 2 ;;
    --port) need_value "$1" $#; port=$2; shift 2 ;;
    --mem-fraction) need_value "$1" $#; mem_fraction=$2; shift 2 ;;
    --compile-cache) need_value "$1" $#; compile_cache=$2; shift 2 ;;
    --sbatch-arg) need_value "$1" $#; extra_sbatch+=("$2"); shift 2 ;;
    --sbatch-arg=*) extra_sbatch+=("${1#--sbatch-arg=}"); shift ;;
    --script-out) need_value "$1" $#; script_out=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (the command goes after '--')" ;;
  esac
done
(($#)) || die "no command given: put it after '--', e.g. -- distill-jax train CONFIG"
check_int --nodes "$nodes" 1
check_int --gpus-per-node "$gpus_per_node" 0
check_int --port "$port" 1 65535
check_fraction --mem-fraction "$mem_fraction"
for value in "$partition" "$time_limit" "$account" "$job_name" "$output" "${extra_sbatch[@]}"; do
  [[ $value != *[[:space:]]* ]] || die "sbatch option values cannot contain whitespace: '$value'"
done
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--job-name: use letters, digits, '_', '.', '-', got '$job_name'"
[[ $PWD != *[[:space:]]* ]] || die "the job starts in the current directory, whose path has whitespace: '$PWD'"
for arg in "${extra_sbatch[@]}"; do
  [[ $arg == -* ]] || die "--sbatch-arg takes an sbatch option such as --qos=high, got '$arg'"
done

# The sbatch script, on stdout. (Single-quoted lines are meant to expand inside the job.)
# shellcheck disable=SC2016
write_script() {
  echo "#!/bin/bash"
  echo "# Written by launch/slurm.sh: one distill-jax process per node (srun), each driving all"
  echo "# GPUs of its node; the processes find each other through DISTILL_JAX_COORDINATOR."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  if ((gpus_per_node > 0)); then echo "#SBATCH --gpus-per-node=$gpus_per_node"; fi
  if [[ -n $partition ]]; then echo "#SBATCH --partition=$partition"; fi
  if [[ -n $time_limit ]]; then echo "#SBATCH --time=$time_limit"; fi
  if [[ -n $account ]]; then echo "#SBATCH --account=$account"; fi
  echo "#SBATCH --output=$output"
  echo "#SBATCH --chdir=$PWD"
  local arg
  for arg in "${extra_sbatch[@]}"; do echo "#SBATCH $arg"; done
  echo "set -euo pipefail"
  echo
  echo 'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")'
  echo '((${#nodes[@]} > 0)) || { echo "scontrol listed no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1; }'
  echo "export DISTILL_JAX_COORDINATOR=\"\${nodes[0]}:$port\""
  if ((gpus_per_node > 0)); then
    echo "export XLA_FLAGS=$(quote_args "$DJ_GPU_XLA_FLAGS")\"\${XLA_FLAGS:+ \$XLA_FLAGS}\""
    echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction"
  fi
  if [[ -n $compile_cache ]]; then
    echo "export JAX_COMPILATION_CACHE_DIR=$(quote_args "$compile_cache")"
  fi
  echo 'echo "distill-jax: ${#nodes[@]} node(s), coordinator $DISTILL_JAX_COORDINATOR" >&2'
  echo
  echo "# SLURM_PROCID and SLURM_NTASKS are per task, so each task reads them itself."
  echo "# shellcheck disable=SC2016"
  echo "srun --nodes=$nodes --ntasks-per-node=1 --kill-on-bad-exit=1 \\"
  echo "  bash -c 'export DISTILL_JAX_NUM_PROCESSES=\"\$SLURM_NTASKS\" DISTILL_JAX_PROCESS_ID=\"\$SLURM_PROCID\"; exec \"\$@\"' distill-jax-task \\"
  echo "  $(quote_args "$@")"
}

if ((DRY_RUN)); then
  write_script "$@"
  quote_args sbatch "${script_out:-${TMPDIR:-/tmp}/distill-jax-$job_name.XXXXXX}"
  exit 0
fi
command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a SLURM login node"
if [[ -n $script_out ]]; then
  script=$script_out
else
  script=$(mktemp "${TMPDIR:-/tmp}/distill-jax-$job_name.XXXXXX")
fi
write_script "$@" >"$script"
echo "$PROG: sbatch script: $script" >&2
sbatch "$script"
