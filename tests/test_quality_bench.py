"""benchmarks/quality.py bookkeeping: resume and skip finished cells, summaries, estimates
(a fake runner: no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FakeCellRunner, load_benchmark

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


class FakeRunner(FakeCellRunner):
    """Returns made-up bits per byte per (method, seed); optionally fails at one cell."""

    def result(self, method, seed):
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


def test_a_cell_whose_method_changed_runs_again_and_legacy_files_keep_their_cells(quality,
                                                                                 tmp_path):
    path = tmp_path / "q.json"
    table = {"a": quality.Method("xtok", {"sft": 1.0}, 0, "a", overrides=("optimizer.lr=1",)),
             "b": quality.Method("xtok", {"alm": 1.0}, 64, "b", overrides=("optimizer.lr=2",))}
    # A file from before cells recorded their method: the setting held every method's overrides.
    legacy = {"setting": {"steps": 5, "overrides": {"a": ["optimizer.lr=1"],
                                                     "b": ["optimizer.lr=3"]}},
              "cells": {"a/seed0": {"x": 1}, "b/seed0": {"x": 2}}, "teacher": {}, "init": {}}
    quality.write_json_atomic(path, legacy)
    results = quality.load_results(path, {"steps": 5}, table)
    # a's overrides are the table's: kept and stamped; b's differ: unstamped, and kept as legacy
    assert results["cells"]["a/seed0"]["method"] == quality.method_key(table["a"])
    assert "method" not in results["cells"]["b/seed0"]
    assert not list(tmp_path.glob("q.*.json"))  # the same setting: nothing set aside
    # A recorded method that differs from the table's is dropped (to run again).
    results["cells"]["b/seed0"]["method"] = {**quality.method_key(table["b"]), "k": 8}
    quality.write_json_atomic(path, results)
    again = quality.load_results(path, {"steps": 5}, table)
    assert sorted(again["cells"]) == ["a/seed0"]


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


def _transfer_results(alm, sft):
    """Teacher 1.0 and FVT 2.0 bits/byte on every split; per-seed students as given."""
    splits = ("heldout_plays", "heldout_poems", "heldout_milton")
    cells = {f"{m}/seed{s}": {"bits_per_byte": {sp: v for sp in splits}}
             for m, vals in (("transfer_alm", alm), ("transfer_sft", sft))
             for s, v in enumerate(vals)}
    return {"cells": cells, "teacher": {sp: 1.0 for sp in splits},
            "init": {"xtok": {sp: 2.0 for sp in splits}}}


def test_transfer_gaps_are_per_seed_shares_of_the_fvt_to_teacher_gap(quality):
    results = _transfer_results(alm=[1.2, 1.1, 1.3], sft=[1.8, 1.9])
    gaps = quality.transfer_gaps(results, ["transfer_sft", "transfer_alm"], ["heldout_plays"])
    alm = gaps["transfer_alm"]["heldout_plays"]
    assert alm["mean"] == pytest.approx(0.8) and alm["std"] == pytest.approx(0.1)
    assert alm["n"] == 3 and gaps["transfer_sft"]["heldout_plays"]["n"] == 2
    assert gaps["transfer_sft"]["heldout_plays"]["mean"] == pytest.approx(0.15)
    results["teacher"]["heldout_plays"] = 2.5  # the teacher is not ahead: no share
    assert quality.transfer_gaps(results, ["transfer_alm"], ["heldout_plays"]) == {}


def test_transfer_table_lists_teacher_fvt_gaps_and_per_seed_margins(quality):
    results = _transfer_results(alm=[1.2, 1.1, 1.3], sft=[1.8, 1.9, 1.7])
    splits = ["heldout_plays", "heldout_poems", "heldout_milton"]
    summary = quality.summarize(results, list(quality.TRANSFER_METHODS), splits)
    text = quality.table_text(results, summary, quality.TRANSFER_METHODS, True)
    rows = text.splitlines()
    assert rows[2].startswith("| teacher") and rows[3].startswith("| FVT")
    alm = next(r for r in rows if r.startswith("| transfer_alm"))
    assert "1.2000 ± 0.1000" in alm and "80.0% ± 10.0%" in alm and alm.endswith("| 3 |")
    assert "transfer_alm - transfer_sft, heldout_milton, per seed: seed 0 -0.6000" in text


def test_transfer_setting_moves_every_layer_at_one_lr(quality):
    assert "student.layers=[]" in quality.TRANSFER_OVERRIDES
    lrs = {o for m in quality.TRANSFER_METHODS.values() for o in m.overrides
           if o.startswith("optimizer.lr=")}
    assert lrs == {f"optimizer.lr={quality.TRANSFER_LR}"}
    assert all(any(o.startswith("optimizer.lr=") for o in m.overrides)
               for m in quality.TRANSFER_METHODS.values())
    from distill_jax import demo
    cfg = demo.load_run_config(demo.XTOK_CONFIG, list(quality.TRANSFER_OVERRIDES))
    assert cfg.student.layers == () and cfg.student.init == "transfer"


def test_each_setting_has_its_overrides_and_a_run_directory_of_its_own(quality):
    extra, tag = quality.setting_extra(True, False, 120, 480)
    assert extra == [*quality.TRANSFER_OVERRIDES, "data.max_records=480"]
    assert tag == "steps120_transfer_records480"
    # the recipe's own records: the directory of the earlier runs
    assert quality.setting_extra(True, False, 120, None) == (list(quality.TRANSFER_OVERRIDES),
                                                              "steps120_transfer")
    extra, tag = quality.setting_extra(False, True, 40, None)
    assert extra == quality.quick_overrides() and tag == "quick"
    from distill_jax import demo
    cfg = demo.load_run_config(demo.XTOK_CONFIG, quality.setting_extra(True, False, 120, 480)[0])
    assert cfg.data.max_records == 480 and demo.setting_key(cfg)["max_records"] == 480


def test_unseen_bytes_share_counts_held_out_bytes_of_tokens_training_never_holds(quality):
    from distill_jax.tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    # byte tokens: "a", "b" and " " are seen; "é" is two unseen byte tokens, "z" one
    assert quality.unseen_bytes_share(tok, ["ab a"], ["ab", "ba"]) == 0.0
    assert quality.unseen_bytes_share(tok, ["ab a"], ["a z", "é"]) == pytest.approx(3 / 5)
    assert quality.unseen_bytes_share(tok, [], ["xy"]) == 1.0
    assert quality.unseen_bytes_share(tok, ["x"], []) == 0.0


def test_transfer_table_reports_unseen_bytes_when_measured(quality):
    results = {"cells": {}, "teacher": {}, "init": {},
               "unseen_bytes": {"heldout_plays": 0.217, "heldout_poems": 0.21,
                                "heldout_milton": 0.316}}
    text = quality.transfer_table_text(results, {}, quality.TRANSFER_METHODS)
    assert "heldout_plays 21.7%" in text and "heldout_milton 31.6%" in text
    assert "no training paragraph" not in quality.transfer_table_text(
        {"cells": {}, "teacher": {}, "init": {}}, {}, quality.TRANSFER_METHODS)


def heldout_cfg(tmp_path, texts):
    """configs/tiny.yaml with the byte tokenizer, evaluating ``texts`` (one document each)."""
    from distill_jax.config import load_run_config
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return load_run_config(REPO / "configs/tiny.yaml", [
        "data.record=text", "data.loss_on_prompt=false", "tokenizer=bytes",
        f"eval.sources=[{{path: {path}}}]", "eval.max_documents=null", "eval.seq_len=64",
        "eval.batch_size=2"])


def assert_split_matches_float64(got, model, docs, region):
    """``got`` (a :func:`coverage_bpb` entry) against float64 numpy: each scored token ``j`` of
    each of ``docs`` (one causal forward of the whole document) in ``region(doc, j)``."""
    import math

    import jax
    import numpy as np

    from distill_jax import models as M
    nll = {"seen": 0.0, "unseen": 0.0}
    nbytes = {"seen": 0, "unseen": 0}
    for d in docs:
        row = np.zeros((1, 64), np.int32)
        row[0, :len(d.ids)] = d.ids
        z = np.asarray(jax.jit(M.forward)(model, row), np.float64)[0]
        logp = z - z.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(1, len(d.ids)):
            if d.scored[j]:
                k = region(d, j)
                nll[k] -= logp[j - 1, d.ids[j]]
                nbytes[k] += int(d.byte_widths[j])
    assert nbytes["unseen"] > 0 and nbytes["seen"] > 0
    for k in ("seen", "unseen"):
        np.testing.assert_allclose(got[k], nll[k] / math.log(2) / nbytes[k], rtol=1e-5)
    assert got["unseen_share"] == pytest.approx(nbytes["unseen"] / sum(nbytes.values()))


def test_coverage_splits_held_out_bits_per_byte_by_seen_tokens_against_float64(quality,
                                                                               tmp_path):
    from distill_jax import models as M
    from distill_jax.eval.run import heldout_docs
    from distill_jax.models import presets
    from distill_jax.tokenizer import load_tokenizer
    tok = load_tokenizer("bytes")
    model = M.init(presets.preset("tiny-llama", vocab_size=259, num_layers=1, hidden_size=32,
                                  intermediate_size=64, num_heads=2, num_kv_heads=1), 3)
    cfg = heldout_cfg(tmp_path, ["abba cab", "the cat sat", "zebra"])
    seen = quality.seen_ids(tok, ["a cab"])  # a, c, b, space, and the special tokens
    assert {tok.eos_token_id} | {i + 3 for i in b"a cb"} <= seen

    got = quality.coverage_bpb(model, tok, {"heldout": cfg}, seen)["heldout"]
    assert_split_matches_float64(got, model, heldout_docs(cfg, tok)[0],
                                 lambda d, j: "seen" if int(d.ids[j]) in seen else "unseen")


def test_regions_of_puts_each_token_where_most_of_its_bytes_are(quality):
    import numpy as np

    from distill_jax.eval.lm import ScoredDoc

    def doc(spans):
        starts, ends = (np.array(x, np.int64) for x in zip(*spans))
        return ScoredDoc(np.arange(len(spans)), np.ones(len(spans), bool), starts, ends)
    student = doc([(0, 3), (3, 5), (5, 8)])  # bytes 3 and 4 are in the one unknown token
    known = np.array([True, False, True])
    other = doc([(0, 2), (2, 4), (3, 5), (4, 8), (8, 8), (2, 5)])
    assert quality.regions_of(student, known, other).tolist() == [
        True, True, False, True, True, False]  # half inside counts as known; 2 of 3 does not


def test_coverage_of_a_teacher_with_another_tokenizer_against_float64(quality, tmp_path):
    from distill_jax import assets
    from distill_jax import models as M
    from distill_jax.eval.run import heldout_docs
    from distill_jax.models import presets
    from distill_jax.tokenizer import load_tokenizer
    try:
        teacher_tok = load_tokenizer(assets.smollm2_hf_dir())
    except assets.AssetError as err:
        pytest.skip(f"SmolLM2 unavailable: {err}")
    tok = load_tokenizer("bytes")
    model = M.init(presets.preset("tiny-llama", vocab_size=len(teacher_tok), num_layers=1,
                                  hidden_size=16, intermediate_size=32, num_heads=2,
                                  num_kv_heads=1), 5)
    cfg = heldout_cfg(tmp_path, ["the zebra sat on the mat", "a quixotic cat"])
    seen = quality.seen_ids(tok, ["the sat on mat a cat"])  # z, b, r, q, u, i, x not seen

    got = quality.coverage_bpb(model, tok, {"h": cfg}, seen, teacher_tokenizer=teacher_tok)["h"]

    students, teachers = heldout_docs(cfg, tok, teacher_tok)
    unknown = {}  # per teacher document: the bytes of student tokens training never saw
    for s, t in zip(students, teachers):
        unknown[id(t)] = {b for i, lo, hi in zip(s.ids, s.byte_starts, s.byte_ends)
                          if int(i) not in seen for b in range(lo, hi)}

    def region(t, j):
        lo, hi = int(t.byte_starts[j]), int(t.byte_ends[j])
        return "unseen" if 2 * len(unknown[id(t)] & set(range(lo, hi))) > hi - lo else "seen"
    assert_split_matches_float64(got, model, teachers, region)


def test_coverage_table_shows_teacher_init_each_method_and_gap_shares(quality):
    cov = {"heldout_plays": {"seen": 1.5, "unseen": 4.0, "unseen_share": 0.2}}
    results = {"coverage": {"init": cov,
                            "transfer_sft/seed0": {"heldout_plays": {"seen": 1.0, "unseen": 5.0}},
                            "transfer_sft/seed1": {"heldout_plays": {"seen": 1.2, "unseen": 5.5}}}}
    text = quality.coverage_text(results, quality.TRANSFER_METHODS)
    assert "heldout_plays unseen (20.0% of bytes)" in text
    assert "| as initialised (before training) | 1.5000 | 4.0000 | 1 |" in text
    assert "| transfer_sft: sft only, all layers, Mistral tokenizer | 1.1000 | 5.2500 | 2 |" in text
    assert quality.coverage_text({}, quality.TRANSFER_METHODS) == ""
    # with the teacher: its row, and the share of the init-to-teacher gap per region
    results["coverage"]["teacher"] = {"heldout_plays": {"seen": 1.0, "unseen": 3.0,
                                                        "unseen_share": 0.21}}
    text = quality.coverage_text(results, quality.TRANSFER_METHODS)
    assert "| teacher (each of its tokens where most of its bytes are) | 1.0000 | 3.0000 | 1 |" in text
    # seen: (1.5 - 1.1) / (1.5 - 1.0) = 80%; unseen: (4.0 - 5.25) / (4.0 - 3.0) = -125%
    assert "| 1.1000 (80%) | 5.2500 (-125%) | 2 |" in text
