"""On-policy evaluation during training (``eval.onpolicy``): the student completes held-out
prompts with a fixed key, the teacher grades the completions, and the metrics are logged as
``eval/onpolicy/...`` at every evaluation."""

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import onpolicy, sharding
from distill_jax.config import load_run_config
from distill_jax.train import optim
from distill_jax.train.assemble import RunSetup, assemble, make_onpolicy_evaluator
from distill_jax.train.loop import run
from distill_jax.train.step import MODEL
from tests.conftest import logged_rows, step_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "onpolicy_tiny.yaml"
HELDOUT = REPO / "configs" / "data" / "math_test.jsonl"
NAMES = ("teacher_logprob", "reverse_kl", "loss", "tokens", "mean_completion_length",
         "eos_share", "sampled_rows", "generated_tokens")


def _cfg(run_dir, *overrides: str):
    return load_run_config(CONFIG, [
        f"run_dir={run_dir}", "logging.every=1", "logging.progress=false",
        "onpolicy.max_new_tokens=12", "eval.onpolicy=true", "eval.batches=2",
        f"eval.sources=[{{path: {HELDOUT}}}]", *overrides])


# -- in the training loop -------------------------------------------------------------------
# held-out text needs rows that hold a math record (the text evaluation runs beside)
RUN = ("steps=4", "eval.every=2", "data.seq_len=512", "checkpoint.every=100",
       "onpolicy.lmbda=1.0")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("oeval") / "whole"
    run(_cfg(run_dir, *RUN))
    return run_dir


def test_metrics_are_logged_at_eval_steps(whole_run):
    rows = {r["step"]: r for r in logged_rows(whole_run) if "step" in r}
    for step in (2, 4):
        r = rows[step]
        for name in NAMES:
            assert onpolicy.EVAL_PREFIX + name in r, (step, name)
        assert r["eval/onpolicy/sampled_rows"] == 16  # eval.batches x data.batch_size
        assert 16 <= r["eval/onpolicy/generated_tokens"] <= 16 * 12
        assert r["eval/onpolicy/mean_completion_length"] == pytest.approx(
            r["eval/onpolicy/generated_tokens"] / 16)
        assert r["eval/onpolicy/teacher_logprob"] < 0 and r["eval/onpolicy/reverse_kl"] > 0
        assert "eval/loss" in r  # the off-policy held-out text evaluation stays
    for step in (1, 3):
        assert not any(k.startswith("eval/") for k in rows[step])
    # the student trained between the two evaluations: the same prompts, other numbers
    assert rows[2]["eval/onpolicy/reverse_kl"] != rows[4]["eval/onpolicy/reverse_kl"]


def test_resumed_run_evaluates_as_the_uninterrupted_one(whole_run, tmp_path):
    parts = tmp_path / "parts"
    run(_cfg(parts, *RUN), max_steps_this_call=2)
    run(_cfg(parts, *RUN))
    whole, resumed = step_metrics(whole_run), step_metrics(parts)
    assert sorted(whole) == sorted(resumed) == [1, 2, 3, 4]
    for step in (2, 4):
        got = {k: v for k, v in resumed[step].items() if k.startswith(onpolicy.EVAL_PREFIX)}
        want = {k: v for k, v in whole[step].items() if k.startswith(onpolicy.EVAL_PREFIX)}
        assert got and got == want
    assert whole == resumed


def test_eval_command_reports_what_training_logged(whole_run):
    """``distill-jax eval`` (:func:`run_eval`) of the run's last checkpoint gives the on-policy
    metrics training logged at that step, and prints them."""
    from distill_jax.eval import format_table, run_eval
    result = run_eval(_cfg(whole_run, *RUN, "eval.max_documents=4"), progress=False,
                      write=False)
    logged = {r["step"]: r for r in logged_rows(whole_run) if "step" in r}[4]
    got = result["onpolicy"]
    assert result["step"] == 4 and got is not None
    for name in NAMES:
        key = onpolicy.EVAL_PREFIX + name
        np.testing.assert_allclose(got[key], logged[key], rtol=1e-6, err_msg=name)
    assert "on-policy (student samples, teacher grades)" in format_table(result)


# -- the evaluator alone ---------------------------------------------------------------------
def _assembled(tmp_path, *overrides):
    cfg = _cfg(tmp_path / "r", *overrides)
    r = assemble(cfg)
    state = r.initial_state(optim.make_optimizer(cfg.optimizer, cfg.steps))
    return cfg, r, state, sharding.batch_sharding(r.mesh, 2, r.rules)


def test_fixed_key_makes_evaluations_of_the_same_params_identical(tmp_path):
    """Sampling at temperature 1: two evaluations of the same params (and a freshly built
    evaluator) give the same metrics, whatever the training state's key; another run seed
    samples other completions (so the key, not chance, makes them equal)."""
    cfg, r, state, bs = _assembled(tmp_path)
    evaluate = make_onpolicy_evaluator(r.setup, bs)
    first = evaluate(state.params, r.teacher_params)
    assert first == evaluate(state.params, r.teacher_params)
    assert first == make_onpolicy_evaluator(r.setup, bs)(state.params, r.teacher_params)
    other = RunSetup(dataclasses.replace(cfg, seed=cfg.seed + 1), r.spec, r.tokenizer,
                     r.teacher_tokenizer, r.student.config, r.teacher.config, False)
    assert make_onpolicy_evaluator(other, bs)(state.params, r.teacher_params) != first


