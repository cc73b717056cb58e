"""Exact match of distilled reasoning students: on-policy distillation, teacher traces, REDI.

The task: two-digit addition written out column by column (a worked solution per problem)::

    What is 47 + 38?          7 + 8 = 15
                              4 + 3 + 1 = 8
                              #### 85

Byte tokenizer, tiny Llama-family models trained from scratch. The teacher (4 layers, d128)
learns from thousands of worked solutions; the student (2 layers, d128) gets what a reasoning
distillation has: a few hundred worked solutions (``labelled``) and a larger pool of questions
with answer keys only (``pool``: the labelled questions with their worked solutions, the others
with the answer line ``#### N`` alone). Every student trains the same steps on the same number of
rows per step (a REDI row holds one problem's pair), over seeds (a seed sets the student's init,
the data order and the sampling):

  sft             SFT on the labelled worked solutions (baseline)
  kd              forward KL + CE, live teacher, on the labelled rows
  onpolicy_l05    on-policy reverse KL (GKD), live teacher, pool prompts, lmbda 0.5
  onpolicy_l1     the same, lmbda 1 (every step on the student's own samples)
  traces_all      SFT on every teacher sample of the pool (unverified)
  traces_verified SFT on the samples the math verifier accepts (the known final answer)
  traces_redi     SFT on verified traces, then REDI on (correct, incorrect) pairs (same total
                  steps: ``Setting.redi_share`` of them in the second stage, from the first
                  stage's export)
  traces_kd       forward KL + CE, live teacher, on the verified traces
  traces_redi_lr3e-4  traces_redi with its REDI stage at a tenth of the learning rate
  sft_onpolicy    SFT on the labelled solutions, then on-policy reverse KL at lmbda 1 from
                  its export (GKD's usual start: a student that already writes solutions)
  sft_onpolicy_lr3e-4  sft_onpolicy with its on-policy stage at a tenth of the learning rate

The teacher samples ``Setting.trace_samples`` completions per pool prompt at temperature 1 once
(``distill-jax traces``; the traces are the same for every seed). Reported on held-out problems
(a disjoint split: a problem's split is fixed by a hash of its question): greedy exact match and
held-out bits per byte of the worked solutions, mean +- std over seeds, and the teacher's own.

Every run goes through the library (run configs written to ``RUN_DIR/configs/*.yaml`` and
trained by ``distill_jax.train.loop.run``, traces by ``distill_jax.traces``, evaluation by
``distill_jax.eval.run_eval``), so ``distill-jax train RUN_DIR/configs/<cell>.yaml`` repeats a
cell. Resumable: the teacher's export, the traces and each finished (method, seed) cell are
kept (results written atomically after every cell to ``--out-dir``); training runs resume from
their checkpoints.

    python benchmarks/reasoning_quality.py                  # every method, seeds 0 1 2
    python benchmarks/reasoning_quality.py --dry-run        # the plan and the time estimate
    python benchmarks/reasoning_quality.py --quick          # a smoke check (tiny setting)
    python benchmarks/reasoning_quality.py --methods sft traces_verified --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_cells, write_json_atomic  # noqa: E402
import _common  # noqa: E402

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------ the task

TEST_BUCKETS = 5  # one question in TEST_BUCKETS is held out, by a hash of its text



def load_results(path: Path, setting: dict[str, Any]) -> dict[str, Any]:
    """The results file at ``path`` if made at ``setting``, else a fresh record (with
    the teacher's record and the traces' slots); see ``_common.load_results``."""
    return _common.load_results(path, setting, teacher=None, traces=None)


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``, fixed by a SHA-256 of the question: the splits never meet."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_BUCKETS == 0 else "train"


def worked_solution(a: int, b: int) -> str:
    """Column addition of two two-digit numbers, units first, carry written, then ``#### a+b``."""
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    return f"{a % 10} + {b % 10} = {units}\n{a // 10} + {b // 10} + {carry} = {tens}\n#### {a + b}"


