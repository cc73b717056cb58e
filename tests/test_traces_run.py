"""``distill-jax traces``: a planted teacher's kept fraction, kill-safe resume, process split,
and the selection policies on what it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_jax.tokenizer import byte_tokenizer
from distill_jax.traces import selection as select
from distill_jax.traces.config import load_traces_config
from distill_jax.traces.run import run_traces
from distill_jax.traces.store import TracesDirError
from tests.conftest import REPO

TINY = REPO / "configs" / "traces_tiny.yaml"


class PlantedTeacher:
    """Right on every sample of prompts 0, 4, 8, ...; on the first sample only of prompts
    1, 5, 9, ...; wrong otherwise (and wrong answers come with longer texts)."""

    def __init__(self, prompts_by_tokens):
        self.prompts = prompts_by_tokens  # token tuple -> (prompt id, reference answer)
        self.seen: dict[int, int] = {}
        self.tok = byte_tokenizer()

    def _text(self, pid: int, answer: int, sample: int) -> str:
        right = pid % 4 == 0 or (pid % 4 == 1 and sample == 0)
        if right:  # spelled differently from the reference: commas, trailing zeros
            return f"Step one.\nThe answer is {answer:,}.00"
        return f"Step one.\nStep two, longer.\n#### {answer + 1 + sample % 2}"

    def sample(self, prompts, samples, key):
        out = []
        for ids in prompts:
            for _ in range(samples):
                pid, answer = self.prompts[tuple(ids)]
                s = self.seen.get(pid, 0)
                self.seen[pid] = s + 1
                out.append(self.tok(self._text(pid, answer, s))["input_ids"]
                           + [self.tok.eos_token_id])
        return out, [True] * len(out), [-1.0] * len(out)


def _cfg(out, *overrides):
    return load_traces_config(TINY, [f"out={out}", *overrides])


def test_planted_teacher_gives_its_kept_fraction_and_selections(tmp_path):
    from distill_jax.data.mathgen import parse_answer
    from distill_jax.traces.run import load_prompts
    cfg = _cfg(tmp_path / "t", "progress=false")
    tok = byte_tokenizer()
    prompts = load_prompts(cfg, tok)
    planted = PlantedTeacher({p.tokens: (p.id, parse_answer(p.reference)) for p in prompts})
    summary = run_traces(cfg, teacher=planted, tokenizer=tok)
    # 8 prompts x 4 samples: prompts 0, 4 all right (8), prompts 1, 5 one right (2)
    assert summary.complete and summary.prompts == 8 and summary.samples == 32
    assert summary.correct == 10
    assert summary.kept_fraction == pytest.approx(10 / 32)
    assert summary.pass_at_1 == pytest.approx((1 + 1 + 0.25 + 0.25) / 8)
    assert summary.pass_at_n == pytest.approx(4 / 8)
    stats = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert stats["kept_fraction"] == pytest.approx(10 / 32)
    rows = [json.loads(x) for x in (tmp_path / "t" / "traces.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(p, s) for p in range(8)
                                                             for s in range(4)]
    assert all(r["mean_logprob"] == -1.0 and r["finished"] for r in rows)

    def ids(records):
        return [(r["prompt_id"], r["sample"]) for r in records]

    assert len(select.select(rows, "correct")) == 10
    assert ids(select.select(rows, "correct", max_per_prompt=2)) == [(0, 0), (0, 1), (1, 0),
                                                                     (4, 0), (4, 1), (5, 0)]
    assert ids(select.select(rows, "shortest")) == [(0, 0), (1, 0), (4, 0), (5, 0)]
    pairs = select.select(rows, "pairs")
    assert ids(pairs) == [(1, 0), (5, 0)] and all(p["rejected_sample"] == 1 for p in pairs)
    assert pairs[0]["rejected"].startswith("Step one.\nStep two")
    # majority: prompts 2, 3, ... have wrong answers a+1 (samples 0, 2) and a+2 (1, 3): a tie,
    # won by the first seen; prompt 1's right sample is outvoted
    majority = select.select(rows, "majority")
    assert ids(majority)[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3)]
    chosen = pairs[0]["messages"][-1]
    assert chosen["role"] == "assistant" and chosen["content"].startswith("Step one.\nThe answer")
    assert pairs[0]["messages"][:-1] == rows[4]["messages"]
    # the CLI writes the same selection atomically
    path, n = select.select_to_file(tmp_path / "t", "shortest")
    assert n == 4 and path.name == "selected-shortest.jsonl"
    with pytest.raises(ValueError, match="unknown selection policy"):
        select.select(rows, "best")


def _env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path)])
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_CACHE_DIR", str(REPO / ".jax_cache"))
    env.pop("XLA_FLAGS", None)
    return env


def _traces_cmd(out, verifier="stall_verify:check"):
    return [sys.executable, "-m", "distill_jax.cli", "traces", str(TINY), f"out={out}",
            "prompts.max_prompts=12", "samples=2", "batch_size=4", "max_new_tokens=8",
            f"verifier={verifier}"]


# A verifier that, while STALL_AFTER is set, stalls forever once that many groups are
# committed: the run is then killed at a known point (no timing involved).
STALL = '''
import os, pathlib, time
from distill_jax.traces.verify import math_verify

def check(completion, reference):
    after = os.environ.get("STALL_AFTER")
    if after:
        parts = pathlib.Path(os.environ["STALL_OUT"]) / "parts"
        if len(list(parts.glob("group-*.jsonl"))) >= int(after):
            (parts.parent / "stalled").write_text("1")
            time.sleep(3600)
    return math_verify(completion, reference)
'''


def test_killed_run_resumes_to_the_uninterrupted_data_set(tmp_path, monkeypatch):
    (tmp_path / "stall_verify.py").write_text(STALL)
    env = _env(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_traces_cmd(whole), env=env, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_traces_cmd(killed), env={**env, "STALL_AFTER": "2",
                                                      "STALL_OUT": str(killed)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "stalled").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    parts = sorted(p.name for p in (killed / "parts").iterdir())
    assert parts == ["group-000000.jsonl", "group-000001.jsonl"]  # 2 of 6 committed
    assert not (killed / "traces.jsonl").exists()
    # a writer killed mid-write leaves a temporary file, which the restart ignores
    (killed / "parts" / ".group-000002.jsonl.x.tmp").write_text('{"torn": ')
    out = subprocess.run(_traces_cmd(killed), env=env, check=True, capture_output=True,
                         text=True, timeout=300)
    assert "complete: 12 prompts, 24 samples" in out.stdout
    assert (killed / "traces.jsonl").read_text() == (whole / "traces.jsonl").read_text()
    assert (killed / "summary.json").read_text() == (whole / "summary.json").read_text()
    rows = [json.loads(x) for x in (whole / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({(r["prompt_id"], r["sample"]) for r in rows}) == 24
    # a finished run is not redone: rerunning generates nothing
    monkeypatch.syspath_prepend(str(tmp_path))
    again = run_traces(load_traces_config(TINY, _traces_cmd(killed)[5:]))
    assert again.complete and again.generated_tokens == 0 and again.samples == 24


def test_two_processes_write_the_same_set_as_one(tmp_path):
    args = ["prompts.max_prompts=6", "samples=2", "batch_size=4", "max_new_tokens=8",
            "progress=false"]
    one = run_traces(_cfg(tmp_path / "one", *args))
    assert one.complete
    first = run_traces(_cfg(tmp_path / "two", *args, "process_index=0", "process_count=2"))
    assert not first.complete and first.prompts == 4  # groups 0 and 2 of 3
    assert not (tmp_path / "two" / "traces.jsonl").exists()
    second = run_traces(_cfg(tmp_path / "two", *args, "process_index=1", "process_count=2"))
    assert second.complete and second.prompts == 6
    assert ((tmp_path / "two" / "traces.jsonl").read_text()
            == (tmp_path / "one" / "traces.jsonl").read_text())
    rows = [json.loads(x) for x in (tmp_path / "one" / "traces.jsonl").read_text().splitlines()]
    assert all(r["length"] >= 1 and r["mean_logprob"] < 0 for r in rows)
    # another config on the same directory is refused, naming the difference
    with pytest.raises(TracesDirError, match="temperature"):
        run_traces(_cfg(tmp_path / "one", *args, "temperature=0.5"))


def test_two_jax_processes_write_the_same_set_as_one(tmp_path):
    """Two real processes of one multi-process JAX run (jax.distributed on 127.0.0.1, CPU)
    each sample their own groups into one directory; the data set is the one process's."""
    import socket
    args = ["prompts.max_prompts=6", "samples=2", "batch_size=4", "max_new_tokens=8",
            "progress=false"]
    one = run_traces(_cfg(tmp_path / "one", *args))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "distill_jax.cli", "traces", str(TINY),
           f"out={tmp_path / 'two'}", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**_env(tmp_path), "DISTILL_JAX_COORDINATOR": f"127.0.0.1:{port}",
                                   "DISTILL_JAX_NUM_PROCESSES": "2",
                                   "DISTILL_JAX_PROCESS_ID": str(i)}) for i in range(2)]
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=300)[0])
        finally:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    assert all("complete: 6 prompts, 12 samples" in o for o in outs), outs
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == [f"group-{g:06d}.jsonl" for g in range(3)]
    assert one.complete
    assert ((tmp_path / "two" / "traces.jsonl").read_text()
            == (tmp_path / "one" / "traces.jsonl").read_text())


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="samples=4 with temperature=0.0"):
        _cfg(tmp_path, "temperature=0")
    with pytest.raises(ValueError, match="unknown config key 'sample'"):
        _cfg(tmp_path, "sample=3")
    with pytest.raises(ValueError, match="process_index must be in"):
        _cfg(tmp_path, "process_index=2", "process_count=2")
    cfg = _cfg(tmp_path)
    assert Path(cfg.prompts.path).is_file()  # relative to the config file