# -- a planted teacher and student: bigram models, the reference in float64 numpy ------------
def _bigram(params, rng, width, vocab, scale):
    """``params`` made a bigram model: attention and MLP outputs zeroed, so the final hidden
    state at a slot is the embedding of its token; a random embedding, norm and lm_head."""
    p = jax.tree.map(np.asarray, params)
    p["layers"]["attn"]["o"] = np.zeros_like(p["layers"]["attn"]["o"])
    p["layers"]["mlp"]["down"] = np.zeros_like(p["layers"]["mlp"]["down"])
    p["embed"] = rng.normal(size=(vocab, width)).astype(np.float32)
    p["final_norm"]["scale"] = rng.uniform(0.5, 1.5, size=(width,)).astype(np.float32)
    p["lm_head"] = (scale * rng.normal(size=(width, vocab))).astype(np.float32)
    return p


def _logprob_table(p, eps):
    """(V, V) float64 log p(next | current token) of a :func:`_bigram` model."""
    e = p["embed"].astype(np.float64)
    h = e / np.sqrt(np.mean(e * e, axis=-1, keepdims=True) + eps)
    z = (h * p["final_norm"]["scale"].astype(np.float64)) @ p["lm_head"].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _greedy(table_s, first, n, eos):
    out = []
    tok = first
    for _ in range(n):
        tok = int(np.argmax(table_s[tok]))
        out.append(tok)
        if tok in eos:
            break
    return out


def test_planted_bigram_models_give_the_numpy_reference(tmp_path):
    """Greedy evaluation (``eval.onpolicy_temperature=0``) of bigram student and teacher: the
    student's completions, the teacher's mean log-prob per sampled token, the reverse KL per
    token, the mean completion length and the EOS share equal a float64 numpy computation
    over both held-out prompt batches, with rows that stop at an end-of-sequence id and rows
    that run to ``max_new_tokens``."""
    cfg, r, state, bs = _assembled(tmp_path, "eval.onpolicy_temperature=0",
                                   "student.dtype=float32", "teacher.dtype=float32")
    rng = np.random.default_rng(0)
    sc, tc = r.student.config, r.teacher.config
    student = _bigram(state.params[MODEL], rng, sc.hidden_size, sc.vocab_size, 0.4)
    teacher = _bigram(r.teacher.params, rng, tc.hidden_size, tc.vocab_size, 0.3)
    log_s, log_t = _logprob_table(student, sc.rms_norm_eps), _logprob_table(teacher,
                                                                            tc.rms_norm_eps)
    n = cfg.onpolicy.max_new_tokens
    eval_data = dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle=False,
                                    num_epochs=None, workers=0)
    it = onpolicy.make_prompt_iterator(eval_data, r.tokenizer, max_new_tokens=n,
                                       buckets=cfg.onpolicy.prompt_buckets)
    last = np.concatenate([next(it)["prompt_tokens"][:, -1] for _ in range(cfg.eval.batches)])
    free = _greedy(log_s, int(last[0]), n, set())
    # the chat template ends every prompt alike, so the chains agree: with an end-of-sequence
    # id the chain reaches (rows stop early), and with one it never reaches
    never = next(y for y in range(sc.vocab_size) if y not in free)
    for eos in ({free[3]}, {never}):
        chains = [_greedy(log_s, int(t), n, eos) for t in last]
        lp_t, kl = [], []
        for t, chain in zip(last, chains):
            for prev, y in zip([int(t), *chain[:-1]], chain):
                lp_t.append(log_t[prev, y])
                kl.append(np.sum(np.exp(log_s[prev]) * (log_s[prev] - log_t[prev])))
        want = {"teacher_logprob": np.mean(lp_t), "reverse_kl": np.mean(kl),
                "mean_completion_length": np.mean([len(c) for c in chains]),
                "eos_share": np.mean([c[-1] in eos for c in chains]), "tokens": len(lp_t)}
        assert want["mean_completion_length"] == (4 if eos == {free[3]} else n)

        r.setup.onpolicy = dataclasses.replace(r.setup.onpolicy, eos_ids=tuple(eos))
        params = {**state.params, MODEL: student}
        got = make_onpolicy_evaluator(r.setup, bs)(params, teacher)
        for name, value in want.items():
            np.testing.assert_allclose(got[onpolicy.EVAL_PREFIX + name], value, rtol=1e-5,
                                       err_msg=name)
    assert want["reverse_kl"] > 0.1 and want["teacher_logprob"] < -1  # not trivially small


# -- refusals at config load -----------------------------------------------------------------
@pytest.mark.parametrize("config,overrides,match", [
    (CONFIG, ("onpolicy=null",), "add an onpolicy: section"),
    (REPO / "configs" / "onpolicy_xtok_tiny.yaml", (), "same-tokenizer on-policy runs only"),
    (CONFIG, ("eval.onpolicy_temperature=-1",), "eval.onpolicy_temperature=-1"),
])
def test_bad_config_gets_a_one_line_error(tmp_path, config, overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        load_run_config(config, [f"run_dir={tmp_path}", "eval.onpolicy=true", *overrides])
    assert "\n" not in str(e.value)
