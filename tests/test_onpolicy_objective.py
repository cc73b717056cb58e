"""The sampled-token objective: its Monte-Carlo gradient against exact enumeration (float64),
and a planted teacher learned by a tiny student from its own samples."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import distill_jax.models as M
from distill_jax import losses
from distill_jax import onpolicy as op
from distill_jax.onpolicy import rows as R
from distill_jax.losses import terms
from distill_jax.train.step import MODEL, init_state, make_step

# ----------------------------------------------------------------------------- exact gradient
# A tabular autoregressive policy over V tokens and N steps: the logits of step 0 are z0 (V,),
# those of step t > 0 are Z[y_{t-1}] (V, V). Small enough to enumerate all V**N sequences.
V, STEPS = 3, 3


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _rows(z0, Z, y):
    """The logits row used at each step of sequence ``y``."""
    return [z0] + [Z[y[t - 1]] for t in range(1, len(y))]


def _seq_logprob(z0, Z, y):
    return sum(_log_softmax(r)[y[t]] for t, r in enumerate(_rows(z0, Z, y)))


def _exact_gradients(student, teacher, sampler):
    """float64 gradients, w.r.t. the student's (z0, Z), of
    * per-token: E_{y ~ sampler} sum_t KL(S(.|h_t) || T(.|h_t)), prefixes held fixed;
    * sequence: KL(S(y) || T(y)) over whole sequences (sampler = the student).
    """
    (sz0, sZ), (tz0, tZ), (qz0, qZ) = student, teacher, sampler
    g_tok = [np.zeros(V), np.zeros((V, V))]
    g_seq = [np.zeros(V), np.zeros((V, V))]
    for y in itertools.product(range(V), repeat=STEPS):
        q = np.exp(_seq_logprob(qz0, qZ, y))
        s_seq = np.exp(_seq_logprob(sz0, sZ, y))
        ratio = _seq_logprob(sz0, sZ, y) - _seq_logprob(tz0, tZ, y)
        for t, (rs, rt) in enumerate(zip(_rows(sz0, sZ, y), _rows(tz0, tZ, y))):
            ls, lt = _log_softmax(rs), _log_softmax(rt)
            s = np.exp(ls)
            kl = (s * (ls - lt)).sum()
            d_tok = s * (ls - lt - kl)            # d KL(s || t) / d logits
            d_seq = s_seq * ratio * (np.eye(V)[y[t]] - s)  # S(y) log-ratio grad log S(y_t|h_t)
            for g, d in ((g_tok, q * d_tok), (g_seq, d_seq)):
                if t == 0:
                    g[0] += d
                else:
                    g[1][y[t - 1]] += d
    return g_tok, g_seq


def _sample(z0, Z, m, rng, temperature=1.0):
    """m sequences (m, STEPS) from the tabular policy at ``temperature``, and their log q."""
    y = np.zeros((m, STEPS), np.int64)
    logq = np.zeros((m, STEPS))
    for t in range(STEPS):
        logits = np.broadcast_to(z0, (m, V)) if t == 0 else Z[y[:, t - 1]]
        lp = _log_softmax(logits / temperature)
        u = rng.random((m, 1))
        y[:, t] = np.minimum((np.cumsum(np.exp(lp), -1) < u).sum(-1), V - 1)
        logq[:, t] = lp[np.arange(m), y[:, t]]
    return y, logq


def _per_sample_grads(student, teacher, y, logq, *, discount, weighted):
    tz0, tZ = (jnp.asarray(a, jnp.float32) for a in teacher)

    def logp(z0, Z, ys):
        rows = jnp.stack([z0] + [Z[ys[t - 1]] for t in range(1, STEPS)])
        return jnp.take_along_axis(jax.nn.log_softmax(rows, -1), ys[:, None], -1)[:, 0]

    def objective(params, ys, lq):
        z0, Z = params
        per = op.sampled_token_per_token(
            logp(z0, Z, ys), logp(tz0, tZ, ys), jnp.ones(STEPS),
            sample_logprobs=lq if weighted else None, discount=discount)
        return jnp.sum(per)

    params = tuple(jnp.asarray(a, jnp.float32) for a in student)
    g0, g1 = jax.jit(jax.vmap(jax.grad(objective), in_axes=(None, 0, 0)))(
        params, jnp.asarray(y, jnp.int32), jnp.asarray(logq, jnp.float32))
    return np.concatenate([np.asarray(g0, np.float64), np.asarray(g1, np.float64).reshape(
        len(y), -1)], axis=1)


def _flat(g):
    return np.concatenate([g[0], g[1].ravel()])


def _z(samples, exact):
    """Per-coordinate (mean - exact) / standard error of the mean."""
    se = samples.std(0, ddof=1) / np.sqrt(len(samples))
    return (samples.mean(0) - exact) / se


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    student = (rng.normal(0, 1.0, V), rng.normal(0, 1.0, (V, V)))
    teacher = (rng.normal(0, 1.5, V), rng.normal(0, 1.5, (V, V)))
    return student, teacher


M_SAMPLES = 40_000


def test_per_token_surrogate_is_unbiased_for_the_per_token_reverse_kl(tables):
    """discount = 0: the mean surrogate gradient over 40k samples matches the exact gradient of
    E_y sum_t KL(S(.|h_t) || T(.|h_t)) (prefixes fixed) within 5 standard errors on every
    coordinate; and it is detectably *not* the sequence-level KL's gradient."""
    student, teacher = tables
    y, logq = _sample(*student, M_SAMPLES, np.random.default_rng(1))
    g = _per_sample_grads(student, teacher, y, logq, discount=0.0, weighted=False)
    g_tok, g_seq = _exact_gradients(student, teacher, student)
    z = _z(g, _flat(g_tok))
    assert np.abs(z).max() < 5.0, z
    assert np.abs(_z(g, _flat(g_seq))).max() > 10.0  # a different objective


