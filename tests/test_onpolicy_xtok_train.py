"""On-policy distillation across tokenizers as a configured run (``onpolicy:`` + cross-tokenizer
terms): the jitted rollout, the host conversion, lmbda mixing with the pipeline's rows and the
unchanged cross-tokenizer step; lmbda 0 = the off-policy run, exact resume, one compilation."""

from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import checkpoint, cli, onpolicy, sharding
from distill_jax.config import load_run_config
from distill_jax.onpolicy import xtok as X
from distill_jax.onpolicy import xtok_train as XT
from distill_jax.train import optim
from distill_jax.train.assemble import assemble, global_batch
from distill_jax.train.loop import run
from distill_jax.train.step import jit_train_step
from tests.conftest import logged_rows, saved_params, step_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "onpolicy_xtok_tiny.yaml"
SAMPLE_METRICS = ("onpolicy/sampled_rows", "onpolicy/teacher_logprob",
                  "onpolicy/teacher_logprob_per_byte", "onpolicy/cut_tokens",
                  "onpolicy/eos_share", "onpolicy/mean_completion_bytes")


def _cfg(run_dir, *overrides: str):
    return load_run_config(CONFIG, [f"run_dir={run_dir}", "logging.every=1",
                                    "logging.progress=false", "onpolicy.max_new_tokens=8",
                                    "onpolicy.prompt_buckets=[448]", *overrides])


