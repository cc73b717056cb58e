"""The shell launchers in launch/: --help, argument errors, --dry-run output (which must be the
exact commands that run), a real two-process JAX run through local.sh, and local.sh stopping
every process when one fails. gcloud, sbatch, scontrol and srun are replaced by stubs on PATH,
so nothing here touches a cloud project or a cluster."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["local.sh", "gpu.sh", "slurm.sh", "tpu_pod.sh"]
ZONE = "us-east5-a"
_GUARD_BIN: Path | None = None  # stubs that fail loudly if a test reaches a real cloud/cluster tool


@pytest.fixture(scope="module", autouse=True)
def guard_bin(tmp_path_factory):
    global _GUARD_BIN
    _GUARD_BIN = tmp_path_factory.mktemp("guard_bin")
    for tool in ("gcloud", "sbatch", "srun", "scontrol"):
        write_stub(_GUARD_BIN, tool, f"#!/bin/sh\necho 'test reached the real {tool}' >&2\nexit 97\n")
    yield _GUARD_BIN


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without what the launchers set (conftest sets XLA_FLAGS),
    with this venv's bin first on PATH, and before it stubs that keep the real gcloud and SLURM
    tools out of reach."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")
           and not k.startswith(("DISTILL_JAX_", "SLURM_"))}
    env["PATH"] = os.pathsep.join([str(_GUARD_BIN), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30,
           cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_words(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `env K=V ... CMD ARGS` into ({K: V}, [CMD, ARGS...])."""
    assert words[0] == "env", words
    assigns: dict[str, str] = {}
    i = 1
    while "=" in words[i] and not words[i].startswith("-"):
        key, value = words[i].split("=", 1)
        assigns[key] = value
        i += 1
    return assigns, words[i:]


def write_stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def argv_logger_stub(directory: Path, name: str, log: Path) -> None:
    """A `name` executable that appends its argv (as JSON) to `log` and succeeds."""
    write_stub(directory, name, f"#!{sys.executable}\nimport json, sys\n"
               f"open({str(log)!r}, 'a').write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')\n")


# --- every launcher -------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    for flag in ("--help", "-h"):
        r = launch(script, flag)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"Usage: launch/{script}"), r.stdout
        assert "--dry-run" in r.stdout


@pytest.mark.parametrize("script, args, message", [
    ("local.sh", [], "no command given"),
    ("local.sh", ["--bogus", "--", "x"], "unknown argument '--bogus'"),
    ("local.sh", ["--processes", "0", "--", "x"], "--processes must be an integer >= 1"),
    ("local.sh", ["--processes", "two", "--", "x"], "--processes must be an integer"),
    ("local.sh", ["--port", "70000", "--", "x"], "--port must be an integer >= 1 and <= 65535"),
    ("local.sh", ["--port"], "--port needs a value"),
    ("local.sh", ["--cpu", "--", "no-such-command-xyz"], "command not found: no-such-command-xyz"),
    ("gpu.sh", [], "no command given"),
    ("gpu.sh", ["--gpus", "0", "--", "x"], "--gpus must be an integer >= 1"),
    ("gpu.sh", ["--mem-fraction", "1.5", "--", "x"], "--mem-fraction must be a fraction"),
    ("slurm.sh", [], "no command given"),
    ("slurm.sh", ["--nodes", "0", "--", "x"], "--nodes must be an integer >= 1"),
    ("slurm.sh", ["--partition", "a b", "--", "x"], "cannot contain whitespace"),
    ("slurm.sh", ["--sbatch-arg", "qos=high", "--", "x"], "--sbatch-arg takes an sbatch option"),
    ("tpu_pod.sh", [], "no subcommand"),
    ("tpu_pod.sh", ["start", "--zone", ZONE], "unknown subcommand 'start'"),
    ("tpu_pod.sh", ["create"], "--zone is required"),
    ("tpu_pod.sh", ["create", "--zone", "moon"], "not a GCP zone"),
    ("tpu_pod.sh", ["create", "--zone", ZONE, "--name", "My_TPU"], "--name: lowercase"),
    ("tpu_pod.sh", ["create", "--zone", ZONE, "--accelerator-type", "tpu32"], "--accelerator-type"),
    ("tpu_pod.sh", ["create", "--zone", ZONE, "--", "ls"], "'create' takes no command"),
    ("tpu_pod.sh", ["run", "--zone", ZONE], "'run' needs a command"),
    ("tpu_pod.sh", ["run", "--zone", ZONE, "--spot", "--", "x"], "--spot does not apply to 'run'"),
    ("tpu_pod.sh", ["run", "--zone", ZONE, "--git", "u", "--copy", ".", "--", "x"], "alternatives"),
    ("tpu_pod.sh", ["run", "--zone", ZONE, "--copy", "/nonexistent", "--", "x"], "not a directory"),
    ("tpu_pod.sh", ["ssh", "--zone", ZONE, "--worker", "all"], "needs one worker"),
])
def test_bad_arguments(script, args, message):
    # --dry-run first, so that nothing could run even if the check under test were missing; the
    # command-on-PATH check is the one made only when not dry-running.
    r = launch(script, *args) if "command not found" in message else launch(script, "--dry-run", *args)
    assert r.returncode != 0
    assert f"launch/{script}: error:" in r.stderr and message in r.stderr, r.stderr
    assert "--help" in r.stderr
    assert r.stdout == ""