def test_reward_to_go_surrogate_is_unbiased_for_the_sequence_kl(tables):
    """discount = 1: unbiased for grad KL(S(y) || T(y)) over whole sequences."""
    student, teacher = tables
    y, logq = _sample(*student, M_SAMPLES, np.random.default_rng(2))
    g = _per_sample_grads(student, teacher, y, logq, discount=1.0, weighted=False)
    g_tok, g_seq = _exact_gradients(student, teacher, student)
    assert np.abs(_z(g, _flat(g_seq))).max() < 5.0
    assert np.abs(_z(g, _flat(g_tok))).max() > 10.0


def test_importance_weights_correct_for_the_sampling_temperature(tables):
    """Samples at temperature 2 with their sampling log-probs: unbiased for the per-token
    reverse KL over prefixes drawn at temperature 2; without the weights, biased."""
    student, teacher = tables
    y, logq = _sample(*student, M_SAMPLES, np.random.default_rng(3), temperature=2.0)
    sampler = (student[0] / 2.0, student[1] / 2.0)
    g_tok, _ = _exact_gradients(student, teacher, sampler)
    g = _per_sample_grads(student, teacher, y, logq, discount=0.0, weighted=True)
    assert np.abs(_z(g, _flat(g_tok))).max() < 5.0
    g_plain = _per_sample_grads(student, teacher, y, logq, discount=0.0, weighted=False)
    assert np.abs(_z(g_plain, _flat(g_tok))).max() > 10.0


def test_value_mask_and_chunk_form():
    """The value is the k1 estimate sum(log S - log T) over scored tokens; masked tokens change
    neither value nor gradient (even if they hold nan); the chunk form equals the direct one."""
    rng = np.random.default_rng(0)
    zs = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    zt = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], jnp.float32)

    def gather(z):
        return jnp.take_along_axis(jax.nn.log_softmax(z, -1), labels[..., None], -1)[..., 0]

    logs, logt = gather(zs), gather(zt)
    loss, metrics = op.sampled_token_loss(logs, logt, mask)
    expected = float(jnp.sum(mask * (logs - logt)) / mask.sum())
    assert abs(float(loss) - expected) < 1e-6 and float(metrics["onpolicy/tokens"]) == 7
    poisoned = jnp.where(mask > 0, logs, jnp.nan)
    g1 = jax.grad(lambda z: op.sampled_token_loss(gather(z), logt, mask)[0])(zs)
    g2 = jax.grad(lambda z: op.sampled_token_loss(
        jnp.where(mask > 0, gather(z), poisoned), logt, mask)[0])(zs)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    assert np.all(np.asarray(g1)[mask == 0] == 0)
    chunk = op.sampled_token_chunk_sums(zs.reshape(10, 7), {"logits": zt.reshape(10, 7)},
                                        labels.reshape(10), mask.reshape(10))
    assert abs(float(chunk) - float(metrics["distill/sampled_reverse_kl_sum"])) < 1e-5
    gc = jax.grad(lambda z: op.sampled_token_chunk_sums(
        z.reshape(10, 7), {"logits": zt.reshape(10, 7)}, labels.reshape(10),
        mask.reshape(10)) / mask.sum())(zs)
    np.testing.assert_allclose(np.asarray(gc), np.asarray(g1), atol=1e-6)
    with pytest.raises(ValueError, match="discount must be in"):
        op.sampled_token_loss(logs, logt, mask, discount=2.0)