def test_lmbda_zero_is_the_off_policy_run(tmp_path):
    """lmbda = 0: the on-policy cross-tokenizer run trains exactly as the same config without
    its onpolicy section (the off-policy ALM run): the same losses step for step and the same
    final params, bit for bit; no row is sampled."""
    run(_cfg(tmp_path / "on", "steps=2", "onpolicy.lmbda=0.0"))
    run(_cfg(tmp_path / "off", "steps=2", "onpolicy=null"))
    on, off = logged_rows(tmp_path / "on"), logged_rows(tmp_path / "off")
    assert [r["step"] for r in on] == [r["step"] for r in off] == [1, 2]
    for a, b in zip(on, off):
        assert a["distill/loss"] > 0 and a["onpolicy/sampled_rows"] == 0
        for k in b:
            if k.startswith("distill/"):
                assert a[k] == b[k], k
    for a, b in zip(jax.tree.leaves(saved_params(tmp_path / "on")),
                    jax.tree.leaves(saved_params(tmp_path / "off")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Stopped after 2 of 4 steps and resumed, the run logs the same metrics and ends with the
    same params as the one that never stopped (mix=row: both streams are read; the rollout key
    is the state's, the mixing draws the step's, both streams' positions are checkpointed)."""
    over = ("steps=4", "onpolicy.lmbda=0.5", "onpolicy.mix=row", "checkpoint.every=100")
    run(_cfg(tmp_path / "whole", *over))
    run(_cfg(tmp_path / "parts", *over), max_steps_this_call=2)
    assert checkpoint.latest_step(tmp_path / "parts" / "checkpoints") == 2
    run(_cfg(tmp_path / "parts", *over))

    whole, parts = step_metrics(tmp_path / "whole"), step_metrics(tmp_path / "parts")
    assert sorted(whole) == sorted(parts) == [1, 2, 3, 4]
    assert whole == parts
    sampled = [whole[s]["onpolicy/sampled_rows"] for s in whole]
    assert 0 < sum(sampled) < 4 * 8  # rows of both kinds
    for a, b in zip(jax.tree.leaves(saved_params(tmp_path / "whole")),
                    jax.tree.leaves(saved_params(tmp_path / "parts")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batches_have_fixed_shapes_and_the_step_compiles_once(tmp_path):
    """Batches of samples (two prompt buckets) and of the pipeline's rows have the same
    shapes, so the loop's jitted step compiles once; a sampled batch's rows are the conversion
    of the rollout's rows (the sampler reproduced by hand), mixed per row with the pipeline's."""
    cfg = _cfg(tmp_path / "r", "onpolicy.lmbda=0.5", "onpolicy.mix=row",
               "onpolicy.prompt_buckets=[320, 448]", "data.max_records=40")
    r = assemble(cfg)
    opt = optim.make_optimizer(cfg.optimizer, cfg.steps)
    state = r.initial_state(opt)
    batch_sharding = sharding.batch_sharding(r.mesh, 2, r.rules)
    step = jit_train_step(r.train_step(opt, optim.make_schedule(cfg.optimizer, cfg.steps)),
                          state, r.teacher_params, batch_sharding, r.batch_keys,
                          r.batch_ranks)
    it = r.data_iterator()
    assert isinstance(it, onpolicy.XtokBatches)
    with pytest.raises(TypeError, match="next_batch"):
        next(it)
    widths, kinds, sample = set(), set(), it.sample

    def recording(params, rng, prompts):
        widths.add(prompts["prompt_tokens"].shape[1])
        return sample(params, rng, prompts)
    it.sample = recording
    for i in range(4):
        draws = it.draws(i)
        local = r.next_batch(it, state, i)
        np.testing.assert_array_equal(local[XT.SAMPLED], draws)
        kinds.update(draws.tolist())
        assert local["tokens"].shape == (8, cfg.data.seq_len)
        assert local["teacher_tokens"].shape == (8, cfg.data.teacher_seq_len)
        assert not local[X.CUT_TOKENS][~draws].any()
        state, metrics = step(state, r.teacher_params,
                              global_batch(local, batch_sharding, r.batch_keys))
        assert float(metrics["onpolicy/sampled_rows"]) == draws.sum()
        assert np.isfinite(float(metrics["distill/loss"]))
    assert kinds == {True, False} and widths == {320, 448}
    assert step._cache_size() == 1


@pytest.mark.parametrize("overrides,match", [
    (("teacher.cache=/tmp/some_cache",), "unset teacher.cache"),
    (("loss.terms={sft: 1.0}",), r"needs a live teacher.*loss.terms=\{alm: 1.0, sft: 0.1\}"),
    (("data.record=text",), "set data.record to chat or prompt_response"),
    (("data.loss_on_prompt=true",), "set data.loss_on_prompt=false"),
])
def test_bad_config_gets_a_one_line_error(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        _cfg(tmp_path / "r", *overrides)
    assert "\n" not in str(e.value)


def test_cli_trains_the_tiny_config(tmp_path, monkeypatch, capsys):
    """``distill-jax train configs/onpolicy_xtok_tiny.yaml`` (lmbda 1: every step samples)
    runs end to end: the sample metrics in every logged step and on the progress line, a
    checkpoint at the end."""
    monkeypatch.chdir(REPO)
    rc = cli.main(["train", str(CONFIG), f"run_dir={tmp_path / 'run'}", "steps=2",
                   "checkpoint.every=2", "logging.every=1", "onpolicy.lmbda=1.0",
                   "onpolicy.max_new_tokens=8", "onpolicy.prompt_buckets=[448]",
                   "data.max_records=16"])
    assert rc == 0
    rows = logged_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(k in r for k in SAMPLE_METRICS)
        assert r["onpolicy/sampled_rows"] == 8 and r["onpolicy/teacher_logprob"] < 0
        assert r["time/rollout"] > 0 and r["time/retokenize"] > 0
    err = capsys.readouterr().err
    assert "teacher_logprob=" in err and "cut_tokens=" in err
    assert checkpoint.latest_step(tmp_path / "run" / "checkpoints") == 2


def test_mixing_draws():
    """The draws: mix=batch one per step for the whole batch, mix=row one per row of the global
    batch (two processes' rows are the one-process run's halves), lmbda 0 never and 1 always,
    the share of sampled rows near lmbda, and the same draws for the same seed and step."""
    def batches(lmbda, mix, p=0, n=1, rows=8, seed=0):
        return onpolicy.XtokBatches(None, None, lmbda=lmbda, mix=mix, seed=seed, rows=rows,
                                    sample=None, student_tokenizer=None, teacher_tokenizer=None,
                                    config=None, process_index=p, process_count=n)
    one = batches(0.5, "row")
    halves = [batches(0.5, "row", p, 2, rows=4) for p in (0, 1)]
    for step in range(20):
        np.testing.assert_array_equal(one.draws(step), np.concatenate(
            [h.draws(step) for h in halves]))
        b = batches(0.5, "batch").draws(step)
        assert b.all() or not b.any()
    rows = np.concatenate([one.draws(s) for s in range(500)])
    assert abs(rows.mean() - 0.5) < 0.03
    steps = np.asarray([batches(0.3, "batch").draws(s)[0] for s in range(1000)])
    assert abs(steps.mean() - 0.3) < 0.05
    for mix in ("batch", "row"):
        assert not any(batches(0.0, mix).draws(s).any() for s in range(50))
        assert all(batches(1.0, mix).draws(s).all() for s in range(50))
    assert not np.array_equal(np.concatenate([one.draws(s) for s in range(5)]), np.concatenate(
        [batches(0.5, "row", seed=1).draws(s) for s in range(5)]))
