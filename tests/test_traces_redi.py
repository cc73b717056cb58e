"""The redi loss term: pair packing, and the loss and its gradient against float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import kd, redi, terms
from distill_jax.losses.xtok import XtokSpec
from distill_jax.tokenizer import byte_tokenizer
from distill_jax.traces.pack import TokenizedPair, pack_pairs, tokenize_pair

V, D = 23, 8
# (prompt, chosen, rejected) lengths of four pairs; two rows of 40 tokens
PAIRS = [(3, 5, 2), (4, 1, 7), (2, 6, 6), (5, 3, 4)]


def _pairs(seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda n: tuple(int(t) for t in rng.integers(1, V, n))  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in PAIRS]


def test_packer_weights_and_layout():
    (batch,), skipped = pack_pairs(_pairs(), rows=2, seq_len=40)
    assert skipped == 0
    w = batch[redi.SEQUENCE_WEIGHT]
    # every pair's positive weights sum to 1, its negative ones to -1 (the term applies alpha)
    assert float(np.maximum(w, 0).sum()) == pytest.approx(4.0)
    assert float(np.minimum(w, 0).sum()) == pytest.approx(-4.0)
    # row 0 holds pairs 0 and 1 (13 + 16 tokens); pairs 2 and 3 (16, 17) go to row 1
    seg = batch["segment_ids"]
    assert seg[0].max() == 4 and seg[1].max() == 4
    # pair 0, chosen: prompt of 3 then 5 completion tokens, predicted from positions 2..6
    np.testing.assert_allclose(w[0, :8], [0, 0, .2, .2, .2, .2, .2, 0], rtol=1e-6)
    assert batch["loss_mask"][0, :8].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    # pair 0, rejected: the next segment, -1/2 on its 2 completion targets
    np.testing.assert_allclose(w[0, 8:13], [0, 0, -.5, -.5, 0], rtol=1e-6)
    assert batch["positions"][0, 8:13].tolist() == [0, 1, 2, 3, 4]
    assert (batch["targets"][0, :7] == batch["tokens"][0, 1:8]).all()
    # a pair longer than a row is skipped, never truncated
    batches, skipped = pack_pairs(_pairs(), rows=1, seq_len=15)
    assert skipped == 3 and len(batches) == 1
    with pytest.raises(ValueError, match=r"redi_alpha must be in \[0, 1\)"):
        XtokSpec(terms={redi.REDI: 1.0}, redi_alpha=1.0)


def _reference(h, head, batch, alpha):
    """float64: L = mean over pairs of -mean log p(y+) + alpha mean log p(y-), and dL/dh,
    dL/dhead, from the pair definitions (not from the packer's weights)."""
    h = h.astype(np.float64)
    head = head.astype(np.float64)
    z = h @ head
    z = z - z.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p_all = np.exp(logp_all)
    coef = np.zeros(batch["tokens"].shape)
    loss = 0.0
    pair_i = 0
    for row in range(batch["tokens"].shape[0]):
        starts = {}
        for t, s in enumerate(batch["segment_ids"][row]):
            if s and s not in starts:
                starts[s] = t
        for s in sorted(starts):
            if s % 2 == 0:
                continue
            p_len, c_len, r_len = PAIRS[pair_i]
            pair_i += 1
            for seg, n, sign in ((s, c_len, -1.0), (s + 1, r_len, alpha)):
                lo = starts[seg] + p_len - 1
                ts = np.arange(lo, lo + n)
                targets = batch["targets"][row, ts]
                loss += sign * logp_all[row, ts, targets].mean()
                coef[row, ts] += -sign / n  # d/dz of sign * mean logp is sign/n (onehot - p)
    pairs = pair_i
    loss /= pairs
    onehot = np.zeros_like(p_all)
    rows, cols = np.nonzero(coef)
    onehot[rows, cols, batch["targets"][rows, cols]] = 1.0
    g_z = coef[..., None] * (p_all - onehot) / pairs
    return loss, g_z @ head.T, np.einsum("bld,blv->dv", h, g_z)


@pytest.mark.parametrize("alpha", [0.8, 0.0, 0.5])
def test_redi_term_loss_and_gradient_match_float64(alpha):
    (batch,), _ = pack_pairs(_pairs(1), rows=2, seq_len=40)
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, 40, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    spec = XtokSpec(terms={redi.REDI: 1.0}, redi_alpha=alpha)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    norms = terms.counts(spec, jbatch)
    assert float(norms[redi.PAIRS]) == 4.0

    def loss_fn(h, head):
        inputs = terms.HeadInputs(spec, jbatch, student_h=h, student_head=head, chunk_size=16)
        sums = terms.term_sums(inputs)
        return terms.objective(spec, sums, norms)

    loss, (g_h, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1))(jnp.asarray(h),
                                                                      jnp.asarray(head))
    ref_loss, ref_h, ref_head = _reference(h, head, batch, alpha)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_h), ref_h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_head), ref_head, rtol=1e-4, atol=1e-6)
    # the word-start path (the one the cross-tokenizer step takes) gives the same numbers
    inputs = terms.HeadInputs(spec, jbatch, student_h=jnp.asarray(h),
                              student_head=jnp.asarray(head),
                              student_word_start=jnp.ones((V,), bool))
    same = terms.objective(spec, terms.term_sums(inputs), norms)
    np.testing.assert_allclose(float(same), ref_loss, rtol=1e-5)
    # and the plain function agrees with the term
    logp, _ = inputs.student_token_stats
    plain, metrics = redi.redi_loss(logp, jbatch[redi.SEQUENCE_WEIGHT], alpha)
    np.testing.assert_allclose(float(plain), ref_loss, rtol=1e-5)
    assert kd.metric_key(redi.REDI) in metrics


