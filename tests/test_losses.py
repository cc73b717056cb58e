"""Distillation losses: golden values against a float64 reference written from the formulas,
invariances (KL(p, p) = 0, masked tokens are inert, padded vocabularies, T = 1 CE), chunked ==
unchunked (values and gradients), the frozen teacher, and non-negativity as a property."""

import functools
import types

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import losses as L
from distill_jax.losses import kd
from distill_jax.models import transformer as tfm

jax.config.update("jax_default_matmul_precision", "highest")

RTOL = 1e-5
B, T, V = 3, 7, 23


# ---------------------------------------------------------------------------------------------
# float64 reference, written from the formulas; `xp` is numpy (values) or jax.numpy under x64
# (reference gradients).
# ---------------------------------------------------------------------------------------------


def _ref_logp(xp, z, temp):
    z = z / temp
    mx = xp.max(z, axis=-1, keepdims=True)
    return z - mx - xp.log(xp.sum(xp.exp(z - mx), axis=-1, keepdims=True))


def _ref_kl(xp, lp, lq):
    p = xp.exp(lp)
    with np.errstate(invalid="ignore"):
        return xp.sum(xp.where(p > 0, p * (lp - xp.where(p > 0, lq, 0.0)), 0.0), axis=-1)


def _ref_kl_mix(xp, lp, lq, w):
    """KL(p || w p + (1 - w) q), directly."""
    p, q = xp.exp(lp), xp.exp(lq)
    m = w * p + (1 - w) * q
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.sum(xp.where(p > 0, p * (xp.log(xp.where(p > 0, p, 1.0))
                                          - xp.log(xp.where(p > 0, m, 1.0))), 0.0), axis=-1)


def _ref_jsd(xp, ls, lt, beta, scaled=False):
    if beta == 0:
        return _ref_kl(xp, lt, ls)
    if beta == 1:
        return _ref_kl(xp, ls, lt)
    kl_t = _ref_kl_mix(xp, lt, ls, beta)        # KL(p_T || m), m = beta p_T + (1 - beta) p_S
    kl_s = _ref_kl_mix(xp, ls, lt, 1 - beta)    # KL(p_S || m)
    js = beta * kl_t + (1 - beta) * kl_s
    return js / (beta * (1 - beta)) if scaled else js


def _ref_per_token(xp, name, ls, lt, beta=0.5, alpha=0.1):
    if name == "forward_kl":
        return _ref_kl(xp, lt, ls)
    if name == "reverse_kl":
        return _ref_kl(xp, ls, lt)
    if name == "jsd":
        return _ref_jsd(xp, ls, lt, beta)
    if name == "jsd_scaled":
        return _ref_jsd(xp, ls, lt, beta, scaled=True)
    if name == "tvd":
        return 0.5 * xp.sum(xp.abs(xp.exp(lt) - xp.exp(ls)), axis=-1)
    if name == "skew_kl":
        return _ref_kl_mix(xp, lt, ls, alpha)
    if name == "skew_reverse_kl":
        return _ref_kl_mix(xp, ls, lt, alpha)
    raise KeyError(name)


def _ref_loss(xp, name, zs, zt, w, temp=1.0, **opts):
    ls, lt = _ref_logp(xp, zs, temp), _ref_logp(xp, zt, temp)
    per = _ref_per_token(xp, name, ls, lt, **opts) * temp ** 2
    return xp.sum(w * per) / xp.sum(w)


def _ref_ce(zs, labels, w):
    lp = _ref_logp(np, zs.astype(np.float64), 1.0)
    nll = -np.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]
    return np.sum(w * nll) / np.sum(w)


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _inputs(seed=0, shape=(B, T, V), scale=3.0):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.standard_normal(shape)).astype(np.float32)
    zt = (scale * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape[:-1]) < 0.7
    mask[0, 0] = True
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    return zs, zt, mask, labels