def problems(n: int, *, seed: int, split: str, exclude: frozenset[str] = frozenset()
             ) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``split`` (``prompt``, worked ``response``, ``answer``), drawn
    from ``random.Random(seed)``, none of whose questions is in ``exclude``."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    for _ in range(200 * (n + 10)):
        if len(out) == n:
            return out
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = f"What is {a} + {b}?"
        if q in seen or split_of(q) != split:
            continue
        seen.add(q)
        out.append({"prompt": q, "response": worked_solution(a, b), "answer": a + b})
    if len(out) == n:
        return out
    raise ValueError(f"only {len(out)} distinct {split} problems (asked for {n})")


@dataclasses.dataclass(frozen=True)
class Setting:
    """Sizes and budgets of one benchmark setting."""

    n_teacher: int = 5000      # worked solutions the teacher learns from
    n_labelled: int = 200      # worked solutions the student has
    n_pool: int = 1500         # questions with answer keys (the labelled ones among them)
    n_test: int = 200          # held-out problems
    teacher_steps: int = 500
    teacher_batch: int = 32
    steps: int = 500           # student steps, every method
    batch: int = 16            # rows per student step, every method
    trace_samples: int = 4
    redi_share: float = 0.25   # share of a two-stage cell's steps in its second stage
    teacher_layers: int = 4
    teacher_hidden: int = 128
    student_layers: int = 2
    student_hidden: int = 128


QUICK = Setting(n_teacher=64, n_labelled=16, n_pool=32, n_test=8, teacher_steps=4,
                teacher_batch=8, steps=4, batch=4, trace_samples=2)
PROMPT_BUCKET = 48    # the chat-rendered prompt is 42 byte tokens
MAX_NEW = 40          # the longest solution is 33 bytes + end of turn
SEQ_LEN = PROMPT_BUCKET + MAX_NEW   # every method's row: equal rows and row length per step