# ----------------------------------------------------------------------------- planted teacher
VOCAB, EOS, TRIGGER = 16, 2, 1
CHAIN = (7, 9, 11, 13, EOS)  # the teacher's continuation of any prompt ending with TRIGGER
FILLER = np.asarray([3, 4, 5, 6, 8, 10, 12, 14, 15])
NEW = 6


def _cfg():
    return M.ModelConfig.tiny("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _planted_teacher() -> M.Model:
    """A bigram teacher: attention and MLP write nothing (their output projections are 0), so
    the final hidden state is the current token's one-hot embedding, normalised; the lm_head
    sends TRIGGER -> 7 -> 9 -> 11 -> 13 -> EOS with logit 12 (p > 0.9999) and every other
    token to a uniform next token."""
    cfg = _cfg()
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), M.param_shapes(cfg))
    params["embed"][np.arange(VOCAB), np.arange(VOCAB)] = 1.0
    params["final_norm"]["scale"][:] = 1.0
    params["layers"]["attn_norm"]["scale"][:] = 1.0
    params["layers"]["mlp_norm"]["scale"][:] = 1.0
    for a, b in zip((TRIGGER,) + CHAIN[:-1], CHAIN):
        params["lm_head"][a, b] = 12.0 / np.sqrt(cfg.hidden_size)
    return M.Model(cfg, jax.tree.map(jnp.asarray, params))


def _prompt_batch(rng, b):
    prompts = [op.Prompt(np.append(rng.choice(FILLER, rng.integers(1, 6)), TRIGGER).astype(
        np.int32), np.zeros(0, np.int32), np.zeros(0, bool)) for _ in range(b)]
    return op.prompt_batch(prompts, max_new_tokens=NEW, buckets=(8,))


@jax.jit
def _samples(params, pb, key, temperature):
    """Completions at ``temperature`` (traced: 0 greedy vs > 0 is picked by a lax.cond)."""
    def draw(t):
        return op.rollout(_cfg(), params, pb["prompt_tokens"], pb["prompt_lengths"], key,
                          max_new_tokens=NEW, temperature=t, eos_ids=(EOS,)).tokens
    return jax.lax.cond(temperature > 0, lambda: draw(1.0), lambda: draw(0.0))


def _share_of_chain(params, temperature, seed):
    """The share of 256 completions (at temperature 1, or greedy: 0) equal to CHAIN."""
    pb = _prompt_batch(np.random.default_rng(seed), 256)
    toks = np.asarray(_samples(params, pb, jax.random.key(seed), temperature))[:, :len(CHAIN)]
    return float((toks == np.asarray(CHAIN)).all(1).mean())


