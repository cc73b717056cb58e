#!/usr/bin/env bash
# Create a Cloud TPU VM slice, install distill-jax on every worker, run a command on all of
# them, and delete the slice (see launch/README.md).
set -euo pipefail

PROG=launch/tpu_pod.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/_common.sh
source "$SCRIPT_DIR/_common.sh"

# Paths on the workers, written into the remote command line (the workers' shell expands ~).
# shellcheck disable=SC2088
REMOTE_SRC='~/distill-jax'        # the source tree, and the run's working directory
# shellcheck disable=SC2088
REMOTE_VENV='~/distill-jax-venv'  # the virtualenv
REMOTE_TARBALL=distill-jax-src.tar.gz

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh create|run|delete|ssh [options] [-- COMMAND [ARG...]]

  create   gcloud compute tpus tpu-vm create NAME --zone=Z --accelerator-type=T --version=V
  run      install distill-jax on every worker, then run COMMAND on all workers at once with
           DISTILL_JAX_DISTRIBUTED=1 (jax.distributed.initialize() auto-detects the slice)
  ssh      run COMMAND on the workers as it is (default --worker all), or with no COMMAND
           open a shell on worker 0
  delete   gcloud compute tpus tpu-vm delete NAME --zone=Z --quiet

Options (all subcommands):
  --name NAME               TPU name (default distill-jax)
  --zone Z                  zone, e.g. us-east5-a (required)
  --project P               GCP project (default: gcloud's configured project)
  --dry-run                 print every command it would run, one per line; run nothing
  -h, --help                show this help
create:
  --accelerator-type T      slice type (default v5p-32: 16 chips on 4 hosts)
  --version V               TPU software version (default tpu-ubuntu2204-base)
  --spot                    create a Spot slice (cheaper, can be preempted)
run (installs into ~/distill-jax and ~/distill-jax-venv on each worker, then runs there):
  --copy DIR                copy the source tree DIR to every worker (default: the checkout
                            this script is in; .git, .venv, caches and runs/ are left out)
  --git URL                 instead, fetch URL on every worker (any git URL the workers
                            can reach)
  --ref REF                 with --git: branch, tag or commit (default HEAD)
  --no-install              skip the install (reuse what the last run installed)
  --python VERSION          Python for the worker virtualenv, installed by uv (default 3.12;
                            distill-jax needs >= 3.11, Ubuntu 22.04 ships 3.10)
  --compile-cache DIR       JAX_COMPILATION_CACHE_DIR on the workers
  --detach                  start COMMAND in the background (nohup) and return; its output
                            goes to ~/distill-jax/train.log on each worker
ssh:
  --worker W                worker index or 'all' (default all with COMMAND, 0 without)

Example (Qwen2.5-7B -> Qwen2.5-0.5B on a v5p-32):
  launch/tpu_pod.sh create --name qwen-distill --zone us-east5-a --accelerator-type v5p-32
  launch/tpu_pod.sh run --name qwen-distill --zone us-east5-a -- \
      distill-jax train configs/qwen2.5-7b_to_0.5b.yaml
  launch/tpu_pod.sh delete --name qwen-distill --zone us-east5-a
EOF
}

subcommand=""
name=distill-jax
zone=""
project=""
accelerator=v5p-32
version="tpu-ubuntu2204-base"
spot=0
copy_dir=""
git_url=""
git_ref=HEAD
install=1
python_version=3.12
compile_cache=""
detach=0
worker=""
DRY_RUN=0
given=()   # options that only apply to some subcommands, checked below
while (($#)); do
  case $1 in
    --name) need_value "$1" $#; name=$2; shift 2 ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; accelerator=$2; given+=("$1"); shift 2 ;;
    --version) need_value "$1" $#; version=$2; given+=("$1"); shift 2 ;;
    --spot) spot=1; given+=("$1"); shift ;;
    --copy) need_value "$1" $#; copy_dir=$2; given+=("$1"); shift 2 ;;
    --git) need_value "$1" $#; git_url=$2; given+=("$1"); shift 2 ;;
    --ref) need_value "$1" $#; git_ref=$2; given+=("$1"); shift 2 ;;
    --no-install) install=0; given+=("$1"); shift ;;
    --python) need_value "$1" $#; python_version=$2; given+=("$1"); shift 2 ;;
    --compile-cache) need_value "$1" $#; compile_cache=$2; given+=("$1"); shift 2 ;;
    --detach) detach=1; given+=("$1"); shift ;;
    --worker) need_value "$1" $#; worker=$2; given+=("$1"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1'" ;;
    *)
      [[ -z $subcommand ]] || die "unexpected argument '$1' (the command goes after '--')"
      subcommand=$1; shift ;;
  esac
done

case $subcommand in
  create) allowed=" --accelerator-type --version --spot " ;;
  run) allowed=" --copy --git --ref --no-install --python --compile-cache --detach " ;;
  ssh) allowed=" --worker " ;;
  delete) allowed=" " ;;
  "") die "no subcommand: use create, run, ssh or delete" ;;
  *) die "unknown subcommand '$subcommand': use create, run, ssh or delete" ;;
