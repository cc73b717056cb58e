"""The on-policy step's sample metrics against float64 numpy recounts: the teacher's mean
log-prob of the student's samples (same tokenizer and across tokenizers) and the cut tokens."""

from pathlib import Path

import jax
import numpy as np
import optax

from distill_jax import models as M, onpolicy
from distill_jax.config import load_run_config
from distill_jax.onpolicy import rows as R
from distill_jax.onpolicy import xtok as X
from distill_jax.onpolicy import xtok_train as XT
from distill_jax.train.assemble import assemble
from distill_jax.train.step import MODEL, SIGNAL_SALT, make_step

REPO = Path(__file__).resolve().parents[1]


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _teacher_logprobs64(model, rows, prefix=""):
    """float64 log-probs of each target under ``model``'s full logits (no chunking)."""
    logits = M.forward(model, rows[prefix + "tokens"], positions=rows[prefix + "positions"],
                       segment_ids=rows[prefix + "segment_ids"])
    logp = _log_softmax64(jax.device_get(logits))
    y = np.asarray(rows[prefix + "targets"])
    return np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]


def test_same_tokenizer_teacher_logprob(tmp_path):
    """onpolicy/teacher_logprob of a sampled step is the teacher's mean log-prob (float64,
    full logits) of the sampled completion tokens, EOS included; a step on the data rows
    (lmbda 0) reports 0 and the same loss as without the metric's work."""
    cfg = load_run_config(REPO / "configs" / "onpolicy_tiny.yaml",
                          [f"run_dir={tmp_path}", "onpolicy.lmbda=1.0",
                           "onpolicy.max_new_tokens=12"])
    r = assemble(cfg)
    sgd = optax.sgd(0.1)
    state = r.initial_state(sgd)
    pb = {k: jax.numpy.asarray(v) for k, v in next(r.data_iterator()).items()}
    step = jax.jit(make_step(r.student.config, r.teacher.config, r.spec, r.signal, sgd,
                             chunk_size=cfg.loss.chunk_size))
    _, metrics = step(state, r.teacher_params, pb)
    s = r.setup.onpolicy
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), SIGNAL_SALT)
    rows = jax.device_get(onpolicy.onpolicy_batch(
        r.student.config, state.params[MODEL], pb, key, lmbda=1.0,
        max_new_tokens=s.max_new_tokens, temperature=s.temperature, eos_ids=s.eos_ids))
    lp = _teacher_logprobs64(r.teacher, rows)
    w = (rows["loss_mask"] > 0) & rows[R.SAMPLED][:, None]
    assert w.sum() == float(metrics[R.GENERATED]) > 8
    np.testing.assert_allclose(float(metrics[R.TEACHER_LOGPROB]), lp[w].mean(), rtol=2e-5)
    assert float(metrics[R.TEACHER_LOGPROB]) < 0


def test_cross_tokenizer_teacher_logprob_and_cut_tokens(tmp_path):
    """On an on-policy cross-tokenizer batch, onpolicy/teacher_logprob is the teacher's mean
    log-prob (float64, full logits) of its tokens of the samples' completions (its EOS
    included), per byte likewise; onpolicy/cut_tokens is the decoded samples' cut count; the
    pipeline's rows (mix=row) count in neither."""
    cfg = load_run_config(REPO / "configs" / "onpolicy_xtok_tiny.yaml",
                          [f"run_dir={tmp_path}", "onpolicy.lmbda=0.5", "onpolicy.mix=row",
                           "onpolicy.max_new_tokens=8", "onpolicy.prompt_buckets=[448]"])
    r = assemble(cfg)
    sgd = optax.sgd(0.1)
    state = r.initial_state(sgd)
    it = r.data_iterator()
    step_no = next(i for i in range(20) if 0 < it.draws(i).sum() < 8)
    batch = r.next_batch(it, state, step_no)
    sampled = batch[XT.SAMPLED]
    step = jax.jit(r.train_step(sgd, None))
    _, metrics = step(state, r.teacher_params, {k: batch[k] for k in r.batch_keys})
    lp = _teacher_logprobs64(r.teacher, batch, "teacher_")
    w = (batch["teacher_loss_mask"] > 0) & sampled[:, None]
    assert w.sum() > 0 and float(metrics[XT.ROWS]) == sampled.sum()
    np.testing.assert_allclose(float(metrics[R.TEACHER_LOGPROB]), lp[w].mean(), rtol=2e-5)
    nbytes = batch[X.COMPLETION_BYTES][sampled].sum()
    np.testing.assert_allclose(float(metrics[X.TEACHER_LOGPROB_PER_BYTE]),
                               lp[w].sum() / max(nbytes, 1), rtol=2e-5)
    # the cut tokens: the rollout's rows again (same params, key and first prompt batch), decoded
    again = r.data_iterator()
    rows = again.sample(state.params[MODEL], state.rng, next(again.prompts))
    samples = X.decode_rows(rows, r.tokenizer, record="chat")
    cut = sum(s.cut for s, d in zip(samples, sampled) if d)
    assert float(metrics[XT.CUT]) == cut == batch[X.CUT_TOKENS][sampled].sum() > 0
