"""benchmarks/quality.py bookkeeping: resume and skip finished cells, summaries, estimates
(a fake runner: no training)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


class FakeRunner:
    """Returns made-up bits per byte per (method, seed); optionally fails at one cell."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, method, seed):
        if (method, seed) == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls.append((method, seed))
        base = {"ce": 3.0, "kd": 2.0}[method]
        return {"bits_per_byte": {"heldout_plays": base + 0.1 * seed,
                                  "heldout_milton": base + 1.0}}


def test_run_cells_skips_finished_cells_and_resumes_after_a_failure(quality, tmp_path):
    path = tmp_path / "q.json"
    setting = {"steps": 5}
    cells = [(m, s) for m in ("ce", "kd") for s in (0, 1, 2)]
    results = quality.load_results(path, setting)
    with pytest.raises(RuntimeError):
        quality.run_cells(cells, results, path, FakeRunner(fail_at=("kd", 1)), log=lambda _: None)
    saved = json.loads(path.read_text())
    assert sorted(saved["cells"]) == ["ce/seed0", "ce/seed1", "ce/seed2", "kd/seed0"]
    assert not list(tmp_path.glob(".*.tmp"))

    runner = FakeRunner()
    results = quality.run_cells(cells, quality.load_results(path, setting), path, runner,
                                log=lambda _: None)
    assert runner.calls == [("kd", 1), ("kd", 2)]
    assert len(json.loads(path.read_text())["cells"]) == 6

    runner = FakeRunner()  # everything finished: nothing runs
    quality.run_cells(cells, quality.load_results(path, setting), path, runner, log=lambda _: None)
    assert runner.calls == []


def test_results_of_another_setting_start_fresh_and_are_kept(quality, tmp_path):
    path = tmp_path / "q.json"
    quality.write_json_atomic(path, {"setting": {"steps": 5}, "cells": {"ce/seed0": {}},
                                     "teacher": {}, "init": {}})
    results = quality.load_results(path, {"steps": 6})
    assert results["cells"] == {} and results["setting"] == {"steps": 6}
    kept = [p for p in tmp_path.glob("q.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["setting"] == {"steps": 5}


def test_summarize_mean_and_sample_std(quality):
    results = {"cells": {f"{m}/seed{s}": FakeRunner()(m, s) for m in ("ce", "kd") for s in (0, 1, 2)}}
    summary = quality.summarize(results, ["ce", "kd", "jsd"], ["heldout_plays", "heldout_milton"])
    assert set(summary) == {"ce", "kd"}
    row = summary["ce"]["heldout_plays"]
    assert row["mean"] == pytest.approx(3.1) and row["std"] == pytest.approx(0.1) and row["n"] == 3
    assert summary["kd"]["heldout_milton"]["std"] == pytest.approx(0.0)


def test_estimate_uses_finished_cells_then_defaults(quality):
    table = quality.methods(0.5)
    cells = [("ce", 0), ("ce", 1), ("fkl_live", 0)]
    results = {"cells": {"ce/seed0": {"cell_s": 100.0}}}
    expected = 100.0 + quality.SECONDS_PER_STEP["same_live"] * 10 + quality.OVERHEAD_S
    assert quality.estimate_s(cells, table, 10, results) == pytest.approx(expected)


def test_methods_share_the_recipe_mix_and_spread_record(quality):
    table = quality.methods(0.5)
    assert table["rkl"].terms == {"reverse_kl": 1.0, "cross_entropy": 0.5}
    assert table["ce"].terms == {"cross_entropy": 1.0} and table["ce"].k == 0
    assert table["fkl_cache_k8"].k == 8 and table["fkl_live"].k is None
    assert all(m.recipe == "xtok" for n, m in table.items()
               if n in ("sft", "alm", "alm_sft", "uld", "mined", "dskd"))
    from distill_jax import demo
    cfg = demo.load_run_config(demo.SAME_CONFIG)
    row = {"mean": 2.0, "std": 0.1, "n": 3}
    summary = {m: {"heldout_plays": row} for m in ("ce", "sft", "alm_sft",
                                                   f"fkl_cache_k{cfg.cache.k}")}
    rec = quality.spread_record(summary, cfg)
    assert rec["setting"] == demo.setting_key(cfg)
    assert set(rec["bits_per_byte"]) == {"kd", "ce", "alm", "sft"}


def test_onpolicy_methods_share_rows_and_differ_in_lmbda_only(quality):
    table = quality.methods(0.5)
    rows = {n: table[n] for n in ("prompt_rkl", "onpolicy_rkl", "onpolicy_rkl_l1")}
    assert {n: m.lmbda for n, m in rows.items()} == {"prompt_rkl": 0.0, "onpolicy_rkl": 0.5,
                                                     "onpolicy_rkl_l1": 1.0}
    assert all(m.terms == {"reverse_kl": 1.0} and m.k is None and m.recipe == "same"
               for m in rows.values())
    assert table["rkl"].lmbda is None
    results = {"cells": {}}
    expected = quality.SECONDS_PER_STEP["same_onpolicy"] * 10 + quality.OVERHEAD_S
    assert quality.estimate_s([("onpolicy_rkl", 0)], table, 10, results) == pytest.approx(expected)