esac
for opt in "${given[@]}"; do
  [[ $allowed == *" $opt "* ]] || die "$opt does not apply to '$subcommand'"
done
case $subcommand in
  create | delete) (($# == 0)) || die "'$subcommand' takes no command (got '$1')" ;;
  run) (($#)) || die "'run' needs a command after '--', e.g. -- distill-jax train CONFIG" ;;
esac

[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name: lowercase letters, digits and '-', starting with a letter, got '$name'"
[[ -n $zone ]] || die "--zone is required, e.g. --zone us-east5-a (v5p) or --zone us-central2-b (v4)"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone: not a GCP zone: '$zone' (e.g. us-east5-a)"
[[ $accelerator =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type: expected e.g. v5p-32, v4-32 or v5litepod-16, got '$accelerator'"
[[ -n $version ]] || die "--version cannot be empty"
[[ $python_version =~ ^3\.[0-9]+$ ]] || die "--python: expected e.g. 3.12, got '$python_version'"
[[ -z $worker || $worker == all || $worker =~ ^[0-9]+$ ]] ||
  die "--worker: a worker index or 'all', got '$worker'"
[[ -z $git_url || -z $copy_dir ]] || die "--git and --copy are alternatives: give one"
if [[ $git_ref != HEAD && -z $git_url ]]; then die "--ref needs --git"; fi
if ((install == 0)) && [[ -n $git_url || -n $copy_dir ]]; then die "--no-install skips the install: drop --git/--copy"; fi

gcloud_scope=(--zone="$zone")
[[ -z $project ]] || gcloud_scope+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)

case $subcommand in
  create)
    cmd=("${tpu[@]}" create "$name" "${gcloud_scope[@]}" --accelerator-type="$accelerator" --version="$version")
    ((spot == 0)) || cmd+=(--spot)
    run_cmd "${cmd[@]}"
    ;;

  delete)
    run_cmd "${tpu[@]}" delete "$name" "${gcloud_scope[@]}" --quiet
    ;;

  ssh)
    if (($#)); then
      run_cmd "${tpu[@]}" ssh "$name" "${gcloud_scope[@]}" --worker="${worker:-all}" --command "$(quote_args "$@")"
    else
      [[ $worker != all ]] || die "an interactive shell needs one worker: --worker 0 (or give a command)"
      run_cmd "${tpu[@]}" ssh "$name" "${gcloud_scope[@]}" --worker="${worker:-0}"
    fi
    ;;

  run)
    # One shell line per worker: install (optional), then run in ~/distill-jax. Single-quoted
    # parts expand on the workers.
    steps=()
    if ((install)); then
      # shellcheck disable=SC2016
      steps+=('export PATH="$HOME/.local/bin:$PATH"'
        '(command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh)')
      if [[ -n $git_url ]]; then
        steps+=("(test -d $REMOTE_SRC/.git || git init -q $REMOTE_SRC)"
          "git -C $REMOTE_SRC fetch -q --depth 1 $(quote_args "$git_url" "$git_ref")"
          "git -C $REMOTE_SRC checkout -q --force FETCH_HEAD")
      else
        steps+=("mkdir -p $REMOTE_SRC" "tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_SRC")
      fi
      steps+=("(test -x $REMOTE_VENV/bin/python || uv venv --quiet --python $python_version $REMOTE_VENV)"
        "uv pip install --quiet --python $REMOTE_VENV/bin/python -e $REMOTE_SRC \"jax[tpu]\"")
    fi
    env_cmd=(env DISTILL_JAX_DISTRIBUTED=1)
    [[ -z $compile_cache ]] || env_cmd+=("JAX_COMPILATION_CACHE_DIR=$compile_cache")
    steps+=("cd $REMOTE_SRC" "export PATH=\"\$HOME/distill-jax-venv/bin:\$PATH\"")
    if ((detach)); then
      # shellcheck disable=SC2016
      steps+=("{ nohup $(quote_args "${env_cmd[@]}" "$@") >train.log 2>&1 </dev/null & }"
        'echo "started on $(hostname); output in ~/distill-jax/train.log"')
    else
      steps+=("$(quote_args "${env_cmd[@]}" "$@")")
    fi
    remote=$(printf ' && %s' "${steps[@]}")
    remote=${remote# && }

    if ((install)) && [[ -z $git_url ]]; then
      src=${copy_dir:-$(cd "$SCRIPT_DIR/.." && pwd)}
      [[ -d $src ]] || die "--copy: not a directory: '$src'"
      [[ -f $src/pyproject.toml ]] || die "--copy: '$src' has no pyproject.toml (point it at the distill-jax checkout)"
      tarball="${TMPDIR:-/tmp}/distill-jax-src-$name.tar.gz"
      run_cmd tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=.jax_cache \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis --exclude='*.egg-info' --exclude=./runs -C "$src" .
      run_cmd "${tpu[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" "${gcloud_scope[@]}" --worker=all
    fi
    run_cmd "${tpu[@]}" ssh "$name" "${gcloud_scope[@]}" --worker=all --command "$remote"
    ;;
esac
