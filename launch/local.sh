#!/usr/bin/env bash
# Run N local processes of one command as a single multi-process JAX job (see launch/README.md).
set -euo pipefail

PROG=launch/local.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_common.sh
source "$SCRIPT_DIR/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] -- COMMAND [ARG...]

Run N processes of COMMAND on this host as one multi-process JAX job. Each process gets
  DISTILL_JAX_COORDINATOR=127.0.0.1:PORT  DISTILL_JAX_NUM_PROCESSES=N  DISTILL_JAX_PROCESS_ID=i
and its output lines are prefixed with [pi]. The launcher waits for all processes; if one
fails, it stops the others (SIGTERM, then SIGKILL after the grace period) and exits with the
failed process's status.

Options:
  --processes N            number of processes (default 2)
  --devices-per-process D  CPU: fake devices per process (XLA_FLAGS=
                           --xla_force_host_platform_device_count=D, default 1);
                           GPU: GPUs per process (default: all GPUs / N)
  --cpu                    run on CPU (JAX_PLATFORMS=cpu); the default without GPUs
  --gpu                    give each process its own GPUs via CUDA_VISIBLE_DEVICES;
                           the default when nvidia-smi lists GPUs
  --port P                 coordinator port on 127.0.0.1 (default: a free port)
  --grace S                seconds between SIGTERM and SIGKILL when stopping (default 10)
  --dry-run                print the command of every process, one per line; run nothing
  -h, --help               show this help

Example:
  launch/local.sh --processes 2 --devices-per-process 4 --cpu -- \
      distill-jax train CONFIG mesh.data=2 mesh.fsdp=4
EOF
}

processes=2
devices=""
platform=""
port=""
grace=10
DRY_RUN=0
while (($#)); do
  case $1 in
    --processes) need_value "$1" $#; processes=$2; shift 2 ;;
    --devices-per-process) need_value "$1" $#; devices=$2; shift 2 ;;
    --port) need_value "$1" $#; port=$2; shift 2 ;;
    --grace) need_value "$1" $#; grace=$2; shift 2 ;;
    --cpu) platform=cpu; shift ;;
    --gpu) platform=gpu; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (the command goes after '--')" ;;
  esac
done
(($#)) || die "no command given: put it after '--', e.g. -- distill-jax train CONFIG"
check_int --processes "$processes" 1
check_int --grace "$grace" 0
[[ -z $devices ]] || check_int --devices-per-process "$devices" 1
[[ -z $port ]] || check_int --port "$port" 1 65535

if [[ -z $platform ]]; then
  if (($(count_gpus) > 0)); then platform=gpu; else platform=cpu; fi
fi
if [[ $platform == gpu ]]; then
  # Split the visible GPUs (CUDA_VISIBLE_DEVICES if set, else all) into N contiguous groups.
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a gpu_ids <<<"$CUDA_VISIBLE_DEVICES"
  else
    total=$(count_gpus)
    gpu_ids=()
    for ((g = 0; g < total; g++)); do gpu_ids+=("$g"); done
  fi
  ((${#gpu_ids[@]} > 0)) || die "--gpu: no GPUs found (nvidia-smi -L lists none and CUDA_VISIBLE_DEVICES is unset)"
  [[ -n $devices ]] || devices=$((${#gpu_ids[@]} / processes))
  ((devices >= 1)) || die "--gpu: ${#gpu_ids[@]} GPU(s) cannot be shared by $processes processes"
  ((processes * devices <= ${#gpu_ids[@]})) ||
    die "--gpu: $processes processes x $devices GPUs needs $((processes * devices)) GPUs, only ${#gpu_ids[@]} visible"
else
  devices=${devices:-1}
fi

if [[ -z $port ]]; then
  py=$(command -v python3 || command -v python || true)
  [[ -n $py ]] || die "no python to pick a free port: pass --port P"
  port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
((DRY_RUN)) || require_command "$1"

# The full command line (an `env` invocation) of process $1, one word per element of `proc_cmd`.
build_proc_cmd() {
  local i=$1
  shift
  proc_cmd=(env "DISTILL_JAX_COORDINATOR=127.0.0.1:$port" "DISTILL_JAX_NUM_PROCESSES=$processes"
    "DISTILL_JAX_PROCESS_ID=$i")
  if [[ $platform == cpu ]]; then
    # Keep the caller's XLA_FLAGS, but this launcher owns the device count.
    local flags="" f words=()
    read -r -a words <<<"${XLA_FLAGS:-}"
    for f in "${words[@]}"; do
      [[ $f == --xla_force_host_platform_device_count=* ]] || flags+="$f "
    done
    proc_cmd+=(JAX_PLATFORMS=cpu "XLA_FLAGS=${flags}--xla_force_host_platform_device_count=$devices")
  else
    local ids=("${gpu_ids[@]:i*devices:devices}")
    local joined
    joined=$(IFS=,; echo "${ids[*]}")
    proc_cmd+=("CUDA_VISIBLE_DEVICES=$joined")
  fi
  proc_cmd+=("$@")
}

if ((DRY_RUN)); then
  for ((i = 0; i < processes; i++)); do
    build_proc_cmd "$i" "$@"
    quote_args "${proc_cmd[@]}"
  done
  exit 0
fi

# prefix TAG: copy stdin to stdout, each line prefixed with TAG. It ignores INT/TERM so that
# it still passes on a stopped process's last lines; it ends when its input closes.
prefix() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '%s %s\n' "$1" "$line"
  done
}

pids=()
prefixers=()
# stop_all: SIGTERM every process group, SIGKILL what is still there after the grace period.
stop_all() {
  local pid t alive
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
# finish STATUS: let the prefixers print the last lines, then exit.
finish() {
  wait "${prefixers[@]}" 2>/dev/null || true
  exit "$1"
}
on_signal() {
  echo "$PROG: $1 received, stopping all processes" >&2
  stop_all
  finish "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

echo "$PROG: $processes processes ($platform, $devices device(s) each), coordinator 127.0.0.1:$port" >&2
# Each process writes into a FIFO read by a prefixer that is this script's own child.
fifo_dir=$(mktemp -d "${TMPDIR:-/tmp}/distill-jax-local.XXXXXX")
trap 'rm -rf "$fifo_dir"' EXIT
for ((i = 0; i < processes; i++)); do
  mkfifo "$fifo_dir/p$i"
  prefix "[p$i]" <"$fifo_dir/p$i" &
  prefixers+=($!)
done
# Job control gives each process its own process group, so stopping a process also stops
# everything it started.
set -m
for ((i = 0; i < processes; i++)); do
  build_proc_cmd "$i" "$@"
  "${proc_cmd[@]}" </dev/null >"$fifo_dir/p$i" 2>&1 &
  pids+=($!)
done
set +m

# Poll: bash reaps finished children itself, so `kill -0` fails once a process has exited.
finished=()
remaining=$processes
while ((remaining > 0)); do
  for ((i = 0; i < processes; i++)); do
    [[ -z ${finished[i]:-} ]] || continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=$rc
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "$PROG: process $i exited with status $rc; stopping the others" >&2
      stop_all
      finish "$rc"
    fi
  done
  ((remaining == 0)) || sleep 0.2
done
wait "${prefixers[@]}" 2>/dev/null || true
echo "$PROG: all $processes processes finished" >&2