@pytest.mark.parametrize("objective", ["engine_reverse_kl", "sampled_token"])
def test_student_learns_a_planted_teacher_from_its_own_samples(objective):
    """40 steps of on-policy training (lmbda = 1, temperature 1, 64 prompts a step, Adam 1e-2)
    from a random student: afterwards >90% of its temperature-1 samples and all its greedy
    ones are the teacher's continuation (before: none). ``engine_reverse_kl``: the engine's
    step with the full-vocabulary reverse KL on the rollout rows; ``sampled_token``: the
    sampled-token objective with the teacher's per-token log-probs from onpolicy_batch."""
    teacher, cfg = _planted_teacher(), _cfg()
    assert _share_of_chain(teacher.params, 1.0, 0) > 0.99  # the plant works
    rng = np.random.default_rng(0)
    student = jax.tree.map(jnp.asarray, M.numpy_params(cfg, rng, 0.02))
    assert _share_of_chain(student, 1.0, 1) == 0.0
    opt = optax.adam(1e-2)
    state = init_state(student, opt)
    settings = dict(lmbda=1.0, max_new_tokens=NEW, temperature=1.0, eos_ids=(EOS,))
    if objective == "engine_reverse_kl":
        train = make_step(cfg, cfg, losses.LossSpec({"reverse_kl": 1.0}), terms.LIVE_SAME, opt,
                          chunk_size=64)

        def step(state, tparams, pb, key):
            batch = op.onpolicy_batch(cfg, state.params[MODEL], pb, key, **settings)
            state, metrics = train(state, tparams, batch)
            return state, metrics["distill/loss"], op.rollout_metrics(batch)
    else:
        def step(state, tparams, pb, key):
            batch = op.onpolicy_batch(cfg, state.params[MODEL], pb, key, teacher_cfg=cfg,
                                      teacher_params=tparams, **settings)

            def loss_fn(params):
                logs = op.token_logprobs(cfg, params[MODEL], batch, chunk_size=64)
                return op.sampled_token_loss(logs, batch[R.TEACHER_LOGPROBS],
                                             batch["loss_mask"],
                                             sample_logprobs=batch[R.SAMPLE_LOGPROBS])[0]

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, opt_state = opt.update(grads, state.opt_state, state.params)
            return (state.replace(params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, step=state.step + 1), loss,
                    op.rollout_metrics(batch))

    step = jax.jit(step)
    curve = []
    for i in range(40):
        state, loss, metrics = step(state, teacher.params, _prompt_batch(rng, 64),
                                    jax.random.key(100 + i))
        curve.append(float(loss))
    params = state.params[MODEL]
    assert _share_of_chain(params, 1.0, 2) > 0.9
    assert _share_of_chain(params, 0.0, 3) == 1.0
    assert float(metrics[R.EOS_SHARE]) > 0.9
    assert np.mean(curve[-5:]) < 0.1 * np.mean(curve[:5])  # the estimated reverse KL fell


def test_registered_as_a_term_the_engine_step_applies_its_gradient(monkeypatch):
    """The hook-in: registered as a shared-vocabulary term whose ``chunk_sums`` is
    ``sampled_token_chunk_sums``, the engine's step (live teacher, fused chunked lm_head) on a
    rollout batch makes the SGD update of the direct objective
    ``sampled_token_loss(log S(targets), log T(targets), loss_mask)``."""

    monkeypatch.setitem(terms.REGISTRY, op.SAMPLED_REVERSE_KL, terms.Term(
        op.SAMPLED_REVERSE_KL, {terms.TOKEN_DIST}, terms.SHARED, "sampled-token reverse KL",
        chunk_sums=op.sampled_token_chunk_sums))
    cfg = _cfg()
    teacher = _planted_teacher()
    rng = np.random.default_rng(5)
    student = jax.tree.map(jnp.asarray, M.numpy_params(cfg, rng, 0.1))
    pb = _prompt_batch(rng, 8)
    batch = jax.jit(lambda p, k: op.onpolicy_batch(
        cfg, p, pb, k, lmbda=1.0, max_new_tokens=NEW, eos_ids=(EOS,)))(student, jax.random.key(0))
    spec = losses.LossSpec({op.SAMPLED_REVERSE_KL: 1.0},
                           chunk_terms=terms.chunk_terms([op.SAMPLED_REVERSE_KL]))
    sgd = optax.sgd(1.0)
    state, metrics = jax.jit(make_step(cfg, cfg, spec, terms.LIVE_SAME, sgd, chunk_size=24))(
        init_state(student, sgd), teacher.params, batch)

    def direct(params):
        logs = op.token_logprobs(cfg, params, batch, chunk_size=24)
        logt = op.token_logprobs(cfg, teacher.params, batch, chunk_size=24)
        return op.sampled_token_loss(logs, logt, batch["loss_mask"])[0]

    loss, grads = jax.value_and_grad(direct)(student)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-2  # not trivial
    assert abs(float(metrics["distill/loss"]) - float(loss)) < 1e-5
    for p, g, new in zip(jax.tree.leaves(student), jax.tree.leaves(grads),
                         jax.tree.leaves(state.params[MODEL])):
        np.testing.assert_allclose(np.asarray(new), np.asarray(p - g), atol=1e-6)