def data_files(root: Path, s: Setting) -> dict[str, Path]:
    """Write the benchmark's data sets under ``root`` (each atomically, once): ``teacher``,
    ``labelled``, ``pool`` (answer keys; the labelled problems keep their worked solutions) and
    ``test``; the paths by name."""
    from distill_jax.fsutil import write_atomic
    paths = {k: root / f"{k}.jsonl" for k in ("teacher", "labelled", "pool", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    test = problems(s.n_test, seed=2, split="test")
    labelled = problems(s.n_labelled, seed=3, split="train")
    extra = problems(s.n_pool - s.n_labelled, seed=4, split="train",
                     exclude=frozenset(p["prompt"] for p in labelled))
    pool = labelled + [{**p, "response": f"#### {p['answer']}"} for p in extra]
    sets = {"teacher": problems(s.n_teacher, seed=1, split="train"), "labelled": labelled,
            "pool": pool, "test": test}
    root.mkdir(parents=True, exist_ok=True)
    for k, rows in sets.items():
        write_atomic(paths[k], "".join(json.dumps(r) + "\n" for r in rows))
    return paths


# ------------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One student recipe: its training data (``labelled``, ``pool``, or a traces selection:
    ``traces_all``, ``traces_correct``, ``traces_pairs``), loss terms, whether the live teacher
    runs, the on-policy share ``lmbda`` (None: off-policy), and ``first``: the data of a first
    SFT stage (None: one stage), whose export the recipe then trains for the last
    ``Setting.redi_share`` of the steps."""

    data: str
    terms: dict[str, float]
    label: str
    teacher: bool = False
    lmbda: float | None = None
    first: str | None = None
    lr: float = 3.0e-3  # the recipe's peak learning rate (a first SFT stage: LR)


METHODS = {
    "sft": Method("labelled", {"cross_entropy": 1.0}, "SFT on labelled worked solutions"),
    "kd": Method("labelled", {"forward_kl": 1.0, "cross_entropy": 1.0},
                 "logit KD (forward KL + CE) on labelled rows", teacher=True),
    "onpolicy_l05": Method("pool", {"reverse_kl": 1.0},
                           "on-policy reverse KL, lmbda 0.5, pool prompts", True, 0.5),
    "onpolicy_l1": Method("pool", {"reverse_kl": 1.0},
                          "on-policy reverse KL, lmbda 1, pool prompts", True, 1.0),
    "traces_all": Method("traces_all", {"cross_entropy": 1.0},
                         "SFT on teacher traces, unverified (all samples)"),
    "traces_verified": Method("traces_correct", {"cross_entropy": 1.0},
                              "SFT on teacher traces, verified"),
    "traces_redi": Method("traces_pairs", {"redi": 1.0, "sft": 0.1},
                          "SFT on verified traces, then REDI on pairs", first="traces_correct"),
    "traces_kd": Method("traces_correct", {"forward_kl": 1.0, "cross_entropy": 1.0},
                        "logit KD (forward KL + CE) on verified traces", teacher=True),
    "traces_redi_lr3e-4": Method("traces_pairs", {"redi": 1.0, "sft": 0.1},
                                 "SFT on verified traces, then REDI on pairs at lr 3e-4",
                                 first="traces_correct", lr=3.0e-4),
    "sft_onpolicy": Method("pool", {"reverse_kl": 1.0},
                           "SFT on labelled, then on-policy reverse KL (lmbda 1)", True, 1.0,
                           first="labelled"),
    "sft_onpolicy_lr3e-4": Method("pool", {"reverse_kl": 1.0},
                                  "SFT on labelled, then on-policy reverse KL (lmbda 1) at lr 3e-4",
                                  True, 1.0, first="labelled", lr=3.0e-4),
    # The second stage at equal compute, from the same SFT student per seed: more SFT, off-policy
    # KD, on-policy at lmbda 0.5, and on-policy at lmbda 1 over a learning-rate sweep.
    "sft_sft_lr3e-4": Method("labelled", {"cross_entropy": 1.0},
                             "SFT on labelled, then more SFT at lr 3e-4 (control)",
                             first="labelled", lr=3.0e-4),
    "sft_kd_lr3e-4": Method("labelled", {"forward_kl": 1.0, "cross_entropy": 1.0},
                            "SFT on labelled, then off-policy logit KD at lr 3e-4", teacher=True,
                            first="labelled", lr=3.0e-4),
    "sft_onpolicy_l05_lr3e-4": Method("pool", {"reverse_kl": 1.0},
                                      "SFT on labelled, then on-policy reverse KL (lmbda 0.5) "
                                      "at lr 3e-4", True, 0.5, first="labelled", lr=3.0e-4),
    "sft_onpolicy_lr1e-4": Method("pool", {"reverse_kl": 1.0},
                                  "SFT on labelled, then on-policy reverse KL (lmbda 1) at lr 1e-4",
                                  True, 1.0, first="labelled", lr=1.0e-4),
    "sft_onpolicy_lr1e-3": Method("pool", {"reverse_kl": 1.0},
                                  "SFT on labelled, then on-policy reverse KL (lmbda 1) at lr 1e-3",
                                  True, 1.0, first="labelled", lr=1.0e-3),
}
BASELINE = "sft"
LR = 3.0e-3  # every SFT stage's and one-stage recipe's peak learning rate
# Seconds per student step and per cell's fixed work (loading, compiling, evaluating) on the
# shared 2-core CPU; a finished cell of the same method replaces the estimate with its own time.
SECONDS_PER_STEP = {"plain": 0.16, "teacher": 0.17, "onpolicy": 0.23}
CELL_OVERHEAD_S = 10.0
TEACHER_S_PER_STEP = 0.45
TRACES_S = 40.0


# --------------------------------------------------------------------------------- bookkeeping


def mean_std(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def summarize(results: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean, std (sample; 0 for one seed) and n of exact match and bits per byte."""
    out = {}
    for m in names:
        cells = list(method_cells(results, m).values())
        if cells:
            out[m] = {"exact_match": mean_std([c["exact_match"] for c in cells]),
                      "bits_per_byte": mean_std([c["bits_per_byte"] for c in cells])}
    return out


def estimate_s(cells: Sequence[tuple[str, int]], results: dict[str, Any], s: Setting) -> float:
    """Seconds still to run: the teacher and traces when missing, then each missing cell (a
    finished cell of its method's own time, else the per-step estimate)."""
    total = 0.0 if results.get("teacher") else TEACHER_S_PER_STEP * s.teacher_steps + 60
    total += 0.0 if results.get("traces") else TRACES_S

    def unmeasured_s(method: str) -> float:
        m = METHODS[method]
        kind = "onpolicy" if m.lmbda is not None else "teacher" if m.teacher else "plain"
        return SECONDS_PER_STEP[kind] * s.steps + CELL_OVERHEAD_S * (2 if m.first else 1)
    return total + _common.remaining_s(cells, results, unmeasured_s)


# ------------------------------------------------------------------------------------ the runs


def llama(layers: int, hidden: int, seed: int) -> dict[str, Any]:
    return {"preset": "tiny-llama", "seed": seed,
            "overrides": {"vocab_size": 259, "num_layers": layers, "hidden_size": hidden,
                          "intermediate_size": 3 * hidden, "num_heads": max(2, hidden // 32),
                          "num_kv_heads": max(1, hidden // 64)}}


class Bench:
    """Builds the data, the teacher and its traces, and trains and evaluates student cells."""

    def __init__(self, run_dir: Path, s: Setting, log: Callable[[str], None] = print):
        self.run_dir, self.s, self.log = run_dir, s, log
        self.data = data_files(run_dir / "data", s)
        self.teacher_hf = run_dir / "teacher_hf"
        self.traces_dir = run_dir / "traces"
        self.teacher_em: float | None = None  # the teacher's exact match, once it is known

    # configs ------------------------------------------------------------------------------

    def _eval_section(self) -> dict[str, Any]:
        return {"sources": [{"path": str(self.data["test"])}], "math": str(self.data["test"]),
                "max_new_tokens": MAX_NEW, "batch_size": 100, "seq_len": SEQ_LEN,
                "chunk_size": 256}

    def _base(self, name: str, steps: int, seed: int, source: Path, terms: dict[str, float],
              batch: int, student: dict[str, Any], record: str = "chat") -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir / name), "steps": steps, "seed": seed,
            "tokenizer": "bytes", "student": {"init": "scratch", **student},
            "data": {"sources": [{"path": str(source)}], "record": record,
                     "loss_on_prompt": False, "long_docs": "drop", "seq_len": SEQ_LEN,
                     "batch_size": batch, "seed": seed},
            "loss": {"terms": terms, "chunk_size": 256},
            "optimizer": {"lr": LR, "warmup_steps": max(1, steps // 20),
                          "schedule": "cosine", "clip_norm": 1.0},
            "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
            "checkpoint": {"every": max(1, steps // 2), "keep": 1},
            "logging": {"every": max(1, steps // 5)},
            "eval": self._eval_section(),
        }

    def _load(self, name: str, cfg: dict[str, Any]):
        """Write the config as ``configs/<name>.yaml`` (atomically) and load it as a run config."""
        import yaml
        from distill_jax.config import load_run_config
        from distill_jax.fsutil import write_atomic
        path = self.run_dir / "configs" / f"{name.replace('/', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
        return load_run_config(path)

    def teacher_config(self):
        s = self.s
        return self._load("teacher", self._base(
            "teacher", s.teacher_steps, 0, self.data["teacher"], {"cross_entropy": 1.0},
            s.teacher_batch, llama(s.teacher_layers, s.teacher_hidden, 0)))

    def cell_config(self, method: str, seed: int, *, stage: int = 0, evaluation: bool = False):
        """The run config of a cell (``stage`` 1 / 2: the two runs of a REDI cell);
        ``evaluation``: the same student on the held-out chat records, without teacher or
        on-policy sampling (what ``run_eval`` reads)."""
        s, m = self.s, METHODS[method]
        name = f"{method}/seed{seed}" + (f"/stage{stage}" if stage else "")
        student = llama(s.student_layers, s.student_hidden, seed)
        steps, data, terms, teacher, lmbda, lr = (s.steps, m.data, m.terms, m.teacher, m.lmbda,
                                                  m.lr)
        if m.first:
            stage1 = round(s.steps * (1 - s.redi_share))
            if stage == 1:
                steps, data, terms, teacher, lmbda, lr = (stage1, m.first, {"cross_entropy": 1.0},
                                                          False, None, LR)
            else:
                steps = s.steps - stage1
                student = {"init": "hf", "hf_path": str(self.run_dir / method / f"seed{seed}"
                                                        / "stage1_hf")}
        record = "pairs" if data == "traces_pairs" else "chat"
        cfg = self._base(name, steps, seed, self.source(data), terms, s.batch, student, record)
        cfg["optimizer"]["lr"] = lr
        if record == "pairs":  # a row holds a whole pair: the prompt twice, both completions
            cfg["data"]["seq_len"] = 2 * SEQ_LEN
        if evaluation:
            cfg["data"].update(sources=[{"path": str(self.data["test"])}], record="chat")
            cfg["loss"]["terms"] = {"cross_entropy": 1.0}
            return self._load(name + "/eval", cfg)
        if teacher:
            cfg["teacher"] = {"hf_path": str(self.teacher_hf)}
        if lmbda is not None:
            cfg["onpolicy"] = {"lmbda": lmbda, "mix": "batch", "max_new_tokens": MAX_NEW,
                               "temperature": 1.0, "prompt_buckets": [PROMPT_BUCKET]}
        return self._load(name, cfg)

    # the teacher and its traces ----------------------------------------------------------------

    def _export(self, run_dir: Path, out: Path) -> None:
        """Export a run's student to ``out`` unless it is there (written beside, then renamed)."""
        from distill_jax.export import export_run
        if (out / "config.json").is_file():
            return
        tmp = out.with_name(f".{out.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        export_run(run_dir, tmp)
        os.replace(tmp, out)

    def _eval(self, cfg) -> dict[str, float]:
        from distill_jax.eval.run import run_eval
        r = run_eval(cfg, models=("student",), progress=False, write=False)["models"]["student"]
        return {"exact_match": r["math"]["accuracy"], "bits_per_byte": r["heldout"]["bits_per_byte"],
                "params": r["params"], "sample_output": r["math"]["predictions"][0]["output"]}

    def teacher(self, results: dict[str, Any]) -> dict[str, Any]:
        """Train (or resume) the teacher, export it and evaluate it, once per setting."""
        from distill_jax.train.loop import run
        if results.get("teacher") and (self.teacher_hf / "config.json").is_file():
            self.teacher_em = results["teacher"]["exact_match"]
            return results["teacher"]
        cfg = self.teacher_config()
        t = time.perf_counter()
        run(cfg)
        self._export(Path(cfg.run_dir), self.teacher_hf)
        results["teacher"] = {**self._eval(cfg), "train_s": time.perf_counter() - t}
        self.log(f"teacher: exact match {results['teacher']['exact_match']:.3f}, "
                 f"{results['teacher']['bits_per_byte']:.4f} bits/byte")
        self.teacher_em = results["teacher"]["exact_match"]
        return results["teacher"]

    def traces(self, results: dict[str, Any], seed: int = 0) -> dict[str, Any]:
        """The teacher's samples on the pool and the three training sets made from them."""
        from distill_jax.traces.config import load_traces_config
        from distill_jax.traces.run import run_traces
        from distill_jax.traces.selection import select_to_file
        from distill_jax.traces.store import TracesDir, jsonl, write_text_atomic
        cfg = load_traces_config(None, [
            f"out={self.traces_dir}", f"teacher.hf_path={self.teacher_hf}", "tokenizer=bytes",
            f"prompts.path={self.data['pool']}", f"samples={self.s.trace_samples}",
            "temperature=1.0", f"max_new_tokens={MAX_NEW}", "verifier=math",
            f"batch_size={8 * self.s.trace_samples}", f"seed={seed}", "progress=false",
            "mesh.data=1"])
        summary = run_traces(cfg)
        records = TracesDir(self.traces_dir).traces()
        write_text_atomic(self.traces_dir / "traces_all.jsonl", jsonl(
            {"messages": list(r["messages"]) + [{"role": "assistant", "content": r["completion"]}]}
            for r in records))
        _, n_correct = select_to_file(self.traces_dir, "correct",
                                      self.traces_dir / "traces_correct.jsonl")
        _, n_pairs = select_to_file(self.traces_dir, "pairs",
                                    self.traces_dir / "traces_pairs.jsonl")
        results["traces"] = {"samples": len(records), "correct": n_correct, "pairs": n_pairs,
                             "pass@1": n_correct / max(len(records), 1),
                             "summary_line": summary.line()}
        self.log(f"traces: {results['traces']}")
        return results["traces"]

    def source(self, data: str) -> Path:
        """The file of a data set name (:class:`Method`'s ``data`` / ``first``)."""
        return (self.data[data] if data in ("labelled", "pool")
                else self.traces_dir / f"{data}.jsonl")

    # one cell -----------------------------------------------------------------------------

    def __call__(self, method: str, seed: int) -> dict[str, Any]:
        from distill_jax.train.loop import run
        m = METHODS[method]
        files = [self.source(d) for d in (m.first, m.data) if d]
        empty = [f.name for f in files if not f.read_text().strip()]
        if empty:  # only where the teacher is too weak for any verified trace (--quick)
            self.log(f"{method} seed {seed}: skipped, {', '.join(empty)} is empty")
            return {"skipped": f"{', '.join(empty)} holds no records"}
        t = time.perf_counter()
        if m.first:
            first = self.cell_config(method, seed, stage=1)
            run(first)
            self._export(Path(first.run_dir), self.run_dir / method / f"seed{seed}" / "stage1_hf")
            cfg = self.cell_config(method, seed, stage=2)
        else:
            cfg = self.cell_config(method, seed)
        run(cfg)
        train_s = time.perf_counter() - t
        res = self._eval(self.cell_config(method, seed, stage=2 if m.first else 0, evaluation=True))
        self.log(f"{method} seed {seed}: exact match {res['exact_match']:.3f}, "
                 f"{res['bits_per_byte']:.4f} bits/byte, {train_s:.0f} s training")
        return {**res, "train_s": train_s, "steps": self.s.steps, "rows_per_step": self.s.batch,
                "teacher_exact_match": self.teacher_em}


# ------------------------------------------------------------------------------------- reports


def table_text(results: dict[str, Any], summary: dict[str, Any]) -> str:
    """The results as a Markdown table: exact match and bits per byte, mean +- std."""
    lines = ["| method | exact match (greedy) | held-out bits/byte | seeds |",
             "|---|---:|---:|---:|"]
    t = results.get("teacher")
    if t:
        lines.append(f"| teacher ({t['params'] / 1e6:.2f}M params) | {t['exact_match']:.3f} | "
                     f"{t['bits_per_byte']:.4f} | - |")
    earlier: set[float] = set()
    for name, m in METHODS.items():
        if name in summary:
            em, bpb = summary[name]["exact_match"], summary[name]["bits_per_byte"]
            other = {c.get("teacher_exact_match") for c in method_cells(results, name).values()} - (
                {t["exact_match"]} if t else set())
            earlier |= other
            mark = " †" if other else ""
            lines.append(f"| {name}: {m.label}{mark} | {em['mean']:.3f} ± {em['std']:.3f} | "
                         f"{bpb['mean']:.4f} ± {bpb['std']:.4f} | {em['n']} |")
    if earlier:
        known = sorted(x for x in earlier if x is not None)
        lines.append("\n† measured in an earlier sitting, by an earlier version of the code, with "
                     "the teacher it trained from the same recipe (exact match "
                     + (", ".join(f"{x:.3f}" for x in known) if known else "not recorded")
                     + "; rows without a teacher depend on it only through the code).")
    for name in SECOND_STAGE[1:]:
        a, b = seed_values(results, name), seed_values(results, SECOND_STAGE[0])
        both = sorted(set(a) & set(b))
        if both:
            lines.append(f"\n{name} - {SECOND_STAGE[0]}, exact match, per seed (the same SFT "
                         "student): " + ", ".join(f"seed {k} {a[k] - b[k]:+.3f}" for k in both))
    tr = results.get("traces")
    if tr:
        lines.append(f"\nTeacher traces: {tr['samples']} samples, {tr['correct']} verified "
                     f"(pass@1 {tr['pass@1']:.3f}), {tr['pairs']} REDI pairs.")
    return "\n".join(lines) + "\n"


# The second-stage comparison at equal compute: the control first, then what it is compared with.
SECOND_STAGE = ("sft_sft_lr3e-4", "sft_kd_lr3e-4", "sft_onpolicy_lr3e-4",
                "sft_onpolicy_l05_lr3e-4", "sft_onpolicy_lr1e-4", "sft_onpolicy_lr1e-3")


def method_cells(results: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    """The finished (not skipped) cells of method ``name``, by seed."""
    return {seed: c for seed, c in _common.method_cells(results["cells"], name).items()
            if "skipped" not in c}


def seed_values(results: dict[str, Any], name: str) -> dict[int, float]:
    """Exact match of method ``name`` per finished seed."""
    return {seed: c["exact_match"] for seed, c in method_cells(results, name).items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   metavar="METHOD", help=f"methods to run (default: all: {', '.join(METHODS)})")
    p.add_argument("--quick", action="store_true", help="tiny setting, one seed: a smoke check")
    p.add_argument("--run-dir", default="runs/reasoning_quality")
    p.add_argument("--out-dir", default=str(HERE / "results"),
                   help="where the JSON and Markdown results go (--quick: the run directory)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    args = p.parse_args(argv)

    s = QUICK if args.quick else Setting()
    seeds = [0] if args.quick and args.seeds == [0, 1, 2] else args.seeds
    run_dir = Path(args.run_dir).resolve() / ("quick" if args.quick else "full")
    out_dir = run_dir if args.quick else Path(args.out_dir)
    path = out_dir / "reasoning_quality.json"
    setting = dataclasses.asdict(s)
    results = load_results(path, setting)
    cells = [(m, seed) for seed in seeds for m in args.methods]  # every method at a seed first
    est = estimate_s(cells, results, s)
    print(f"{len(cells)} cells ({len(args.methods)} methods x {len(seeds)} seeds), {s.steps} "
          f"student steps of {s.batch} rows x {SEQ_LEN} tokens; teacher {s.teacher_steps} steps; "
          f"estimated {est / 60:.0f} min still to run on the shared 2-core CPU", flush=True)
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    bench = Bench(run_dir, s, log=lambda x: print(x, flush=True))
    bench.teacher(results)
    write_json_atomic(path, results)
    if any(METHODS[m].data.startswith("traces") for m in args.methods):
        if not results.get("traces") or not (bench.traces_dir / "traces_pairs.jsonl").is_file():
            bench.traces(results)
            write_json_atomic(path, results)
    run_cells(cells, results, path, bench, log=lambda x: print(x, flush=True))
    summary = summarize(results, list(METHODS))
    results["summary"] = summary
    results["wall_s_this_call"] = time.perf_counter() - t0
    write_json_atomic(path, results)
    text = table_text(results, summary)
    from distill_jax.fsutil import write_atomic
    write_atomic(out_dir / "reasoning_quality.md", text)
    print("\n" + text + f"\nwrote {path} and {out_dir / 'reasoning_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
