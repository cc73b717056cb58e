"""Sparse (top-k cache) distillation losses: float64 references written from the formulas for both
tail conventions, k = V equals the dense losses, gradients, masking, chunked == unchunked, the
cache writer's ``topk_from_logits``, and how the bucketed approximation improves with k."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import chunked, kd
from distill_jax.losses import sparse as S

jax.config.update("jax_default_matmul_precision", "highest")

B, T, V, K = 3, 7, 23, 5
LOSSES = {
    "forward_kl": (S.sparse_forward_kl, kd.forward_kl, {}),
    "reverse_kl": (S.sparse_reverse_kl, kd.reverse_kl, {}),
    "jsd": (S.sparse_jsd, kd.jsd, {"beta": 0.5}),
    "jsd_0.2": (S.sparse_jsd, kd.jsd, {"beta": 0.2}),
    "jsd_scaled_0.3": (S.sparse_jsd_scaled, kd.jsd_scaled, {"beta": 0.3}),
}


# ---------------------------------------------------------------------------------------------
# float64 reference (xp = numpy for values, jax.numpy under x64 for gradients)
# ---------------------------------------------------------------------------------------------


def _lse(xp, x, axis=-1, keepdims=False):
    m = xp.max(x, axis=axis, keepdims=True)
    if xp is not np:
        m = jax.lax.stop_gradient(m)
    m = xp.where(xp.isfinite(m), m, 0.0)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis)


def _ref_cache(zt, k, temp):
    """float64 (ids, logprobs, tail) from teacher logits, by argsort."""
    z = zt / temp
    logp = z - _lse(np, z, keepdims=True)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    lp = np.take_along_axis(logp, ids, -1)
    outside = ~(np.arange(z.shape[-1]) == ids[..., None]).any(-2)
    with np.errstate(divide="ignore"):
        tail = np.log(np.sum(np.where(outside, np.exp(logp), 0.0), -1))
    return ids.astype(np.int32), lp, tail


def _ref_dists(xp, zs, ids, lp, tail, temp, mode):
    z = zs / temp
    logs_full = z - _lse(xp, z, keepdims=True)
    logs_k = xp.take_along_axis(logs_full, ids, -1)
    if mode == "renormalize":
        return logs_k - _lse(xp, logs_k, keepdims=True), lp - _lse(np, lp, keepdims=True)
    outside = ~(np.arange(zs.shape[-1]) == ids[..., None]).any(-2)
    ps_out = xp.sum(xp.where(outside, xp.exp(logs_full), 0.0), -1)
    logs = xp.concatenate([logs_k, xp.log(ps_out)[..., None]], -1)
    logt = np.concatenate([lp, tail[..., None]], -1)
    return logs, logt - _lse(np, logt, keepdims=True)


def _ref_kl(xp, lp, lq):
    p = xp.exp(lp)
    with np.errstate(invalid="ignore"):
        return xp.sum(xp.where(p > 0, p * (lp - xp.where(p > 0, lq, 0.0)), 0.0), -1)


def _ref_div(xp, name, ls, lt, beta):
    if name == "forward_kl" or (name.startswith("jsd") and beta == 0):
        return _ref_kl(xp, lt, ls)
    if name == "reverse_kl" or (name.startswith("jsd") and beta == 1):
        return _ref_kl(xp, ls, lt)
    ps, pt = xp.exp(ls), xp.exp(lt)
    m = beta * pt + (1 - beta) * ps
    lm = xp.log(m)
    kl_t = xp.sum(pt * (lt - lm), -1)
    kl_s = xp.sum(ps * (ls - lm), -1)
    js = beta * kl_t + (1 - beta) * kl_s
    return js / (beta * (1 - beta)) if name == "jsd_scaled" else js


def _ref_loss(xp, name, zs, ids, lp, tail, w, temp, mode, beta=0.5):
    live = w > 0
    zs = xp.where(live[..., None], zs, 0.0)
    ids = np.where(live[..., None], ids, np.arange(ids.shape[-1]))
    lp = np.where(live[..., None], lp, -np.log(ids.shape[-1]))
    tail = np.where(live, tail, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):   # masked rows: 0 * -inf, dropped
        ls, lt = _ref_dists(xp, zs, ids, lp, tail, temp, mode)
        per = _ref_div(xp, name, ls, lt, beta) * temp ** 2
        tot = xp.sum(xp.where(live, w * per, 0.0))
    n = np.sum(np.where(live, w, 0.0))
    return tot / n if n > 0 else tot * 0.0


def _data(seed=0, k=K, temp=1.0, vocab=V, scale=3.0):
    rng = np.random.default_rng(seed)
    zs = rng.normal(size=(B, T, vocab)) * scale
    zt = rng.normal(size=(B, T, vocab)) * scale
    w = (rng.random((B, T)) > 0.25).astype(np.float64) * rng.uniform(0.5, 2.0, (B, T))
    w[0, 0] = 1.0
    ids, lp, tail = _ref_cache(zt, k, temp)
    return zs, zt, w, ids, lp, tail


def _name_beta(key):
    fn, _, opts = LOSSES[key]
    name = key.split("_0")[0] if key.startswith("jsd") else key
    return fn, name, opts.get("beta", 0.5), opts


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


# ---------------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("key", list(LOSSES))
def test_values_vs_float64(mode, temp, key):
    fn, name, beta, opts = _name_beta(key)
    zs, _, w, ids, lp, tail = _data(1, temp=temp)
    ref = _ref_loss(np, name, zs, ids, lp, tail, w, temp, mode, beta)
    zs32, lp32, tail32, w32 = _f32(zs, lp, tail, w)
    loss, m = fn(zs32, jnp.asarray(ids), lp32, tail32, w32, temperature=temp, tail=mode, **opts)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(m[f"distill/{name}"]), ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["distill/tokens"]), np.sum(w), rtol=1e-6)
    np.testing.assert_allclose(float(m[f"distill/{name}_sum"]), ref * np.sum(w), rtol=2e-5,
                               atol=1e-6)
    assert float(loss) > 0


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize("key", ["forward_kl", "reverse_kl", "jsd_0.2"])
def test_grads_vs_float64(mode, key):
    fn, name, beta, opts = _name_beta(key)
    temp = 2.0
    zs, _, w, ids, lp, tail = _data(2, temp=temp)
    with jax.enable_x64(True):
        g_ref = np.asarray(jax.grad(lambda z: _ref_loss(jnp, name, z, ids, lp, tail, w, temp,
                                                        mode, beta))(jnp.asarray(zs)))
    zs32, lp32, tail32, w32 = _f32(zs, lp, tail, w)
    g = jax.grad(lambda z: fn(z, jnp.asarray(ids), lp32, tail32, w32, temperature=temp,
                              tail=mode, **opts)[0])(zs32)
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=2e-6)
    assert np.all(np.asarray(g)[w == 0] == 0)


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("key", list(LOSSES) + ["tvd"])
def test_k_equals_V_is_dense(mode, temp, key):
    """With the whole vocabulary cached (tail_logmass = -inf) both conventions are the dense loss,
    values and gradients (the empty student bucket must not leak nan)."""
    if key == "tvd":
        sfn = lambda *a, **kw: S._sparse_loss("tvd", *a[:5], kw["temperature"], kw["tail"])  # noqa
        dfn, name, opts = kd.tvd, "tvd", {}
    else:
        sfn, name, _, opts = _name_beta(key)
        dfn = LOSSES[key][1]
    zs, zt, w, _, _, _ = _data(3, temp=temp)
    zs32, zt32, w32 = _f32(zs, zt, w)
    ids, lp, tail = S.topk_from_logits(zt32, V, temperature=temp)
    assert np.all(np.isneginf(np.asarray(tail)))

    def sparse_loss(z):
        return sfn(z, ids, lp, tail, w32, temperature=temp, tail=mode, **opts)[0]

    def dense_loss(z):
        return dfn(z, zt32, w32, temperature=temp, **opts)[0]

    ls, gs = jax.value_and_grad(sparse_loss)(zs32)
    ld, gd = jax.value_and_grad(dense_loss)(zs32)
    np.testing.assert_allclose(float(ls), float(ld), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(gs)))
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-4, atol=1e-6)


def test_student_bucket_is_stable_when_peaked():
    """The student's bucket log-mass stays accurate when its top-k mass is 1 - 1e-20 (the
    log(1 - sum) form would give log(0) = -inf or rounding noise)."""
    z = np.zeros((1, 10))
    z[0, :4] = 50.0                     # bucket: 6 tokens at 0 vs 4 at 50 -> log(6/4) - 50
    ids = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
    lp = jnp.full((1, 4), np.log(0.2), jnp.float32)
    tail = jnp.asarray([np.log(0.2)], jnp.float32)
    logs, logt = S.sparse_distributions(jnp.asarray(z, jnp.float32), ids, lp, tail,
                                        jnp.ones((1,)))
    ref = np.log(6.0) - np.log(4 * np.exp(50.0) + 6.0)
    np.testing.assert_allclose(float(logs[0, -1]), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logt), np.log(0.2), rtol=1e-6)
    g = jax.grad(lambda z: S.sparse_reverse_kl(z, ids, lp, tail, jnp.ones((1,)))[0])(
        jnp.asarray(z, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_cache_is_renormalised():
    """A cache rounded to bf16 no longer sums to 1; the bucket teacher is renormalised, so the
    divergence of a student equal to the teacher is ~0, not the rounding error."""
    zt = jnp.asarray(np.random.default_rng(12).normal(size=(B, T, V)) * 3, jnp.float32)
    ids, lp, tail = S.topk_from_logits(zt, K)
    lp16, tail16 = lp.astype(jnp.bfloat16), tail.astype(jnp.bfloat16)
    loss = S.sparse_forward_kl(zt, ids, lp16, tail16, jnp.ones((B, T)))[0]
    assert abs(float(loss)) < 1e-3


def test_bucket_lower_bounds_dense_forward_kl():
    """Merging the non-top-k outcomes can only lose information: sparse <= dense per token."""
    zs, zt, w, _, _, _ = _data(4)
    zs32, zt32 = _f32(zs, zt)
    ones = jnp.ones((B, T))
    dense = kd.forward_kl(zs32, zt32, ones)[0]
    prev = -1.0
    for k in (1, 4, 12, V):
        ids, lp, tail = S.topk_from_logits(zt32, k)
        sp = S.sparse_forward_kl(zs32, ids, lp, tail, ones)[0]
        assert prev - 1e-6 <= float(sp) <= float(dense) + 1e-5
        prev = float(sp)
    np.testing.assert_allclose(prev, float(dense), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_masked_positions_are_inert(mode):
    zs, _, w, ids, lp, tail = _data(5)
    zs32, lp32, tail32, w32 = _f32(zs, lp, tail, w)
    masked = w == 0
    assert masked.any()
    bad_z = np.where(masked[..., None], np.nan, zs)
    bad_ids = np.where(masked[..., None], 10 ** 6, ids).astype(np.int32)   # out of range
    bad_lp = np.where(masked[..., None], np.nan, lp)
    bad_tail = np.where(masked, np.nan, tail)

    def f(z, i, l, t):
        return S.sparse_jsd(z, i, l, t, w32, temperature=2.0, tail=mode, beta=0.3)[0]

    l0, g0 = jax.value_and_grad(f)(zs32, jnp.asarray(ids), lp32, tail32)
    l1, g1 = jax.value_and_grad(f)(*_f32(bad_z), jnp.asarray(bad_ids), *_f32(bad_lp, bad_tail))
    assert float(l0) == float(l1)
    np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))
    assert np.all(np.asarray(g1)[masked] == 0)


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_all_masked_is_zero(mode):
    zs, _, _, ids, lp, tail = _data(6)
    zs32, lp32, tail32 = _f32(zs, lp, tail)
    mask = jnp.zeros((B, T), bool)
    for fn in (S.sparse_forward_kl, S.sparse_reverse_kl, S.sparse_jsd):
        (loss, m), g = jax.value_and_grad(
            lambda z: fn(z, jnp.asarray(ids), lp32, tail32, mask, tail=mode), has_aux=True)(zs32)
        assert float(loss) == 0.0 and float(m["distill/tokens"]) == 0.0
        assert np.all(np.asarray(g) == 0)


def test_teacher_gets_no_gradient_and_errors():
    zs, _, w, ids, lp, tail = _data(7)
    zs32, lp32, tail32, w32 = _f32(zs, lp, tail, w)
    g = jax.grad(lambda l, t: S.sparse_forward_kl(zs32, jnp.asarray(ids), l, t, w32)[0],
                 argnums=(0, 1))(lp32, tail32)
    assert all(np.all(np.asarray(x) == 0) for x in g)
    with pytest.raises(ValueError, match="tail mode"):
        S.sparse_forward_kl(zs32, jnp.asarray(ids), lp32, tail32, w32, tail="bukket")
    with pytest.raises(ValueError, match="tail_logmass"):
        S.sparse_forward_kl(zs32, jnp.asarray(ids), lp32, None, w32)
    with pytest.raises(ValueError, match="topk_ids"):
        S.sparse_forward_kl(zs32, jnp.asarray(ids)[..., :3], lp32, tail32, w32)
    # renormalize does not need the tail
    S.sparse_forward_kl(zs32, jnp.asarray(ids), lp32, None, w32, tail="renormalize")


# ---------------------------------------------------------------------------------------------
# Combined and chunked
# ---------------------------------------------------------------------------------------------


def test_combined_matches_single_terms_and_dense_ce():
    zs, _, w, ids, lp, tail = _data(8, temp=2.0)
    zs32, lp32, tail32, w32 = _f32(zs, lp, tail, w)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)
    spec = kd.LossSpec(terms={"forward_kl": 1.0, "jsd": 0.5, "cross_entropy": 0.1},
                       temperature=2.0, jsd_beta=0.3)
    loss, m = S.sparse_combined_loss(zs32, jnp.asarray(ids), lp32, tail32, labels, w32, spec)
    fkl = S.sparse_forward_kl(zs32, jnp.asarray(ids), lp32, tail32, w32, temperature=2.0)[0]
    js = S.sparse_jsd(zs32, jnp.asarray(ids), lp32, tail32, w32, temperature=2.0, beta=0.3)[0]
    ce = kd.cross_entropy(zs32, labels, w32)[0]
    np.testing.assert_allclose(float(m["distill/forward_kl"]), float(fkl), rtol=1e-6)
    np.testing.assert_allclose(float(m["distill/jsd"]), float(js), rtol=1e-6)
    np.testing.assert_allclose(float(m["distill/cross_entropy"]), float(ce), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(fkl + 0.5 * js + 0.1 * ce), rtol=1e-6)


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_chunked_equals_unchunked(mode):
    rng = np.random.default_rng(9)
    D = 8
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    _, zt, w, ids, lp, tail = _data(9, temp=2.0)
    lp32, tail32, w32 = _f32(lp, tail, w)
    ids = jnp.asarray(ids)
    labels = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    spec = kd.LossSpec(terms={"forward_kl": 1.0, "reverse_kl": 0.3, "jsd": 0.5,
                              "cross_entropy": 0.1}, temperature=2.0, jsd_beta=0.3)

    def full(h, head):
        z = chunked.logits_from_hidden(h, head, 30.0)
        return S.sparse_combined_loss(z, ids, lp32, tail32, labels, w32, spec, tail=mode)

    (l0, m0), g0 = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(h, head)
    for cs in (4, 5, 64):   # 21 tokens: non-divisible chunks and one oversize chunk
        fn = functools.partial(S.sparse_chunked_loss, spec=spec, chunk_size=cs,
                               student_softcap=30.0, tail=mode)
        (l1, m1), g1 = jax.jit(jax.value_and_grad(
            lambda h, head: fn(h, head, ids, lp32, tail32, labels, w32),
            argnums=(0, 1), has_aux=True))(h, head)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
        for key in m0:
            np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-6)
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        # the training step's form: the cotangent announced, each chunk's backward in the
        # forward scan; its vjp with that cotangent is the reference gradient
        names = [n for n, _ in spec.terms]
        tokens = float(kd.token_count(kd.token_weights(w32, w32.shape)))
        ct = {n: jnp.float32(wt / tokens) for n, wt in spec.terms}

        def sums(h, head, fn=fn):
            m = fn(h, head, ids, lp32, tail32, labels, w32, cotangent=ct)[1]
            return {n: m[kd.sum_key(n)] for n in names}

        s2, vjp = jax.vjp(sums, h, head)
        for n in names:
            np.testing.assert_allclose(float(s2[n]), float(m0[kd.sum_key(n)]), rtol=1e-5)
        for a, b in zip(vjp(ct), g0):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The cache writer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_topk_from_logits(temp):
    rng = np.random.default_rng(10)
    zt = rng.normal(size=(4, 50)) * 4
    ids, lp, tail = S.topk_from_logits(jnp.asarray(zt, jnp.float32), 7, temperature=temp)
    rids, rlp, rtail = _ref_cache(zt, 7, temp)
    assert ids.dtype == jnp.int32 and lp.dtype == jnp.float32 and tail.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), rids)
    np.testing.assert_allclose(np.asarray(lp), rlp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tail), rtail, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(lp), axis=-1) <= 0)
    # a tiny tail keeps its relative accuracy (log1p(-sum) would round it to -inf or garbage)
    z = np.zeros((1, 10)); z[0, 9] = -40.0
    _, _, t = S.topk_from_logits(jnp.asarray(z, jnp.float32), 9)
    ref = -40.0 - np.log(9 + np.exp(-40.0))
    np.testing.assert_allclose(float(t[0]), ref, rtol=1e-6)


def test_bucket_approximation_improves_with_k():
    """KL(p || p_k), p_k the bucketed top-k teacher with the tail spread uniformly over the other
    V - k tokens (the max-entropy distribution the cache determines), for a random 4096-vocab
    teacher; and the gap between the dense and the bucketed forward KL to a random student."""
    rng = np.random.default_rng(11)
    vocab, n = 4096, 16
    zt = rng.normal(size=(n, vocab)) * 2.5
    zs = rng.normal(size=(n, vocab)) * 2.5
    logp = zt - _lse(np, zt, keepdims=True)
    zs32, zt32 = _f32(zs, zt)
    ones = jnp.ones((n,))
    dense = float(kd.forward_kl(zs32, zt32, ones)[0])
    kls, gaps = [], []
    for k in (16, 64, 256, 1024):
        ids, lp, tail = (np.asarray(x, np.float64) for x in
                         S.topk_from_logits(zt32, k))
        ids = ids.astype(np.int64)
        outside = np.ones((n, vocab), bool)
        np.put_along_axis(outside, ids, False, -1)
        approx = np.where(outside, tail[:, None] - np.log(vocab - k), logp)
        kls.append(float(np.mean(np.sum(np.exp(logp) * (logp - approx), -1))))
        sp = float(S.sparse_forward_kl(zs32, jnp.asarray(ids, jnp.int32), *_f32(lp, tail),
                                       ones)[0])
        gaps.append(dense - sp)
    print(f"\nV=4096 teacher N(0, 2.5^2) logits; KL(p || bucketed top-k) at k=16,64,256,1024: "
          f"{kls}\ndense forward KL {dense:.4f}; dense - bucketed at k=16,64,256,1024: {gaps}")
    assert all(a > b for a, b in zip(kls, kls[1:]))
    assert all(a >= b - 1e-4 for a, b in zip(gaps, gaps[1:])) and min(gaps) >= -1e-4
