"""On-policy distillation across two real JAX processes (``jax.distributed``, two local CPU
processes of 2 devices each) against one process of 4 devices with the same data shards: the
same global prompt batches, the same rollouts (the state's key over the global batch), the same
losses, metrics and params; both processes restart together from a checkpoint. Same tokenizer
(the rollout inside the jitted step) and across tokenizers (the rollout jitted on its own, each
process converting its own rows on the host)."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import checkpoint, onpolicy
from distill_jax.config import load_run_config
from distill_jax.tokenizer import load_tokenizer
from tests.conftest import logged_rows, saved_params, step_metrics

REPO = Path(__file__).resolve().parents[1]
SAME = REPO / "configs" / "onpolicy_tiny.yaml"
XTOK = REPO / "configs" / "onpolicy_xtok_tiny.yaml"
# 2 data-parallel groups of 2 (fsdp) devices: each process holds one group
MESH = ("mesh.data=2", "mesh.fsdp=2", "data.num_shards=2")
ATOL = 1e-5  # as the off-policy two-process test: cross-process reductions may reorder sums


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   os.environ.get("JAX_CACHE_DIR", str(REPO / ".jax_cache")))
    env.update(extra)
    return env


def _cli(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "distill_jax.cli", "train", str(config), f"run_dir={run_dir}",
            "logging.every=1", "logging.progress=false", *MESH, *overrides]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(config: Path, run_dir: Path, *overrides: str) -> None:
    out = subprocess.run(_cli(config, run_dir, *overrides), env=_env(4), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()[-3000:]


def _two_processes(config: Path, run_dir: Path, *overrides: str) -> None:
    port = _free_port()
    procs = [subprocess.Popen(
        _cli(config, run_dir, *overrides), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(2, DISTILL_JAX_COORDINATOR=f"127.0.0.1:{port}", DISTILL_JAX_NUM_PROCESSES="2",
                 DISTILL_JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _slots(run_dir: Path) -> dict[int, float]:
    """step -> token slots the step trained on (the throughput metric's numerator)."""
    return {r["step"]: r["perf/tokens_per_sec"] * r["perf/step_time_s"]
            for r in logged_rows(run_dir) if "perf/tokens_per_sec" in r}


def _assert_same_metrics(ref: dict[int, dict], got: dict[int, dict], steps: list[int]) -> None:
    assert sorted(ref) == sorted(got) == steps
    for step in steps:
        assert sorted(ref[step]) == sorted(got[step]), step
        for k, v in ref[step].items():
            assert abs(v - got[step][k]) <= ATOL * max(1.0, abs(v)), (step, k, v, got[step][k])


def _assert_same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0)


def test_one_process_prompt_batch_is_the_processes_batches_concatenated():
    """The global prompt batch does not depend on the process count: with data.num_shards=2,
    one process's batches are, array for array, process 0's rows followed by process 1's (the
    same rows, left-padded to the same width), batch after batch."""
    cfg = load_run_config(SAME, ["data.num_shards=2"])
    tok = load_tokenizer("bytes")

    def stream(index: int, count: int):
        return onpolicy.make_prompt_iterator(cfg.data, tok, max_new_tokens=12,
                                             buckets=(256, 384), process_index=index,
                                             process_count=count)
    one, parts = stream(0, 1), [stream(i, 2) for i in range(2)]
    for _ in range(6):
        want, got = next(one), [next(p) for p in parts]
        for k in onpolicy.PROMPT_KEYS:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], k)


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_together(tmp_path):
    """configs/onpolicy_tiny.yaml (lmbda 0.5 per row: every step samples some rows and keeps the
    dataset's answers in others) as two processes equals the one-process run step for step:
    the global prompt batch is the same (the same rows, padded to the same width), so the
    rollout with the state's key samples the same completions. Deleting the last checkpoint and
    restarting both processes resumes at the one before and ends at the same params."""
    args = ("steps=4", "checkpoint.every=2", "onpolicy.mix=row", "onpolicy.lmbda=0.5",
            "onpolicy.max_new_tokens=12")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(SAME, single, *args)
    _two_processes(SAME, multi, *args)
    ref, got = step_metrics(single), step_metrics(multi)
    _assert_same_metrics(ref, got, [1, 2, 3, 4])
    sampled = [ref[s]["onpolicy/sampled_rows"] for s in ref]
    assert 0 < sum(sampled) < 4 * 8, sampled  # samples and dataset rows both trained
    assert all(ref[s]["onpolicy/generated_tokens"] > 0 for s in ref if ref[s]["onpolicy/sampled_rows"])
    assert _slots(single) == pytest.approx(_slots(multi))  # the same prompt width
    _assert_same_params(saved_params(single), saved_params(multi))

    shutil.rmtree(multi / "checkpoints" / "4")
    _two_processes(SAME, multi, *args)
    assert checkpoint.latest_step(multi / "checkpoints") == 4
    _assert_same_params(saved_params(single), saved_params(multi))
    resumed = step_metrics(multi)  # steps 3 and 4 logged again by the resumed run
    _assert_same_metrics(ref, resumed, [1, 2, 3, 4])