def test_scripts_parse_and_pass_shellcheck():
    for path in sorted(LAUNCH.glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, (path, r.stderr)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    r = subprocess.run(["shellcheck", "-x", *sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout


# --- local.sh --------------------------------------------------------------------------------

def test_local_dry_run_cpu(tmp_path):
    marker = tmp_path / "ran"
    r = launch("local.sh", "--processes", "3", "--devices-per-process", "2", "--port", "12345",
               "--cpu", "--dry-run", "--", "touch", str(marker), "a b", "it's",
               env=clean_env(XLA_FLAGS="--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assigns, command = env_words(shlex.split(line))
        assert assigns == {
            "DISTILL_JAX_COORDINATOR": "127.0.0.1:12345",
            "DISTILL_JAX_NUM_PROCESSES": "3",
            "DISTILL_JAX_PROCESS_ID": str(i),
            "JAX_PLATFORMS": "cpu",
            # the caller's other flags are kept; the device count is the launcher's
            "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=2",
        }
        assert command == ["touch", str(marker), "a b", "it's"]
    assert not marker.exists()  # dry run: nothing ran


def test_local_dry_run_gpu_splits_devices():
    r = launch("local.sh", "--gpu", "--processes", "2", "--port", "999", "--dry-run", "--",
               "distill-jax", "train", "cfg.yaml", env=clean_env(CUDA_VISIBLE_DEVICES="3,4,5,6"))
    assert r.returncode == 0, r.stderr
    envs = [env_words(shlex.split(line))[0] for line in r.stdout.splitlines()]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,4", "5,6"]
    assert all("JAX_PLATFORMS" not in e and "XLA_FLAGS" not in e for e in envs)
    assert [e["DISTILL_JAX_PROCESS_ID"] for e in envs] == ["0", "1"]

    r = launch("local.sh", "--gpu", "--processes", "2", "--devices-per-process", "3", "--dry-run",
               "--", "x", env=clean_env(CUDA_VISIBLE_DEVICES="0,1,2,3"))
    assert r.returncode != 0 and "needs 6 GPUs, only 4 visible" in r.stderr


MULTIPROCESS_SCRIPT = """
import jax, numpy as np
from jax.experimental import multihost_utils
from distill_jax.cli import init_distributed
init_distributed()
gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
      jax.local_device_count(), gathered.ravel().tolist(), flush=True)
"""


def test_local_real_two_process_jax_run():
    """Two real processes join through distill_jax.cli.init_distributed() on 127.0.0.1 (CPU)."""
    r = launch("local.sh", "--processes", "2", "--devices-per-process", "1", "--cpu",
               "--port", str(free_port()), "--", sys.executable, "-c", MULTIPROCESS_SCRIPT,
               timeout=120)
    report = f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert r.returncode == 0, "the two-process jax.distributed run failed:\n" + report
    results = {}
    for line in r.stdout.splitlines():
        if " RESULT " in line:
            tag, _, index, count, devices, local, gathered = line.split(" ", 6)
            results[tag] = (int(index), int(count), int(devices), int(local), gathered)
    assert results == {"[p0]": (0, 2, 2, 1, "[0, 1]"), "[p1]": (1, 2, 2, 1, "[0, 1]")}, report
    assert "all 2 processes finished" in r.stderr


FAILING_SCRIPT = """
import os, sys, time
i, d = int(os.environ["DISTILL_JAX_PROCESS_ID"]), sys.argv[1]
with open(f"{d}/pid{i}", "w") as f:
    f.write(str(os.getpid()))
print("started", i, flush=True)
if i == 1:
    while not os.path.exists(f"{d}/pid0"):
        time.sleep(0.02)
    print("failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(120)
"""


def assert_gone(pid: int) -> None:
    for _ in range(50):  # the kill is sent before the launcher exits; allow the kernel a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"process {pid} was still running after the launcher exited")


def test_local_failure_stops_the_others(tmp_path):
    start = time.monotonic()
    r = launch("local.sh", "--cpu", "--grace", "5", "--port", str(free_port()), "--",
               sys.executable, "-c", FAILING_SCRIPT, str(tmp_path), timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "[p1] failing on purpose" in r.stdout and "[p0] started 0" in r.stdout
    assert "process 1 exited with status 3; stopping the others" in r.stderr
    assert elapsed < 30  # process 0 would sleep 120 s
    assert_gone(int((tmp_path / "pid0").read_text()))


def test_local_sigterm_stops_all(tmp_path):
    script = ("import os, time; p = os.environ['DISTILL_JAX_PROCESS_ID']\n"
              f"open({str(tmp_path)!r} + '/pid' + p, 'w').write(str(os.getpid())); time.sleep(120)")
    proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "--cpu", "--port", str(free_port()),
                             "--", sys.executable, "-c", script], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("pid*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # let both finish writing their pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "SIGTERM received, stopping all processes" in err
    for pid_file in tmp_path.glob("pid*"):
        assert_gone(int(pid_file.read_text()))


# --- gpu.sh ----------------------------------------------------------------------------------

def test_gpu_dry_run():
    r = launch("gpu.sh", "--gpus", "2", "--mem-fraction", "0.8", "--compile-cache", "/cache",
               "--xla-flags", "--xla_dump_to=/tmp/dump", "--dry-run", "--",
               "distill-jax", "train", "cfg.yaml", "optimizer.lr=1e-4",
               env=clean_env(XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false"))
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assigns, command = env_words(shlex.split(line))
    assert command == ["distill-jax", "train", "cfg.yaml", "optimizer.lr=1e-4"]
    assert assigns["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert assigns["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
    assert assigns["JAX_COMPILATION_CACHE_DIR"] == "/cache"
    flags = assigns["XLA_FLAGS"].split()
    # recommended first, then the caller's (which win: XLA keeps the last value), then --xla-flags
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=true"
    assert flags[-2:] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--xla_dump_to=/tmp/dump"]

    r = launch("gpu.sh", "--gpus", "2", "--dry-run", "--", "x", env=clean_env(CUDA_VISIBLE_DEVICES="5,7,9"))
    assert env_words(shlex.split(r.stdout))[0]["CUDA_VISIBLE_DEVICES"] == "5,7"
    r = launch("gpu.sh", "--dry-run", "--", "x")
    assigns = env_words(shlex.split(r.stdout))[0]
    assert "CUDA_VISIBLE_DEVICES" not in assigns and assigns["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"


def test_gpu_flags_are_known_to_the_installed_xla():
    """XLA aborts on an unknown flag in XLA_FLAGS, so a real run (here on CPU) checks the names."""
    r = launch("gpu.sh", "--", sys.executable, "-c",
               "import jax, os; print('devices', jax.device_count(), os.environ['XLA_FLAGS'])",
               env=clean_env(JAX_PLATFORMS="cpu"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "devices 1 --xla_gpu_enable_latency_hiding_scheduler=true" in r.stdout


# --- slurm.sh --------------------------------------------------------------------------------

def slurm_args(*extra: str) -> list[str]:
    return ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
            "--account", "proj", "--port", "23456", "--sbatch-arg=--exclusive", *extra, "--",
            "distill-jax", "train", "configs/x.yaml", "run_dir=out dir", "it's"]


def test_slurm_dry_run_prints_script_and_sbatch(tmp_path):
    r = launch("slurm.sh", *slurm_args("--dry-run"))
    assert r.returncode == 0, r.stderr
    *script_lines, sbatch_line = r.stdout.splitlines()
    script = "\n".join(script_lines) + "\n"
    assert script.startswith("#!/bin/bash\n")
    for directive in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
                      "--time=12:00:00", "--account=proj", "--exclusive", f"--chdir={REPO}"]:
        assert f"#SBATCH {directive}\n" in script, directive
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert 'DISTILL_JAX_COORDINATOR="${nodes[0]}:23456"' in script
    assert 'DISTILL_JAX_NUM_PROCESSES="$SLURM_NTASKS"' in script
    assert 'DISTILL_JAX_PROCESS_ID="$SLURM_PROCID"' in script
    assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1" in script
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in script
    assert "distill-jax train configs/x.yaml 'run_dir=out dir' 'it'\\''s'" in script
    assert shlex.split(sbatch_line)[0] == "sbatch"
    (tmp_path / "job.sbatch").write_text(script)
    r = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    r = launch("slurm.sh", "--gpus-per-node", "0", "--dry-run", "--", "x")
    assert "--gpus-per-node" not in r.stdout and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in r.stdout


SRUN_STUB = """#!/usr/bin/env bash
# Fake srun: run the task once per node, one after the other, as SLURM would set them up.
nodes=1
while [[ $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
for ((i = 0; i < nodes; i++)); do
  SLURM_PROCID=$i SLURM_NTASKS=$nodes "$@" || exit
done
"""
SCONTROL_STUB = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 9
printf 'gpu-node-%s\\n' a b c d
"""
SBATCH_STUB = """#!/usr/bin/env bash
cp "$1" "$SBATCH_COPY"
SLURM_JOB_NODELIST='gpu-node-[a-d]' bash "$1" > "$SBATCH_OUT" 2>&1
echo "Submitted batch job 42"
"""


def test_slurm_submits_a_script_that_wires_each_task(tmp_path):
    """Submit for real against stub sbatch/scontrol/srun that run the job locally."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    write_stub(stubs, "srun", SRUN_STUB)
    write_stub(stubs, "scontrol", SCONTROL_STUB)
    write_stub(stubs, "sbatch", SBATCH_STUB)
    probe = ("import os, sys; print('TASK', os.environ['DISTILL_JAX_PROCESS_ID'], "
             "os.environ['DISTILL_JAX_NUM_PROCESSES'], os.environ['DISTILL_JAX_COORDINATOR'], "
             "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'], sys.argv[1:])")
    env = clean_env(SBATCH_COPY=str(tmp_path / "copy.sbatch"), SBATCH_OUT=str(tmp_path / "job.out"),
                    TMPDIR=str(tmp_path))
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    args = ["--nodes", "4", "--port", "23456", "--", sys.executable, "-c", probe, "a b", "it's"]
    r = launch("slurm.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "Submitted batch job 42" in r.stdout
    out = (tmp_path / "job.out").read_text()
    for i in range(4):
        assert f"TASK {i} 4 gpu-node-a:23456 0.90 ['a b', \"it's\"]" in out, out
    # --dry-run printed exactly the script that was submitted
    dry = launch("slurm.sh", *args[:4], "--dry-run", *args[4:], env=env)
    assert "\n".join(dry.stdout.splitlines()[:-1]) + "\n" == (tmp_path / "copy.sbatch").read_text()


# --- tpu_pod.sh ------------------------------------------------------------------------------

def make_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for d in ("distill_jax", "configs", ".venv/bin", "runs/old", ".git", "distill_jax/__pycache__"):
        (src / d).mkdir(parents=True, exist_ok=True)
    for f in ("pyproject.toml", "distill_jax/__init__.py", "configs/qwen2.5-7b_to_0.5b.yaml",
              ".venv/bin/python", "runs/old/ckpt", ".git/HEAD", "distill_jax/__pycache__/x.pyc"):
        (src / f).write_text("x")
    return src


def tpu_dry_lines(*args: str, env=None) -> list[list[str]]:
    r = launch("tpu_pod.sh", "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def test_tpu_create_ssh_delete_dry_run():
    (create,) = tpu_dry_lines("create", "--name", "qwen-distill", "--zone", ZONE, "--project", "p1",
                              "--accelerator-type", "v5p-32", "--spot")
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert create[5] == "qwen-distill"
    assert {f"--zone={ZONE}", "--project=p1", "--accelerator-type=v5p-32",
            "--version=tpu-ubuntu2204-base", "--spot"} == set(create[6:])

    (delete,) = tpu_dry_lines("delete", "--name", "qwen-distill", "--zone", ZONE)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "qwen-distill",
                      f"--zone={ZONE}", "--quiet"]

    (ssh,) = tpu_dry_lines("ssh", "--zone", ZONE, "--", "pkill", "-f", "distill-jax train")
    assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "distill-jax", f"--zone={ZONE}",
                   "--worker=all", "--command", "pkill -f 'distill-jax train'"]
    (shell,) = tpu_dry_lines("ssh", "--zone", ZONE)
    assert shell[-1] == "--worker=0"


def test_tpu_run_dry_run_copy(tmp_path):
    src = make_source(tmp_path)
    tar, scp, ssh = tpu_dry_lines(
        "run", "--name", "qwen-distill", "--zone", ZONE, "--copy", str(src), "--compile-cache",
        "/tmp/jax-cache", "--", "distill-jax", "train", "configs/qwen2.5-7b_to_0.5b.yaml",
        "run_dir=gs://bucket/run 1", env=clean_env(TMPDIR=str(tmp_path)))
    tarball = str(tmp_path / "distill-jax-src-qwen-distill.tar.gz")
    assert tar[:3] == ["tar", "-czf", tarball] and tar[-3:] == ["-C", str(src), "."]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "qwen-distill:distill-jax-src.tar.gz", f"--zone={ZONE}", "--worker=all"]
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "qwen-distill",
                       f"--zone={ZONE}", "--worker=all", "--command"]
    remote = ssh[9]
    steps = remote.split(" && ")
    assert "tar -xzf ~/distill-jax-src.tar.gz -C ~/distill-jax" in steps
    assert any(s.startswith("uv pip install") and '-e ~/distill-jax "jax[tpu]"' in s for s in steps)
    assert "cd ~/distill-jax" in steps
    assert shlex.split(steps[-1]) == [
        "env", "DISTILL_JAX_DISTRIBUTED=1", "JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache",
        "distill-jax", "train", "configs/qwen2.5-7b_to_0.5b.yaml", "run_dir=gs://bucket/run 1"]
    r = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tpu_run_dry_run_git_detach_and_no_install():
    (ssh,) = tpu_dry_lines("run", "--zone", ZONE, "--git", "https://github.com/me/distill-jax.git",
                           "--ref", "v0.1", "--detach", "--", "distill-jax", "train", "c.yaml")
    remote = ssh[-1]
    assert ssh[-2] == "--command" and "--worker=all" in ssh
    assert "git -C ~/distill-jax fetch -q --depth 1 https://github.com/me/distill-jax.git v0.1" in remote
    assert "git -C ~/distill-jax checkout -q --force FETCH_HEAD" in remote
    assert "{ nohup env DISTILL_JAX_DISTRIBUTED=1 distill-jax train c.yaml >train.log 2>&1 </dev/null & }" in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0

    (ssh,) = tpu_dry_lines("run", "--zone", ZONE, "--no-install", "--", "distill-jax", "train", "c.yaml")
    assert ssh[-1] == ('cd ~/distill-jax && export PATH="$HOME/distill-jax-venv/bin:$PATH" && '
                       "env DISTILL_JAX_DISTRIBUTED=1 distill-jax train c.yaml")


def test_tpu_commands_run_exactly_as_dry_run_prints(tmp_path):
    """With a stub gcloud, the real run executes the dry run's lines (and tar really runs)."""
    src = make_source(tmp_path)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "gcloud.log"
    argv_logger_stub(stubs, "gcloud", log)
    env = clean_env(TMPDIR=str(tmp_path))
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    invocations = [
        ["create", "--name", "t1", "--zone", ZONE, "--spot"],
        ["run", "--name", "t1", "--zone", ZONE, "--copy", str(src), "--", "distill-jax", "train",
         "configs/qwen2.5-7b_to_0.5b.yaml", "steps=10"],
        ["ssh", "--name", "t1", "--zone", ZONE, "--worker", "2", "--", "ls", "-la"],
        ["delete", "--name", "t1", "--zone", ZONE],
    ]
    expected = []
    for args in invocations:
        expected += [words for words in tpu_dry_lines(*args, env=env) if words[0] == "gcloud"]
        r = launch("tpu_pod.sh", *args, env=env)
        assert r.returncode == 0, r.stderr
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    assert ran == expected
    with tarfile.open(tmp_path / "distill-jax-src-t1.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"pyproject.toml", "distill_jax/__init__.py", "configs/qwen2.5-7b_to_0.5b.yaml"} <= names
    assert not any(n.startswith((".venv", ".git", "runs")) or "__pycache__" in n for n in names), names