@pytest.mark.parametrize("name", ["traces_tiny.yaml", "traces_demo.yaml"])
def test_config_header_commands(name, tmp_path, monkeypatch):
    """Every command in the traces configs' headers parses and its config loads; the tiny
    config's first command and its selections run (on 2 prompts, writing under tmp_path)."""
    from distill_jax import cli
    from tests.test_cli import header_commands
    monkeypatch.chdir(REPO)
    commands = header_commands(REPO / "configs" / name)
    assert any(argv[0] == "traces" for argv in commands)
    outs = []
    for i, argv in enumerate(commands):
        if argv[0] != "traces":
            continue
        args = cli.build_parser().parse_args(argv)
        if args.config == "select":
            if name == "traces_tiny.yaml":
                rc = cli.main(["traces", "select", str(outs[0]), *argv[3:]])
                policy = argv[argv.index("--policy") + 1]
                assert rc == 0 and (outs[0] / f"selected-{policy}.jsonl").exists()
            continue
        cfg = load_traces_config(args.config, args.overrides)
        assert cfg.samples >= 1 and cfg.prompts.path
        if name == "traces_tiny.yaml" and not outs:
            outs.append(tmp_path / f"out{i}")
            rc = cli.main([*argv, f"out={outs[-1]}", "prompts.max_prompts=2", "samples=2",
                           "batch_size=4", "max_new_tokens=8", "progress=false"])
            assert rc == 0 and (outs[-1] / "traces.jsonl").exists()


def test_teacher_sampling_is_traced_under_the_configs_mesh(tmp_path, devices8, ambient_meshes):
    """The teacher samples with its mesh ambient (``jax.set_mesh``), as training runs."""
    summary = run_traces(_cfg(tmp_path / "t", "prompts.max_prompts=4", "samples=2",
                              "batch_size=4", "max_new_tokens=4", "progress=false",
                              "mesh.data=2", "mesh.num_devices=2"))
    assert summary.complete
    assert ambient_meshes and all(s == {"data": 2, "fsdp": 1, "tensor": 1}
                                  for s in ambient_meshes), ambient_meshes
