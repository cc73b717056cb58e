"""Plackett-Luce distillation against a float64 reference written from the definition (the
ranking built token by token, each denominator summed over the tokens not yet placed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import pld

B, T, V, K = 3, 7, 23, 5
RTOL = 1e-5


def _logsoftmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_token(z, y, ranked, weights):
    """sum_k w_k [log sum_{j not yet placed} exp(z_j) - z_{pi_k}], pi = ranked, directly."""
    placed, total = set(), 0.0
    for tok, w in zip(ranked, weights):
        rest = [j for j in range(len(z)) if j not in placed]
        total += w * (np.log(np.sum(np.exp(z[rest]))) - z[tok])
        placed.add(tok)
    return total


def _ref_loss(zs, zt, labels, mask, temp, k=None):
    """float64 PLD: the label first, then the teacher's ranking (its top k, or all tokens)."""
    logt = _logsoftmax(zt / temp)
    z = zs / temp
    total, count = 0.0, 0.0
    for idx in np.ndindex(*labels.shape):
        if mask[idx] <= 0:
            continue
        y = int(labels[idx])
        order = [int(i) for i in np.argsort(-logt[idx], kind="stable")]
        top = order if k is None else order[:k]
        rest = [i for i in top if i != y]
        p = np.exp(logt[idx])
        w_y = p[y]
        if k is not None and y not in top:   # the cache does not hold p_T(y): its upper bound
            w_y = min(p[top].min(), 1.0 - p[top].sum())
        weights = [w_y] + [p[i] for i in rest]
        total += mask[idx] * _ref_token(z[idx], y, [y] + rest, weights)
        count += mask[idx]
    return total / count * temp ** 2


def _data(seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    zt = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8) * rng.choice([0.5, 1.0, 2.0], (B, T))
    mask[0, 0] = 1.0
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    # make the label the teacher's favourite at some positions, absent from its top-k at others
    labels[1] = np.argmax(zt[1], -1)
    return zs, zt, labels, mask


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_full_ranking_against_float64_reference(temp):
    zs, zt, labels, mask = _data()
    loss, metrics = pld.pld_loss(jnp.asarray(zs), jnp.asarray(labels), jnp.asarray(zt),
                                 jnp.asarray(mask), temperature=temp)
    ref = _ref_loss(zs.astype(np.float64), zt.astype(np.float64), labels, mask, temp)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["distill/pld_sum"]), ref * mask.sum(), rtol=RTOL)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_from_a_top_k_cache_against_float64_reference(temp):
    zs, zt, labels, mask = _data(seed=1)
    logt = jax.nn.log_softmax(jnp.asarray(zt) / temp, -1)
    top_logt, top_ids = jax.lax.top_k(logt, K)
    # a cache stores its ids in any order (by id): the loss ranks them itself
    order = jnp.argsort(top_ids, -1)
    ids, lps = jnp.take_along_axis(top_ids, order, -1), jnp.take_along_axis(top_logt, order, -1)
    tail = jnp.log(1.0 - jnp.sum(jnp.exp(lps), -1))
    in_cache = np.any(np.asarray(ids) == labels[..., None], -1)
    assert in_cache[mask > 0].any() and (~in_cache[mask > 0]).any()
    loss, _ = pld.sparse_pld(jnp.asarray(zs), jnp.asarray(labels), ids, lps, tail,
                             jnp.asarray(mask), temperature=temp)
    ref = _ref_loss(zs.astype(np.float64), zt.astype(np.float64), labels, mask, temp, k=K)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)