# (name, options) of every divergence; the interior and endpoint cases of beta and alpha.
CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
    ("jsd", dict(beta=0.0)), ("jsd", dict(beta=0.1)), ("jsd", dict(beta=0.5)),
    ("jsd", dict(beta=0.9)), ("jsd", dict(beta=1.0)),
    ("jsd_scaled", dict(beta=0.0)), ("jsd_scaled", dict(beta=0.1)),
    ("jsd_scaled", dict(beta=0.5)), ("jsd_scaled", dict(beta=1.0)),
    ("skew_kl", dict(alpha=0.0)), ("skew_kl", dict(alpha=0.1)), ("skew_kl", dict(alpha=0.5)),
    ("skew_reverse_kl", dict(alpha=0.0)), ("skew_reverse_kl", dict(alpha=0.1)),
    ("skew_reverse_kl", dict(alpha=0.5)),
]
_ID = [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for n, o in CASES]


def _call(name, zs, zt, mask, **kw):
    return L.DIVERGENCES[name](jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(mask), **kw)


# ---------------------------------------------------------------------------------------------
# Golden values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("name,opts", CASES, ids=_ID)
def test_golden_against_float64_reference(name, opts, temp):
    zs, zt, mask, _ = _inputs()
    weights = mask * np.random.default_rng(1).choice([0.5, 1.0, 2.0], mask.shape)
    for m in (mask, weights):
        loss, metrics = _call(name, zs, zt, m, temperature=temp, **opts)
        ref = _ref_loss(np, name, zs.astype(np.float64), zt.astype(np.float64),
                        np.asarray(m, np.float64), temp, **opts)
        np.testing.assert_allclose(loss, ref, rtol=RTOL)
        assert set(metrics) == {kd.metric_key(name), kd.sum_key(name), L.TOKENS}
        np.testing.assert_allclose(metrics[L.TOKENS], np.sum(m), rtol=0)
        np.testing.assert_allclose(metrics[kd.sum_key(name)], ref * np.sum(m), rtol=RTOL)
        assert metrics[kd.metric_key(name)] == loss


