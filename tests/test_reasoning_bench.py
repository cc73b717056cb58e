"""benchmarks/reasoning_quality.py: the task, the data split, equal budgets per method and the
cell bookkeeping (no training)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import FakeCellRunner, load_benchmark

from distill_jax.data.mathgen import answer_value
from distill_jax.traces.verify import make_verifier



@pytest.fixture(scope="module")
def rq():
    return load_benchmark("reasoning_quality")


def test_worked_solution_is_column_addition_ending_in_the_sum(rq):
    assert rq.worked_solution(47, 38) == "7 + 8 = 15\n4 + 3 + 1 = 8\n#### 85"
    assert rq.worked_solution(99, 99) == "9 + 9 = 18\n9 + 9 + 1 = 19\n#### 198"
    assert rq.worked_solution(20, 31) == "0 + 1 = 1\n2 + 3 + 0 = 5\n#### 51"
    verify = make_verifier("math")
    for a in range(10, 100, 7):
        for b in range(10, 100, 11):
            sol = rq.worked_solution(a, b)
            assert answer_value(sol) == a + b
            assert verify(sol, f"#### {a + b}") and not verify(sol, f"#### {a + b + 1}")
            assert len(sol) + 1 <= rq.MAX_NEW  # the solution and its end of turn fit


def test_data_sets_are_disjoint_from_the_held_out_split(rq, tmp_path):
    s = dataclasses.replace(rq.QUICK, n_teacher=300, n_labelled=40, n_pool=120, n_test=60)
    paths = rq.data_files(tmp_path, s)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == {"teacher": 300, "labelled": 40, "pool": 120,
                                                     "test": 60}
    test_q = {r["prompt"] for r in rows["test"]}
    assert all(rq.split_of(q) == "test" for q in test_q)
    for k in ("teacher", "labelled", "pool"):
        qs = [r["prompt"] for r in rows[k]]
        assert len(set(qs)) == len(qs) and not set(qs) & test_q, k
    # The pool holds the labelled problems with their worked solutions, the rest with the
    # answer line only, each answer right.
    assert rows["pool"][:40] == rows["labelled"]
    for r in rows["pool"][40:]:
        assert r["response"] == f"#### {r['answer']}"
        a, b = map(int, r["prompt"][len("What is "):-1].split(" + "))
        assert r["answer"] == a + b
    # Written once: a second call keeps the files.
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    rq.data_files(tmp_path, s)
    assert before == {k: p.stat().st_mtime_ns for k, p in paths.items()}


def test_every_method_trains_the_same_steps_rows_and_row_length(rq, tmp_path):
    bench = rq.Bench(tmp_path, rq.QUICK, log=lambda _: None)
    for method, m in rq.METHODS.items():
        cfgs = ([bench.cell_config(method, 1, stage=1), bench.cell_config(method, 1, stage=2)]
                if m.first else [bench.cell_config(method, 1)])
        assert sum(c.steps for c in cfgs) == rq.QUICK.steps, method
        for c in cfgs:
            assert c.data.batch_size == rq.QUICK.batch and c.seed == 1 and c.data.seed == 1
            row = (c.data.seq_len if c.onpolicy is None
                   else max(c.onpolicy.prompt_buckets) + c.onpolicy.max_new_tokens)
            pairs = c.data.record == "pairs"  # one problem per row, with its rejected trace
            assert row == (2 if pairs else 1) * rq.SEQ_LEN, method
        assert [c.teacher is not None for c in cfgs][-1] == m.teacher, method
        assert [c.onpolicy is not None for c in cfgs][-1] == (m.lmbda is not None), method
        if m.first:  # SFT first, then the recipe from the first stage's export
            assert cfgs[0].teacher is None and cfgs[0].onpolicy is None
            assert dict(cfgs[0].loss.terms) == {"cross_entropy": 1.0}
            assert cfgs[1].student.init == "hf"
            assert cfgs[1].student.hf_path == str(Path(cfgs[0].run_dir).parent / "stage1_hf")
        ev = bench.cell_config(method, 1, stage=2 if m.first else 0, evaluation=True)
        assert ev.run_dir == cfgs[-1].run_dir and ev.onpolicy is None and ev.teacher is None
        assert [s.path for s in ev.data.sources] == [str(bench.data["test"])]
    assert bench.cell_config("traces_redi", 1, stage=2).loss.terms.keys() == {"redi", "sft"}
    low = [bench.cell_config("traces_redi_lr3e-4", 1, stage=k).optimizer.lr for k in (1, 2)]
    assert low == [rq.LR, 3.0e-4]


class FakeRunner(FakeCellRunner):
    def result(self, method, seed):
        if method == "traces_redi":
            return {"skipped": "traces_pairs.jsonl holds no records"}
        return {"exact_match": {"sft": 0.1, "kd": 0.3}[method] + 0.1 * seed,
                "bits_per_byte": 1.0 - 0.1 * seed}


def test_cells_resume_after_a_failure_and_skipped_cells_stay_out_of_the_summary(rq, tmp_path):
    path = tmp_path / "r.json"
    cells = [(m, s) for m in ("sft", "kd", "traces_redi") for s in (0, 1)]
    results = rq.load_results(path, {"a": 1})
    with pytest.raises(RuntimeError):
        rq.run_cells(cells, results, path, FakeRunner(fail_at=("kd", 1)), log=lambda _: None)
    saved = json.loads(path.read_text())
    assert sorted(saved["cells"]) == ["kd/seed0", "sft/seed0", "sft/seed1"]
    runner = FakeRunner()
    results = rq.run_cells(cells, rq.load_results(path, {"a": 1}), path, runner,
                           log=lambda _: None)
    assert runner.calls == [("kd", 1), ("traces_redi", 0), ("traces_redi", 1)]
    summary = rq.summarize(results, list(rq.METHODS))
    assert set(summary) == {"sft", "kd"}
    assert summary["kd"]["exact_match"]["mean"] == pytest.approx(0.35)
    assert summary["kd"]["exact_match"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert summary["sft"]["bits_per_byte"]["n"] == 2
    # Another setting starts afresh and keeps the old file beside it.
    assert rq.load_results(path, {"a": 2})["cells"] == {}
    assert len(list(tmp_path.glob("r.*.json"))) == 1


def test_table_marks_rows_of_an_earlier_teacher_and_gives_paired_second_stage_margins(rq):
    cell = lambda em, t: {"exact_match": em, "bits_per_byte": 0.1, "teacher_exact_match": t}
    results = {"teacher": {"params": 1e6, "exact_match": 0.99, "bits_per_byte": 0.01},
               "cells": {"sft/seed0": cell(0.5, 0.98), "sft/seed1": cell(0.7, None),
                         "sft_sft_lr3e-4/seed0": cell(0.5, 0.99),
                         "sft_sft_lr3e-4/seed1": cell(0.6, 0.99),
                         "sft_kd_lr3e-4/seed0": cell(0.6, 0.99),
                         "sft_kd_lr3e-4/seed1": cell(0.55, 0.99)}}
    text = rq.table_text(results, rq.summarize(results, list(rq.METHODS)))
    rows = {r.split(":")[0].strip("| "): r for r in text.splitlines() if r.startswith("| ")}
    assert "†" in rows["sft"] and "†" not in rows["sft_kd_lr3e-4"]
    assert "the teacher it trained from the same recipe (exact match 0.980;" in text
    assert ("sft_kd_lr3e-4 - sft_sft_lr3e-4, exact match, per seed (the same SFT student): "
            "seed 0 +0.100, seed 1 -0.050") in text
    assert all(m in rq.METHODS for m in rq.SECOND_STAGE)