def test_full_cache_equals_live_teacher_and_invariances():
    zs, zt, labels, mask = _data(seed=2)
    logt = jax.nn.log_softmax(jnp.asarray(zt), -1)
    ids = jnp.broadcast_to(jnp.arange(V), (B, T, V))
    live, _ = pld.pld_loss(jnp.asarray(zs), jnp.asarray(labels), jnp.asarray(zt), mask)
    cached, _ = pld.sparse_pld(jnp.asarray(zs), jnp.asarray(labels), ids, logt, None, mask)
    np.testing.assert_allclose(float(cached), float(live), rtol=RTOL)
    # translation invariance in the student's logits; masked positions are inert (even nan)
    shifted, _ = pld.pld_loss(jnp.asarray(zs) + 7.0, jnp.asarray(labels), jnp.asarray(zt), mask)
    np.testing.assert_allclose(float(shifted), float(live), rtol=RTOL)
    garbage = zs.copy()
    garbage[mask <= 0] = np.nan
    g, _ = pld.pld_loss(jnp.asarray(garbage), jnp.asarray(labels), jnp.asarray(zt), mask)
    np.testing.assert_allclose(float(g), float(live), rtol=0)
    grad = jax.grad(lambda z: pld.pld_loss(z, jnp.asarray(labels), jnp.asarray(zt), mask)[0])(
        jnp.asarray(garbage))
    assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask <= 0] == 0)
    # the teacher is frozen
    g_t = jax.grad(lambda t: pld.pld_loss(jnp.asarray(zs), jnp.asarray(labels), t, mask)[0])(
        jnp.asarray(zt))
    assert np.all(np.asarray(g_t) == 0)


def test_gradient_against_float64_autodiff():
    """d PLD / d z equals the float64 autodiff of the direct formula (one token's ranking)."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal(V)
    zt = 2 * rng.standard_normal(V)
    y = 4
    p = np.exp(_logsoftmax(zt))
    ranked = [y] + [int(i) for i in np.argsort(-p, kind="stable") if i != y]
    weights = p[ranked]

    def ref(zz):
        total, placed = 0.0, jnp.zeros(V, bool)
        for tok, w in zip(ranked, weights):
            total = total + w * (jax.nn.logsumexp(jnp.where(placed, -jnp.inf, zz)) - zz[tok])
            placed = placed.at[tok].set(True)
        return total

    with jax.enable_x64(True):
        want = np.asarray(jax.grad(ref)(jnp.asarray(z, jnp.float64)))
    got = jax.grad(lambda zz: pld.pld_loss(zz[None], jnp.asarray([y]), jnp.asarray(zt[None]),
                                           jnp.ones(1))[0])(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


def test_chunked_scans_compute_the_registered_term():
    """``pld`` through the registry in the fused lm_head + loss scans (live teacher, and a
    top-k cache) equals the direct functions on full logits."""
    from distill_jax.losses import LossSpec, chunked, sparse, terms
    rng = np.random.default_rng(4)
    D = 6
    hs = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    ht = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head_s = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    head_t = jnp.asarray(2 * rng.standard_normal((D, V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.8)
    spec = LossSpec({"pld": 1.0, "cross_entropy": 0.5}, temperature=2.0,
                    chunk_terms=terms.chunk_terms(["pld", "cross_entropy"]))
    zs, zt = hs @ head_s, ht @ head_t
    want = float(pld.pld_loss(zs, labels, zt, mask, temperature=2.0)[0])
    _, m = chunked.chunked_loss(hs, head_s, ht, head_t, labels, mask, spec=spec, chunk_size=8)
    np.testing.assert_allclose(float(m["distill/pld"]), want, rtol=RTOL)
    logt = jax.nn.log_softmax(zt / 2.0, -1)
    lps, ids = jax.lax.top_k(logt, K)
    tail = jnp.log(1.0 - jnp.sum(jnp.exp(lps), -1))
    want = float(pld.sparse_pld(zs, labels, ids, lps, tail, mask, temperature=2.0)[0])
    _, m = sparse.sparse_chunked_loss(hs, head_s, ids, lps, tail, labels, mask, spec=spec,
                                      chunk_size=8)
    np.testing.assert_allclose(float(m["distill/pld"]), want, rtol=RTOL)
