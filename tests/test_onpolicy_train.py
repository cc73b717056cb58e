"""On-policy distillation as a configured run (``onpolicy:`` section): the student's own samples,
graded by the live teacher, through the one step factory; exact resume and accumulation."""

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from distill_jax import checkpoint, onpolicy, sharding
from distill_jax.config import load_run_config
from distill_jax.losses import terms
from distill_jax.train import optim
from distill_jax.train.assemble import assemble, global_batch
from distill_jax.train.loop import run
from distill_jax.train.step import MODEL, jit_train_step, make_step
from tests.conftest import logged_rows, saved_params, step_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "onpolicy_tiny.yaml"
ROLLOUT = ("onpolicy/sampled_rows", "onpolicy/generated_tokens",
           "onpolicy/mean_completion_length", "onpolicy/eos_share")


def _cfg(run_dir, *overrides: str):
    return load_run_config(CONFIG, [f"run_dir={run_dir}", "logging.every=1",
                                    "logging.progress=false", "onpolicy.max_new_tokens=12",
                                    *overrides])


def test_lmbda_zero_reproduces_the_off_policy_run(tmp_path):
    """lmbda = 0: the configured on-policy run's losses and params are, step for step, those of
    the live-teacher off-policy step on the dataset rows of the same prompt batches."""
    cfg = _cfg(tmp_path / "on", "steps=3", "onpolicy.lmbda=0.0")
    run(cfg)
    logged = [r["distill/loss"] for r in logged_rows(tmp_path / "on") if "distill/loss" in r]
    assert len(logged) == 3 and all(r["onpolicy/sampled_rows"] == 0 for r in logged_rows(tmp_path / "on")
                                    if "onpolicy/sampled_rows" in r)

    r = assemble(cfg)
    opt = optim.make_optimizer(cfg.optimizer, cfg.steps)
    schedule = optim.make_schedule(cfg.optimizer, cfg.steps)
    state = r.initial_state(opt)
    batch_sharding = sharding.batch_sharding(r.mesh, 2, r.rules)
    step = jit_train_step(  # as the loop jits its step: the same shardings and guard
        optim.guard_nonfinite(make_step(r.student.config, r.teacher.config, r.spec,
                                        terms.LIVE_SAME, opt, schedule,
                                        chunk_size=cfg.loss.chunk_size), False),
        state, r.teacher_params, batch_sharding, terms.BATCH_KEYS)
    it = r.data_iterator()
    losses = []
    for _ in range(3):
        pb = next(it)
        rows = onpolicy.pack_rows(pb["prompt_tokens"], pb["prompt_lengths"],
                                  pb["reference_tokens"], pb["reference_lengths"],
                                  pb["reference_mask"])
        batch = global_batch({k: np.asarray(rows[k]) for k in terms.BATCH_KEYS},
                             batch_sharding, terms.BATCH_KEYS)
        state, metrics = step(state, r.teacher_params, batch)
        losses.append(float(metrics["distill/loss"]))
    assert losses[0] > 0
    np.testing.assert_array_equal(np.asarray(logged), np.asarray(losses, np.float64))
    for a, b in zip(jax.tree.leaves(saved_params(tmp_path / "on")[MODEL]),
                    jax.tree.leaves(state.params[MODEL]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("term", ["reverse_kl", onpolicy.SAMPLED_REVERSE_KL])
def test_configured_tiny_run_trains_and_logs_the_rollout(tmp_path, term):
    """configs/onpolicy_tiny.yaml (lmbda = 1 here, so every step samples) trains end to end
    with GKD's reverse KL or the sampled-token one: finite losses, the rollout metrics in every
    logged step, a checkpoint at the end."""
    run_dir = tmp_path / "run"
    run(_cfg(run_dir, "steps=3", "onpolicy.lmbda=1.0", f"loss.terms={{{term}: 1.0}}"))
    rows = [r for r in logged_rows(run_dir) if "distill/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["distill/loss"]) and f"distill/{term}" in r
        assert r["distill/loss"] > 0 if term == "reverse_kl" else r["distill/loss"] != 0
        assert all(k in r for k in ROLLOUT)
        assert r["onpolicy/sampled_rows"] == 8  # data.batch_size
        assert 8 <= r["onpolicy/generated_tokens"] <= 8 * 12
        assert r["onpolicy/mean_completion_length"] == r["onpolicy/generated_tokens"] / 8
        assert 0 <= r["onpolicy/eos_share"] <= 1
        # throughput counts the trained rows' slots: 8 rows of a bucket (256, 384) + 12 tokens
        slots = r["perf/tokens_per_sec"] * r["perf/step_time_s"]
        assert slots == pytest.approx(8 * 268) or slots == pytest.approx(8 * 396)
    assert checkpoint.latest_step(run_dir / "checkpoints") == 3


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """A run stopped after 2 of 5 steps and resumed logs the same metrics and ends with the
    same params as the run that never stopped: the rollout key is the state's, the prompt
    stream's position is in the checkpoint."""
    over = ("steps=5", "onpolicy.lmbda=0.5", "onpolicy.mix=row", "checkpoint.every=100")
    run(_cfg(tmp_path / "whole", *over))
    run(_cfg(tmp_path / "parts", *over), max_steps_this_call=2)
    assert checkpoint.latest_step(tmp_path / "parts" / "checkpoints") == 2
    run(_cfg(tmp_path / "parts", *over))

    whole, parts = step_metrics(tmp_path / "whole"), step_metrics(tmp_path / "parts")
    assert sorted(whole) == sorted(parts) == [1, 2, 3, 4, 5]
    assert whole == parts
    assert sum(whole[s]["onpolicy/sampled_rows"] for s in whole) > 0  # it did sample
    for a, b in zip(jax.tree.leaves(saved_params(tmp_path / "whole")),
                    jax.tree.leaves(saved_params(tmp_path / "parts")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_is_exact(tmp_path):
    """grad_accum 2 vs 1 on the same prompt batch and state (so the same key and samples):
    the same SGD update within 1e-6, the same loss and rollout metrics."""
    cfg = _cfg(tmp_path / "r", "onpolicy.lmbda=1.0")
    r = assemble(cfg)
    sgd = optax.sgd(0.5)
    state = r.initial_state(sgd)
    pb = {k: jax.numpy.asarray(v) for k, v in next(r.data_iterator()).items()}
    out = {}
    for accum in (1, 2):
        step = make_step(r.student.config, r.teacher.config, r.spec, r.signal, sgd,
                         grad_accum=accum, chunk_size=cfg.loss.chunk_size)
        out[accum] = jax.jit(step)(state, r.teacher_params, pb)
    (s1, m1), (s2, m2) = out[1], out[2]
    assert float(m1["onpolicy/sampled_rows"]) == 8 and float(m1["distill/loss"]) > 0
    for k in ("distill/loss", *ROLLOUT):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-6, atol=1e-7)
    moved = 0.0
    for p0, a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s1.params),
                        jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
    assert moved > 1e-4  # the update is not trivially zero


@pytest.mark.parametrize("overrides,match", [
    (("teacher.cache=/tmp/some_cache",), "unset teacher.cache"),
    (("data.record=text",), "set data.record to chat or prompt_response"),
    (("loss.terms={cross_entropy: 1.0}",), "needs a live teacher"),
    (("data.loss_on_prompt=true",), "set data.loss_on_prompt=false"),
    (("onpolicy.lmbda=1.5",), r"onpolicy.lmbda=1.5"),
    (("teacher.tokenizer=mistral",), "unset teacher.tokenizer"),
])
def test_bad_config_gets_a_one_line_error(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        _cfg(tmp_path / "r", *overrides)
    assert "\n" not in str(e.value)


def test_prompt_stream_resumes_exactly_and_shards_cover_the_batch(tmp_path):
    """The prompt stream's state restores the same next batches; two shards in one process give
    the rows of the one-shard batch's two halves' documents (the pipeline's plan)."""
    cfg = _cfg(tmp_path / "r", "data.shuffle=false")
    from distill_jax.tokenizer import load_tokenizer
    tok = load_tokenizer("bytes")

    def stream(data, **kw):
        return onpolicy.make_prompt_iterator(data, tok, max_new_tokens=12, buckets=(256, 384),
                                             **kw)
    a = stream(cfg.data)
    next(a)
    state = a.get_state()
    expect = [next(a) for _ in range(2)]
    b = stream(cfg.data)
    b.set_state(json.loads(json.dumps(state)))
    for want in expect:
        got = next(b)
        for k in onpolicy.PROMPT_KEYS:
            np.testing.assert_array_equal(got[k], want[k])
    import dataclasses
    two = stream(dataclasses.replace(cfg.data, num_shards=2))
    first = next(two)
    assert first["prompt_tokens"].shape[0] == 8
    # shard s takes documents s, s + 2, ...: rows 0..3 are documents 0, 2, 4, 6; rows 4..7 the
    # odd ones
    one = next(stream(cfg.data))
    np.testing.assert_array_equal(first["prompt_lengths"],
                                  one["prompt_lengths"][[0, 2, 4, 6, 1, 3, 5, 7]])


def test_prompt_longer_than_every_bucket_is_a_clear_error_or_dropped(tmp_path):
    """A prompt no bucket holds: with data.long_docs=split an error naming both fixes; with
    drop it is skipped and counted (and a shard with no usable prompt says so)."""
    import dataclasses

    from distill_jax.errors import UserError
    from distill_jax.tokenizer import load_tokenizer
    cfg = _cfg(tmp_path / "r")
    tok = load_tokenizer("bytes")
    split = dataclasses.replace(cfg.data, long_docs="split")
    with pytest.raises(UserError, match="onpolicy.prompt_buckets.*data.long_docs=drop"):
        next(onpolicy.make_prompt_iterator(split, tok, max_new_tokens=12, buckets=(64,)))
    it = onpolicy.make_prompt_iterator(cfg.data, tok, max_new_tokens=12, buckets=(240,))
    batch = next(it)
    assert batch["prompt_tokens"].shape == (8, 240) and it.stats["data/dropped_docs"] > 0
    with pytest.raises(UserError, match="no usable prompt"):
        next(onpolicy.make_prompt_iterator(cfg.data, tok, max_new_tokens=12, buckets=(16,)))