def test_redi_is_registered_and_declares_its_batch_key():
    term = terms.get_term("redi")
    assert term.batch_keys == (redi.SEQUENCE_WEIGHT,)
    assert not term.needs_teacher
    assert terms.vocabulary_of(["redi", "sft"]) == terms.ALIGNED


def test_tokenize_pair_from_a_selected_record():
    tok = byte_tokenizer()
    rec = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "#### 4"}], "rejected": "#### 5"}
    pair = tokenize_pair(tok, rec)
    assert pair.chosen == tuple(b + 3 for b in b"#### 4") + (tok.eos_token_id,)
    assert pair.rejected[-2] == ord("5") + 3
    assert tok.decode(list(pair.prompt)).endswith("<|assistant|>\n")
    with pytest.raises(ValueError, match="pair record needs"):
        tokenize_pair(tok, {"messages": rec["messages"]})


def test_redi_steps_on_a_tiny_model_prefer_the_chosen_traces(tmp_path):
    """Adam on the REDI objective (through the term protocol, from a pairs file): the loss
    falls, and the chosen completions' mean log-prob rises above the rejected ones'."""
    import json

    import optax

    from distill_jax.losses.alm import token_stats
    from distill_jax.models import Model, hidden_states, init, lm_head, presets
    from distill_jax.traces.pack import pack_pair_file
    tok = byte_tokenizer()
    path = tmp_path / "pairs.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a} + {b}?"},
                          {"role": "assistant", "content": f"#### {a + b}"}],
             "rejected": f"#### {a + b + 1}"} for a, b in [(2, 3), (4, 4), (7, 1), (5, 6)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (batch,), skipped = pack_pair_file(str(path), tok, rows=4, seq_len=80)
    assert skipped == 0
    cfg = presets.preset("tiny-llama", vocab_size=259, num_layers=1, hidden_size=32,
                         intermediate_size=64, num_heads=2, num_kv_heads=1)
    params = init(cfg, 0).params
    spec = XtokSpec(terms={redi.REDI: 1.0})
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    norms = terms.counts(spec, jbatch)

    def logp(params):
        m = Model(cfg, params)
        h = hidden_states(m, jbatch["tokens"], positions=jbatch["positions"],
                          segment_ids=jbatch["segment_ids"])
        return terms.HeadInputs(spec, jbatch, student_h=h, student_head=lm_head(m))

    def loss_fn(params):
        return terms.objective(spec, terms.term_sums(logp(params)), norms)

    def margin(params):
        """Mean over pairs of mean log p(chosen) - mean log p(rejected)."""
        inputs = logp(params)
        tok_lp, _ = token_stats(inputs.student_h, inputs.student_head, jbatch["targets"],
                                jnp.zeros((cfg.vocab_size,), bool))
        w = jbatch[redi.SEQUENCE_WEIGHT]
        pos = jnp.sum(jnp.where(w > 0, w * tok_lp, 0.0))
        neg = jnp.sum(jnp.where(w < 0, -w * tok_lp, 0.0))
        return float((pos - neg) / 4)

    opt = optax.adam(3e-2)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    first_loss, first_margin = float(loss_fn(params)), margin(params)
    for _ in range(15):
        params, state = step(params, state)
    assert float(loss_fn(params)) < first_loss
    assert margin(params) > first_margin + 0.5