@pytest.mark.parametrize("name,opts", CASES, ids=_ID)
def test_gradients_against_float64_reference(name, opts):
    """d loss / d student_logits of the fp32 implementation equals the float64 autodiff of the
    direct formulas (so the stable log1p/expm1 forms are also right in the backward pass)."""
    zs, zt, mask, _ = _inputs(seed=2)
    temp = 2.0
    grad = jax.grad(lambda z: _call(name, z, zt, mask, temperature=temp, **opts)[0])(
        jnp.asarray(zs))
    with jax.enable_x64(True):
        ref = jax.grad(lambda z: _ref_loss(jnp, name, z, jnp.asarray(zt, jnp.float64),
                                           jnp.asarray(mask, jnp.float64), temp, **opts))(
            jnp.asarray(zs, jnp.float64))
        ref = np.asarray(ref)
    np.testing.assert_allclose(grad, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def test_forward_kl_gradient_is_p_student_minus_p_teacher():
    zs, zt, mask, _ = _inputs(seed=3)
    temp = 2.0
    grad = jax.grad(lambda z: L.forward_kl(z, jnp.asarray(zt), mask, temperature=temp)[0])(
        jnp.asarray(zs))
    ps = np.exp(_ref_logp(np, zs.astype(np.float64), temp))
    pt = np.exp(_ref_logp(np, zt.astype(np.float64), temp))
    ref = temp * (ps - pt) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def _trl_generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature):
    """float64 numpy transcription of TRL's ``GKDTrainer.generalized_jsd_loss`` (reduction
    "batchmean" over the unmasked labels). ``F.kl_div(input, target, log_target=True)`` is
    ``exp(target) * (target - input)`` elementwise, i.e. KL(target || input)."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def kl_div(inp, target):
        return np.exp(target) * (target - inp)

    s = log_softmax(student_logits / temperature)
    t = log_softmax(teacher_logits / temperature)
    if beta == 0:
        jsd = kl_div(s, t)
    elif beta == 1:
        jsd = kl_div(t, s)
    else:
        mixture = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
        jsd = beta * kl_div(mixture, t) + (1 - beta) * kl_div(mixture, s)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_is_trl_generalized_jsd(beta):
    """``jsd`` is TRL's / GKD's generalised JSD for the same beta (endpoints included), so
    weights and betas carry over; the temperature adds the T^2 every divergence here has."""
    zs, zt, mask, labels = _inputs(seed=14)
    labels = np.where(mask, labels, -100)
    for temp in (1.0, 2.0):
        ref = _trl_generalized_jsd_loss(zs.astype(np.float64), zt.astype(np.float64), labels,
                                        beta, temp) * temp ** 2
        np.testing.assert_allclose(L.jsd(zs, zt, mask, temperature=temp, beta=beta)[0], ref,
                                   rtol=RTOL)
    # At beta = 1/2: the usual Jensen-Shannon divergence, bounded by log 2.
    if beta == 0.5:
        assert 0 < float(L.jsd(zs, zt, mask, beta=0.5)[0]) <= np.log(2)


def test_jsd_scaled_endpoints_equal_the_kls_and_midpoint_is_4_js():
    zs, zt, mask, _ = _inputs(seed=4)
    for temp in (1.0, 2.0):
        fkl = L.forward_kl(zs, zt, mask, temperature=temp)[0]
        rkl = L.reverse_kl(zs, zt, mask, temperature=temp)[0]
        for fn in (L.jsd, L.jsd_scaled):
            assert fn(zs, zt, mask, temperature=temp, beta=0.0)[0] == fkl
            assert fn(zs, zt, mask, temperature=temp, beta=1.0)[0] == rkl
        # The usual Jensen-Shannon divergence, M = (p_T + p_S) / 2.
        ls = _ref_logp(np, zs.astype(np.float64), temp)
        lt = _ref_logp(np, zt.astype(np.float64), temp)
        mid = np.log(0.5 * (np.exp(ls) + np.exp(lt)))
        js = 0.5 * _ref_kl(np, lt, mid) + 0.5 * _ref_kl(np, ls, mid)
        ref = np.sum(mask * js) / mask.sum() * temp ** 2
        np.testing.assert_allclose(L.jsd(zs, zt, mask, temperature=temp, beta=0.5)[0], ref,
                                   rtol=RTOL)
        np.testing.assert_allclose(L.jsd_scaled(zs, zt, mask, temperature=temp, beta=0.5)[0],
                                   4 * ref, rtol=RTOL)
    # The endpoints are the limits of the interior formula: jsd_beta - KL = O(beta * chi^2), so
    # this check uses milder logits (chi^2 of the scale-3 ones above reaches ~1e5).
    zs, zt, mask, _ = _inputs(seed=4, scale=1.0)
    ls, lt = _ref_logp(np, zs.astype(np.float64), 1.0), _ref_logp(np, zt.astype(np.float64), 1.0)
    np.testing.assert_allclose(_ref_jsd(np, ls, lt, 1e-7, True), _ref_kl(np, lt, ls), rtol=1e-5)
    np.testing.assert_allclose(_ref_jsd(np, ls, lt, 1 - 1e-7, True), _ref_kl(np, ls, lt),
                               rtol=1e-5)
    # ... and the fp32 implementation stays accurate right next to them (no cancellation as
    # beta -> 0 or 1), so the family is continuous in practice too.
    w = mask.astype(np.float64)
    for beta in (1e-5, 1 - 1e-5):
        ref = np.sum(w * _ref_jsd(np, ls, lt, beta, True)) / w.sum()
        np.testing.assert_allclose(L.jsd_scaled(zs, zt, mask, beta=beta)[0], ref, rtol=RTOL)
        ref = np.sum(w * _ref_jsd(np, ls, lt, beta)) / w.sum()
        np.testing.assert_allclose(L.jsd(zs, zt, mask, beta=beta)[0], ref, rtol=RTOL)
    np.testing.assert_allclose(L.jsd_scaled(zs, zt, mask, beta=1e-5)[0],
                               L.forward_kl(zs, zt, mask)[0], rtol=1e-4)
    np.testing.assert_allclose(L.jsd_scaled(zs, zt, mask, beta=1 - 1e-5)[0],
                               L.reverse_kl(zs, zt, mask)[0], rtol=1e-4)


def test_cross_entropy_golden():
    zs, _, mask, labels = _inputs(seed=5)
    loss, metrics = L.cross_entropy(zs, labels, mask)
    np.testing.assert_allclose(loss, _ref_ce(zs, labels, mask), rtol=RTOL)
    assert metrics[L.TOKENS] == mask.sum()


def test_combined_loss_sums_weighted_terms():
    zs, zt, mask, labels = _inputs(seed=6)
    spec = L.LossSpec.from_dict(dict(terms={"forward_kl": 1.0, "jsd": 0.5, "cross_entropy": 0.1},
                                     temperature=2.0, jsd_beta=0.3))
    loss, metrics = jax.jit(L.combined_loss, static_argnames="spec")(zs, zt, labels, mask,
                                                                     spec=spec)
    x = [a.astype(np.float64) for a in (zs, zt)]
    fkl = _ref_loss(np, "forward_kl", *x, mask, 2.0)
    js = _ref_loss(np, "jsd", *x, mask, 2.0, beta=0.3)
    ce = _ref_ce(zs, labels, mask)
    np.testing.assert_allclose(loss, fkl + 0.5 * js + 0.1 * ce, rtol=RTOL)
    np.testing.assert_allclose(metrics[L.LOSS], loss, rtol=0)
    np.testing.assert_allclose(metrics[L.LOSS_SUM], loss * mask.sum(), rtol=RTOL)
    for name, ref in (("forward_kl", fkl), ("jsd", js), ("cross_entropy", ce)):
        np.testing.assert_allclose(metrics[kd.metric_key(name)], ref, rtol=RTOL)
        np.testing.assert_allclose(metrics[kd.sum_key(name)], ref * mask.sum(), rtol=RTOL)
    # The teacher is frozen by construction.
    g_t = jax.grad(lambda z: L.combined_loss(zs, z, labels, mask, spec)[0])(jnp.asarray(zt))
    assert np.all(np.asarray(g_t) == 0)


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", CASES, ids=_ID)
def test_divergence_of_a_distribution_with_itself_is_zero(name, opts):
    zs, _, mask, _ = _inputs(seed=7)
    for temp in (1.0, 2.0):
        loss, _ = _call(name, zs, zs, mask, temperature=temp, **opts)
        assert abs(float(loss)) <= 1e-7, loss
        # Shifting the logits by a per-token constant is the same distribution.
        loss, _ = _call(name, zs, zs + 5.0, mask, temperature=temp, **opts)
        assert abs(float(loss)) <= 1e-6, loss


def _all_losses(zs, zt, labels, mask):
    """Every divergence and CE, for invariance checks: name -> (loss, grad wrt student)."""
    out = {}
    for (name, opts), ident in zip(CASES, _ID):
        fn = lambda z, name=name, opts=opts: _call(name, z, zt, mask, temperature=2.0, **opts)[0]
        out[ident] = jax.value_and_grad(fn)(jnp.asarray(zs))
    out["ce"] = jax.value_and_grad(lambda z: L.cross_entropy(z, labels, mask)[0])(jnp.asarray(zs))
    return out


def test_masked_positions_change_nothing():
    zs, zt, mask, labels = _inputs(seed=8)
    base = _all_losses(zs, zt, labels, mask)
    rng = np.random.default_rng(9)
    zs2, zt2, labels2 = zs.copy(), zt.copy(), labels.copy()
    off = ~mask
    zs2[off] = 100 * rng.standard_normal((off.sum(), V))
    zt2[off] = np.nan
    zt2[off, 3] = -np.inf
    zs2[np.argwhere(off)[0][0], np.argwhere(off)[0][1]] = np.inf
    labels2[off] = 10_000  # out of range: must not matter either
    other = _all_losses(zs2, zt2, labels2, mask)
    for key, (loss, grad) in base.items():
        loss2, grad2 = other[key]
        assert loss2 == loss, key
        np.testing.assert_array_equal(grad2, grad, err_msg=key)
        assert np.all(np.asarray(grad)[off] == 0), key


def test_all_masked_is_zero_not_nan():
    zs, zt, _, labels = _inputs(seed=10)
    none = np.zeros(zs.shape[:-1], bool)
    for key, (loss, grad) in _all_losses(zs, zt, labels, none).items():
        assert float(loss) == 0.0, key
        assert np.all(np.asarray(grad) == 0), key
    spec = L.LossSpec({"forward_kl": 1.0, "cross_entropy": 1.0})
    loss, metrics = L.combined_loss(zs, zt, labels, none, spec)
    assert float(loss) == 0.0 and float(metrics[L.TOKENS]) == 0.0
    assert all(np.isfinite(v) for v in metrics.values())


def test_minus_inf_padded_vocabulary_is_finite_and_inert():
    """-inf logits on padded vocab entries (both models): 0 log 0 = 0, finite gradients, and the
    same loss as the unpadded vocabulary."""
    zs, zt, mask, labels = _inputs(seed=11)
    pad = 5
    zs_p = np.concatenate([zs, np.full(zs.shape[:-1] + (pad,), -np.inf, np.float32)], -1)
    zt_p = np.concatenate([zt, np.full(zt.shape[:-1] + (pad,), -np.inf, np.float32)], -1)
    padded = _all_losses(zs_p, zt_p, labels, mask)
    plain = _all_losses(zs, zt, labels, mask)
    for key, (loss, grad) in padded.items():
        assert np.isfinite(loss), key
        assert np.all(np.isfinite(grad)), key
        assert np.all(np.asarray(grad)[..., -pad:] == 0), key
        np.testing.assert_allclose(loss, plain[key][0], rtol=RTOL, err_msg=key)
        np.testing.assert_allclose(np.asarray(grad)[..., :-pad], plain[key][1], rtol=RTOL,
                                   atol=1e-8, err_msg=key)


def test_teacher_zero_where_student_is_not():
    """A teacher with exact zeros (-inf logits) where the student has mass: forward KL, JSD,
    TVD and the skews stay finite; reverse KL is +inf, as the formula says."""
    zs, zt, mask, _ = _inputs(seed=12)
    zt = zt.copy()
    zt[..., :4] = -np.inf
    for (name, opts), ident in zip(CASES, _ID):
        loss, _ = _call(name, zs, zt, mask, **opts)
        infinite = name == "reverse_kl" or (name.startswith("jsd") and opts["beta"] == 1.0) or (
            name == "skew_reverse_kl" and opts["alpha"] == 0.0)
        assert (np.isposinf(loss) if infinite else np.isfinite(loss)), (ident, loss)
        if not infinite:
            ref = _ref_loss(np, name, zs.astype(np.float64), zt.astype(np.float64),
                            mask.astype(np.float64), 1.0, **opts)
            np.testing.assert_allclose(loss, ref, rtol=RTOL, err_msg=ident)


def test_temperature_one_cross_entropy_only_is_plain_cross_entropy():
    zs, zt, mask, labels = _inputs(seed=13)
    plain, _ = L.cross_entropy(zs, labels, mask)
    only, _ = L.combined_loss(zs, None, labels, mask, L.LossSpec({"cross_entropy": 1.0}))
    zero_kd, _ = L.combined_loss(zs, zt, labels, mask,
                                 L.LossSpec({"cross_entropy": 1.0, "forward_kl": 0.0}))
    assert only == plain
    np.testing.assert_allclose(zero_kd, plain, rtol=RTOL)
    # With T = 1, cross-entropy against a one-hot teacher is the forward KL.
    onehot = np.where(np.eye(V, dtype=bool)[labels], 0.0, -np.inf).astype(np.float32)
    np.testing.assert_allclose(L.forward_kl(zs, onehot, mask)[0], plain, rtol=RTOL)


def test_loss_spec_validation():
    with pytest.raises(ValueError, match="forward_kl"):
        L.LossSpec({"forward_k": 1.0})
    with pytest.raises(ValueError, match="temperature"):
        L.LossSpec.from_dict({"terms": {"jsd": 1.0}, "temprature": 2.0})
    with pytest.raises(ValueError, match="beta"):
        L.LossSpec({"jsd": 1.0}, jsd_beta=1.5)
    spec = L.LossSpec.from_dict({"terms": {"forward_kl": 1.0, "cross_entropy": 0.1},
                                 "temperature": 2.0, "jsd_beta": 0.5})
    assert hash(spec) == hash(L.LossSpec({"cross_entropy": 0.1, "forward_kl": 1.0},
                                         temperature=2.0))
    assert spec.needs_teacher and spec.needs_labels
    with pytest.raises(ValueError, match="teacher"):
        L.combined_loss(np.zeros((2, 3)), None, np.zeros(2, np.int32), np.ones(2), spec)


# ---------------------------------------------------------------------------------------------
# Chunked lm_head + loss
# ---------------------------------------------------------------------------------------------

D_S, D_T, T_C = 16, 24, 13  # B x T_C = 39 tokens


def _hidden(seed=20):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    hs, ht = f(B, T_C, D_S), f(B, T_C, D_T)
    ws, wt = f(D_S, V) * 0.7, f(D_T, V) * 0.6
    mask = jnp.asarray(rng.random((B, T_C)) < 0.8)
    labels = jnp.asarray(rng.integers(0, V, (B, T_C)), jnp.int32)
    return hs, ws, ht, wt, labels, mask


SPEC = L.LossSpec({"forward_kl": 1.0, "jsd": 0.5, "skew_reverse_kl": 0.25, "tvd": 0.5,
                   "cross_entropy": 0.1}, temperature=2.0, jsd_beta=0.3)


def _unchunked(hs, ws, ht, wt, labels, mask, spec, cs=None, ct=None):
    zs = L.logits_from_hidden(hs, ws, cs)
    zt = None if ht is None else L.logits_from_hidden(ht, wt, ct)
    return L.combined_loss(zs, zt, labels, mask, spec)


def test_logits_from_hidden_matches_the_model():
    hs, ws, *_ = _hidden()
    for cap in (None, 3.0):
        cfg = types.SimpleNamespace(final_logit_softcap=cap)
        np.testing.assert_array_equal(L.logits_from_hidden(hs, ws, cap),
                                      tfm.logits_from_hidden(cfg, hs, ws))


CAPS = dict(cs=4.0, ct=5.0)


@functools.lru_cache(maxsize=None)
def _unchunked_reference():
    """(loss, metrics), grads wrt (student_h, student_head) of the unchunked loss, once."""
    hs, ws, ht, wt, labels, mask = _hidden()
    fn = lambda hs, ws: _unchunked(hs, ws, ht, wt, labels, mask, SPEC, **CAPS)
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(hs, ws)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size):
    """39 tokens: chunks of 1 and 13 divide them, 5 leaves a padded last chunk, 64 is a
    single padded chunk."""
    hs, ws, ht, wt, labels, mask = _hidden()

    def chunked(hs, ws, ht, wt):
        return L.chunked_loss(hs, ws, ht, wt, labels, mask, spec=SPEC, chunk_size=chunk_size,
                              student_softcap=CAPS["cs"], teacher_softcap=CAPS["ct"])

    (l_ref, m_ref), g_ref = _unchunked_reference()
    (l_c, m_c), g_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3), has_aux=True))(
        hs, ws, ht, wt)
    np.testing.assert_allclose(l_c, l_ref, rtol=RTOL)
    assert set(m_c) == set(m_ref)
    for k in m_ref:
        np.testing.assert_allclose(m_c[k], m_ref[k], rtol=RTOL, err_msg=k)
    for a, b in zip(g_c[:2], g_ref):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())
    # No gradient reaches the teacher.
    assert np.all(np.asarray(g_c[2]) == 0) and np.all(np.asarray(g_c[3]) == 0)


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_fused_chunked_gradient_equals_the_recomputing_one(chunk_size, monkeypatch):
    """With the cotangent known in advance (a training step's fixed weights over counts), the
    scan computes the gradient in its forward pass: the same sums, and the same vjp for that
    cotangent as the unchunked loss; any other cotangent (GradMag's probes) falls back to the
    exact recomputation."""
    hs, ws, ht, wt, labels, mask = _hidden()
    names = [n for n, _ in SPEC.terms]
    ct = {n: jnp.float32(0.3 * (i + 1) * (-1) ** i) for i, n in enumerate(names)}

    def sums(hs, ws, cotangent):
        _, m = L.chunked_loss(hs, ws, ht, wt, labels, mask, spec=SPEC, chunk_size=chunk_size,
                              student_softcap=CAPS["cs"], teacher_softcap=CAPS["ct"],
                              cotangent=cotangent)
        return {n: m[kd.sum_key(n)] for n in names}

    def reference(hs, ws):
        m = _unchunked(hs, ws, ht, wt, labels, mask, SPEC, **CAPS)[1]
        return {n: m[kd.sum_key(n)] for n in names}

    from distill_jax.losses import chunked
    recomputed = []
    monkeypatch.setattr(chunked, "on_recompute", lambda: recomputed.append(1))
    s_ref, vjp_ref = jax.vjp(reference, hs, ws)
    s_f, vjp_f = jax.jit(lambda hs, ws: jax.vjp(lambda a, b: sums(a, b, ct), hs, ws))(hs, ws)
    for n in names:
        np.testing.assert_allclose(s_f[n], s_ref[n], rtol=RTOL, err_msg=n)
    other = {n: jnp.float32(1.0 if n == "jsd" else 0.0) for n in names}
    for cot, recomputes in ((ct, False), (other, True)):
        recomputed.clear()
        for a, b in zip(vjp_f(cot), vjp_ref(cot)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())
        jax.effects_barrier()
        assert bool(recomputed) == recomputes
    # bitwise: the recomputing path gives the same gradient the forward scan stored
    g_plain = jax.vjp(lambda a, b: sums(a, b, None), hs, ws)[1](ct)
    for a, b in zip(vjp_f(ct), g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


def test_chunked_bf16_hidden_and_cross_entropy_only_without_teacher():
    hs, ws, _, _, labels, mask = _hidden(seed=21)
    hs = hs.astype(jnp.bfloat16)
    spec = L.LossSpec({"cross_entropy": 1.0})
    l_c, m_c = L.chunked_loss(hs, ws, None, None, labels, mask, spec=spec, chunk_size=7)
    l_ref, _ = L.cross_entropy(L.logits_from_hidden(hs, ws), labels, mask)
    np.testing.assert_allclose(l_c, l_ref, rtol=RTOL)
    assert set(m_c) == {L.TOKENS, L.LOSS, L.LOSS_SUM, kd.metric_key("cross_entropy"),
                        kd.sum_key("cross_entropy")}


def test_chunked_masked_tokens_are_inert_and_all_masked_is_zero():
    hs, ws, ht, wt, labels, mask = _hidden(seed=22)
    run = jax.jit(lambda hs, ht, m: jax.value_and_grad(
        lambda h: L.chunked_loss(h, ws, ht, wt, labels, m, spec=SPEC, chunk_size=8)[0])(hs))
    loss, grad = run(hs, ht, mask)
    off = ~np.asarray(mask)
    loss2, grad2 = run(jnp.where(mask[..., None], hs, 1e3), jnp.where(mask[..., None], ht, -1e3),
                       mask)
    assert loss2 == loss
    np.testing.assert_array_equal(grad2, grad)
    assert np.all(np.asarray(grad)[off] == 0)
    loss0, grad0 = run(hs, ht, jnp.zeros_like(mask))
    assert float(loss0) == 0.0 and np.all(np.asarray(grad0) == 0)


# ---------------------------------------------------------------------------------------------
# Property: divergences are non-negative, finite and zero at equality
# ---------------------------------------------------------------------------------------------

_SHAPE = (4, 9)
_logits = hnp.arrays(np.float32, _SHAPE,
                     elements=st.floats(-60, 60, width=32, allow_nan=False))


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(zs=_logits, zt=_logits, mask=hnp.arrays(np.bool_, _SHAPE[:-1]),
                  temp=st.sampled_from([0.5, 1.0, 3.0]), case=st.sampled_from(CASES))
def test_divergences_are_non_negative(zs, zt, mask, temp, case):
    name, opts = case
    loss, metrics = _call(name, zs, zt, mask, temperature=temp, **opts)
    assert np.isfinite(loss)
    assert loss >= 0.0, loss