@pytest.mark.slow
@pytest.mark.parametrize("lmbda,mix", [("1.0", "batch"), ("0.3", "row")])
def test_two_processes_across_tokenizers_match_one_process(tmp_path, lmbda, mix):
    """configs/onpolicy_xtok_tiny.yaml as two processes equals the one-process run: each
    process reads its own rows of the global rollout and converts them for the teacher on the
    host; the metrics (teacher log-probs of the samples, bytes, cut tokens) and params agree.
    lmbda 1: every step samples every row. lmbda 0.3 per row (seed 0): step 1 samples one row,
    process 0's, so process 1 joins a rollout none of its rows use; both steps mix samples with
    the pipeline's rows, read in both processes."""
    args = ("steps=2", "checkpoint.every=2", f"onpolicy.lmbda={lmbda}", f"onpolicy.mix={mix}",
            "onpolicy.max_new_tokens=8", "onpolicy.prompt_buckets=[256,448]",
            "data.max_records=32")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(XTOK, single, *args)
    _two_processes(XTOK, multi, *args)
    ref, got = step_metrics(single), step_metrics(multi)
    _assert_same_metrics(ref, got, [1, 2])
    for s in ref:
        if mix == "batch":
            assert ref[s]["onpolicy/sampled_rows"] == 8
        else:
            assert 0 < ref[s]["onpolicy/sampled_rows"] < 8
        assert ref[s]["onpolicy/teacher_logprob"] < 0
        assert ref[s]["onpolicy/mean_completion_bytes"] > 0
    _assert_same_params(saved_params(single), saved_params(multi))


def test_cross_tokenizer_streams_advance_as_one_process_under_row_mixing(monkeypatch):
    """mix=row across tokenizers: every process runs the rollout (one computation over the
    global batch's devices) on every step where any row of the global batch is sampled, and
    reads the pipeline on every step where any row is not, even when all its own rows are of
    the other kind; so both processes' streams advance exactly as the one-process run's (a
    process skipping the rollout would leave the other waiting in it)."""
    from distill_jax.onpolicy import xtok_train as XT

    class Stream:
        def __init__(self, rows):
            self.rows, self.reads = rows, 0

        def __next__(self):
            self.reads += 1
            return {"tokens": np.full((self.rows, 3), self.reads, np.int32)}

        def close(self):
            pass

    def converted(rows, *args, **kwargs):  # xtok_rows's shapes, without the tokenizers
        n = len(rows["tokens"])
        return {"tokens": -np.asarray(rows["tokens"]), XT.CUT_TOKENS: np.zeros(n, np.int32),
                XT.COMPLETION_BYTES: np.ones(n, np.int32), XT.FINISHED: np.ones(n, bool)}
    monkeypatch.setattr(XT, "xtok_rows", converted)

    def batches(p, n):
        rows = 8 // n
        calls = []

        def sample(params, rng, prompts):
            calls.append(int(prompts["tokens"][0, 0]))
            return prompts
        it = XT.XtokBatches(Stream(rows), Stream(rows), lmbda=0.3, mix="row", seed=0, rows=rows,
                            sample=sample, student_tokenizer=None, teacher_tokenizer=None,
                            config=None, process_index=p, process_count=n)
        return it, calls
    one, one_calls = batches(0, 1)
    two = [batches(p, 2) for p in (0, 1)]
    mixed = 0
    for step in range(40):
        want = one.next_batch(step, None, None)
        got = [it.next_batch(step, None, None) for it, _ in two]
        mixed += bool(want[XT.SAMPLED].any() and not all(g[XT.SAMPLED].any() for g in got))
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], k)
    assert mixed > 0  # some step had one process with no sampled row
    for it, calls in two:
        assert calls == one_calls
        assert (it.prompts.reads, it.data.reads) == (one.prompts.reads, one.data.reads)
