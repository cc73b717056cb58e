"""DSKD (dual-space distillation with cross-model attention): the three sums and the counts against
a float64 numpy reference with explicit loops, where the gradient of each term goes, document
isolation in packed rows, chunking invariance, finite differences of the reference against the
autodiff gradient, and the shape errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import dskd as D

jax.config.update("jax_default_matmul_precision", "highest")

B, L, LT = 2, 9, 7
DS, DT, V, W = 6, 5, 11, 13

# Student rows: two documents each, padding at the end of row 0, a third student-only document
# in row 1 (no teacher positions: contributes nothing).
SEG_S = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0],
                  [1, 1, 1, 2, 2, 2, 2, 3, 3]], np.int32)
SEG_T = np.array([[1, 1, 1, 2, 2, 2, 0],
                  [1, 1, 2, 2, 2, 2, 0]], np.int32)


def _targets(tokens, seg):
    """Next-token targets within each document, -1 at a document's last token and on padding."""
    tgt = np.full_like(tokens, -1)
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - 1):
            if seg[b, i] > 0 and seg[b, i + 1] == seg[b, i]:
                tgt[b, i] = tokens[b, i + 1]
    return tgt


def make_inputs(seed=0):
    """Random packed inputs (numpy, fp32) and DSKD params."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, L)).astype(np.int32)
    ttokens = rng.integers(0, W, (B, LT)).astype(np.int32)
    targets = _targets(tokens, SEG_S)
    ttargets = _targets(ttokens, SEG_T)
    loss_mask = ((SEG_S > 0) & (targets >= 0)).astype(np.float32)
    loss_mask[0, 1] = 0.0  # a prompt position
    loss_mask[1, 4] = 0.0
    tmask = ((SEG_T > 0) & (ttargets >= 0)).astype(np.float32)
    tmask[1, 3] = 0.0
    f = np.float32
    x = {
        "h_s": rng.normal(size=(B, L, DS)).astype(f),
        "head_s": (rng.normal(size=(DS, V)) * 0.8).astype(f),
        "emb_s": rng.normal(size=(V, DS)).astype(f),
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": SEG_S,
        "h_t": rng.normal(size=(B, LT, DT)).astype(f),
        "head_t": (rng.normal(size=(DT, W)) * 0.8).astype(f),
        "emb_t": rng.normal(size=(W, DT)).astype(f),
        "teacher_tokens": ttokens, "teacher_targets": ttargets,
        "teacher_segment_ids": SEG_T, "teacher_mask": tmask,
    }
    params = {k: np.asarray(v) for k, v in D.init_dskd_params(jax.random.key(seed), DS, DT).items()}
    return x, params


# ---------------------------------------------------------------------------------------------
# float64 reference, written from the formulas with explicit loops
# ---------------------------------------------------------------------------------------------


def _log_softmax64(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def _softmax64(z):
    return np.exp(_log_softmax64(z))


def _cap(z, cap):
    return z if cap is None else cap * np.tanh(z / cap)


def _rms64(v):
    return v / np.sqrt(np.mean(v * v) + 1e-6)


def ref_dskd(x, params, student_softcap=None, teacher_softcap=None):
    """(ce_t2s, kd_student, kd_teacher, student_tokens, teacher_tokens, t2s_correct), float64."""
    x = {k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
         for k, v in x.items()}
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    scale = np.sqrt(2 * DT)
    ce = kds = kdt = 0.0
    ns = nt = correct = 0
    for b in range(B):
        q = [np.concatenate([x["emb_s"][max(x["tokens"][b, i], 0)],
                             x["emb_s"][max(x["targets"][b, i], 0)]]) @ p["query"]
             for i in range(L)]
        k = []
        for j in range(LT):
            e = np.concatenate([x["emb_t"][max(x["teacher_tokens"][b, j], 0)],
                                x["emb_t"][max(x["teacher_targets"][b, j], 0)]])
            k.append(e / np.sqrt(np.mean(e * e) + 1e-6))
        for i in range(L):
            seg = x["segment_ids"][b, i]
            js = [j for j in range(LT) if seg > 0 and x["teacher_segment_ids"][b, j] == seg]
            if not js or x["loss_mask"][b, i] <= 0 or x["targets"][b, i] < 0:
                continue
            a = _softmax64(np.array([q[i] @ k[j] for j in js]) / scale)
            h = sum(a_j * ((_rms64(x["h_t"][b, j])
                            + _rms64(x["emb_t"][max(x["teacher_targets"][b, j], 0)])) @ p["t2s"])
                    for a_j, j in zip(a, js))
            logp_x = _log_softmax64(_cap(h @ x["head_s"], student_softcap))
            logp_s = _log_softmax64(_cap(x["h_s"][b, i] @ x["head_s"], student_softcap))
            ce -= logp_x[x["targets"][b, i]]
            if np.argmax(logp_x) == x["targets"][b, i]:  # only where t2s predicts the target
                kds += np.sum(np.exp(logp_x) * (logp_x - logp_s))
                correct += 1
            ns += 1
        for j in range(LT):
            seg = x["teacher_segment_ids"][b, j]
            its = [i for i in range(L) if seg > 0 and x["segment_ids"][b, i] == seg]
            if not its or x["teacher_mask"][b, j] <= 0:
                continue
            a = _softmax64(np.array([k[j] @ q[i] for i in its]) / scale)
            h = sum(a_i * (x["h_s"][b, i] @ p["s2t"]) for a_i, i in zip(a, its))
            logp_x = _log_softmax64(_cap(h @ x["head_t"], teacher_softcap))
            logp_t = _log_softmax64(_cap(x["h_t"][b, j] @ x["head_t"], teacher_softcap))
            kdt += np.sum(np.exp(logp_t) * (logp_t - logp_x))
            nt += 1
    return ce, kds, kdt, ns, nt, correct


# ---------------------------------------------------------------------------------------------
# jitted wrappers
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("student_softcap", "teacher_softcap", "chunk_size"))
def sums_fn(x, params, student_softcap=None, teacher_softcap=None, chunk_size=512):
    return D.dskd_sums(**x, params=params, student_softcap=student_softcap,
                       teacher_softcap=teacher_softcap, chunk_size=chunk_size)


DIFF = ("h_s", "head_s", "emb_s", "h_t", "head_t", "emb_t")


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def grads_fn(x, params, chunk_size=512):
    """Per term, the gradient w.r.t. every float input and every param."""
    def term(name):
        def f(diff, params):
            return D.dskd_sums(**{**x, **diff}, params=params, chunk_size=chunk_size)[name]
        return jax.grad(f, argnums=(0, 1))({k: x[k] for k in DIFF}, params)
    return {name: term(name) for name in D.SUMS}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caps", [(None, None), (3.0, 2.5)])
def test_matches_float64_reference(caps):
    x, params = make_inputs(0)
    got = sums_fn(x, params, student_softcap=caps[0], teacher_softcap=caps[1])
    ce, kds, kdt, ns, nt, correct = ref_dskd(x, params, *caps)
    # Row 0: 5 student targets minus one prompt position; row 1: 6 minus one masked, minus the
    # student-only document 3 (one target); teacher: 4 + 4 targets minus one masked.
    assert (ns, nt) == (4 + 4, 4 + 3)
    np.testing.assert_allclose(float(got[D.CE_T2S]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(got[D.KD_STUDENT]), kds, rtol=1e-5)
    np.testing.assert_allclose(float(got[D.KD_TEACHER]), kdt, rtol=1e-5)
    assert float(got[D.STUDENT_TOKENS]) == ns and float(got[D.TEACHER_TOKENS]) == nt
    assert float(got[D.T2S_CORRECT]) == correct and 0 < correct < ns
    counts = D.dskd_counts(targets=x["targets"], loss_mask=x["loss_mask"],
                           segment_ids=x["segment_ids"],
                           teacher_segment_ids=x["teacher_segment_ids"],
                           teacher_mask=x["teacher_mask"])
    assert float(counts[D.STUDENT_TOKENS]) == ns and float(counts[D.TEACHER_TOKENS]) == nt
    loss = D.dskd_loss(got, 2.0 * ns, 3.0 * nt)
    np.testing.assert_allclose(float(loss), (ce + kds) / (2 * ns) + kdt / (3 * nt), rtol=1e-5)
    assert kds > 0 and kdt > 0


def test_gradient_routing():
    x, params = make_inputs(1)
    g = grads_fn(x, params)

    def norm(tree):
        return float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(tree)))

    expect_nonzero = {
        D.CE_T2S: {"query", "t2s"},
        D.KD_STUDENT: {"h_s", "head_s"},
        D.KD_TEACHER: {"h_s", "s2t", "query"},
    }
    for name, (g_in, g_p) in g.items():
        flat = {**g_in, **g_p}
        for k, v in flat.items():
            if k in expect_nonzero[name]:
                assert norm(v) > 0, f"{name}: gradient w.r.t. {k} is zero"
            else:
                assert norm(v) == 0.0, f"{name}: gradient w.r.t. {k} should be exactly zero"


def test_documents_do_not_mix():
    """Document 1's contribution depends on nothing of document 2, and equals the sums of a row
    holding document 1 alone."""
    x, params = make_inputs(2)
    doc1 = dict(x)
    doc1["loss_mask"] = np.where(x["segment_ids"] == 1, x["loss_mask"], 0.0).astype(np.float32)
    doc1["teacher_mask"] = np.where(x["teacher_segment_ids"] == 1, x["teacher_mask"],
                                    0.0).astype(np.float32)
    base = sums_fn(doc1, params)

    rng = np.random.default_rng(7)
    in2_t = (x["teacher_segment_ids"] == 2)[..., None]
    in2_s = (x["segment_ids"] == 2)[..., None]
    changed = dict(doc1)
    for key, inside in (("h_t", in2_t), ("h_s", in2_s)):
        noise = rng.normal(size=x[key].shape) * 3
        changed[key] = np.where(inside, noise, x[key]).astype(np.float32)
    changed["teacher_tokens"] = np.where(in2_t[..., 0], (x["teacher_tokens"] + 1) % W,
                                         x["teacher_tokens"]).astype(np.int32)
    after = sums_fn(changed, params)
    for k in D.SUMS:
        assert float(after[k]) == pytest.approx(float(base[k]), rel=1e-6), k

    # The same change does move the sums once document 2 is trained too.
    full_before, full_after = sums_fn(x, params), sums_fn({**x, **{
        k: changed[k] for k in ("h_t", "h_s", "teacher_tokens")}}, params)
    for k in D.SUMS:
        assert abs(float(full_after[k]) - float(full_before[k])) > 1e-3, k

    # Document 1 alone: row 0's first 4 student / 3 teacher positions, row 1's first 3 / 2.
    student_rows = ("h_s", "tokens", "targets", "loss_mask", "segment_ids")
    teacher_rows = ("h_t", "teacher_tokens", "teacher_targets", "teacher_segment_ids",
                    "teacher_mask")
    alone = []
    for b, (ls, lt) in enumerate(((4, 3), (3, 2))):
        row = dict(x)
        row.update({k: x[k][b:b + 1, :ls] for k in student_rows})
        row.update({k: x[k][b:b + 1, :lt] for k in teacher_rows})
        assert set(np.unique(row["segment_ids"])) == {1}
        assert set(np.unique(row["teacher_segment_ids"])) == {1}
        alone.append(sums_fn(row, params))
    for k in D.SUMS + (D.STUDENT_TOKENS, D.TEACHER_TOKENS):
        total = sum(float(a[k]) for a in alone)
        assert total == pytest.approx(float(base[k]), rel=1e-5), k


def test_chunk_size_invariance():
    x, params = make_inputs(3)
    a = sums_fn(x, params, student_softcap=3.0, teacher_softcap=2.5, chunk_size=3)
    b = sums_fn(x, params, student_softcap=3.0, teacher_softcap=2.5, chunk_size=512)
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6), k
    ga, gb = grads_fn(x, params, chunk_size=3), grads_fn(x, params, chunk_size=512)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences_of_reference():
    """Autodiff (fp32) against central differences of the float64 reference, one entry each of
    query, t2s, s2t and h_s. The float64 difference quotient with step 1e-5 is exact to ~1e-9,
    so the tolerance is the fp32 gradient's own rounding. (Seed 3: the t2s prediction is right
    at three student positions, (1, 5) among them, so kd_student has a gradient there.)"""
    x, params = make_inputs(3)
    g = grads_fn(x, params)

    def ref_term(name, xx, pp):
        return dict(zip(D.SUMS, ref_dskd(xx, pp)[:3]))[name]

    cases = [(D.CE_T2S, "p", "query", (3, 7)), (D.CE_T2S, "p", "t2s", (2, 4)),
             (D.KD_TEACHER, "p", "s2t", (5, 1)), (D.KD_STUDENT, "x", "h_s", (1, 5, 2)),
             (D.KD_TEACHER, "x", "h_s", (0, 2, 3)), (D.KD_TEACHER, "p", "query", (1, 2))]
    eps = 1e-5
    for name, where, key, idx in cases:
        def at(delta):
            xx = {k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else v
                  for k, v in x.items()}
            pp = {k: np.asarray(v, np.float64) for k, v in params.items()}
            target = pp if where == "p" else xx
            target[key] = target[key].copy()
            target[key][idx] += delta
            return ref_term(name, xx, pp)
        fd = (at(eps) - at(-eps)) / (2 * eps)
        ad = float((g[name][1] if where == "p" else g[name][0])[key][idx])
        assert abs(fd) > 1e-3, (name, key, fd)
        assert ad == pytest.approx(fd, rel=1e-4, abs=1e-6), (name, key)


def test_init_params():
    p = D.init_dskd_params(jax.random.key(0), 64, 48, jnp.bfloat16)
    assert {k: v.shape for k, v in p.items()} == {"query": (128, 96), "t2s": (48, 64),
                                                    "s2t": (64, 48)}
    assert all(v.dtype == jnp.bfloat16 for v in p.values())
    std = float(jnp.std(p["query"].astype(jnp.float32)))
    assert std == pytest.approx(1 / np.sqrt(128), rel=0.05)


def test_shape_errors_name_the_shapes():
    x, params = make_inputs(0)
    with pytest.raises(ValueError, match=r"teacher_mask has shape \(2, 6\), expected \(2, 7\)"):
        D.dskd_sums(**{**x, "teacher_mask": x["teacher_mask"][:, :6]}, params=params)
    with pytest.raises(ValueError, match=r"loss_mask has shape \(2, 8\), expected \(2, 9\)"):
        D.dskd_sums(**{**x, "loss_mask": x["loss_mask"][:, :8]}, params=params)
    with pytest.raises(ValueError, match=r"head_s has shape \(5, 11\), expected \(6, vocab\)"):
        D.dskd_sums(**{**x, "head_s": x["head_s"][:5]}, params=params)
    with pytest.raises(ValueError, match=r"emb_t has shape \(13, 4\), expected \(vocab, 5\)"):
        D.dskd_sums(**{**x, "emb_t": x["emb_t"][:, :4]}, params=params)
    with pytest.raises(ValueError, match=r"h_s has 1 rows but h_t has 2"):
        D.dskd_sums(**{**x, "h_s": x["h_s"][:1]}, params=params)
    bad = D.init_dskd_params(jax.random.key(0), DT, DS)
    with pytest.raises(ValueError, match=r"init_dskd_params\(key, 6, 5\)"):
        D.dskd_sums(**x, params=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        D.dskd_sums(**x, params=params, chunk_size=0)


def test_vocabulary_logits_never_whole():
    """Forward + backward compiled (nothing allocated): with 64-position chunks the temporaries
    stay well under one full (B, L, V) fp32 student logit array, and far under the one-chunk
    compile, whose logits are whole."""
    b, ls, lt, ds, dt, v, w = 2, 256, 200, 32, 48, 40000, 30000
    f, i = jnp.float32, jnp.int32
    sd = jax.ShapeDtypeStruct
    x = dict(h_s=sd((b, ls, ds), f), head_s=sd((ds, v), f), emb_s=sd((v, ds), f),
             tokens=sd((b, ls), i), targets=sd((b, ls), i), loss_mask=sd((b, ls), f),
             segment_ids=sd((b, ls), i), h_t=sd((b, lt, dt), f), head_t=sd((dt, w), f),
             emb_t=sd((w, dt), f), teacher_tokens=sd((b, lt), i), teacher_targets=sd((b, lt), i),
             teacher_segment_ids=sd((b, lt), i), teacher_mask=sd((b, lt), f))
    params = jax.eval_shape(lambda: D.init_dskd_params(jax.random.key(0), ds, dt))

    def temp_bytes(chunk_size):
        def loss(h_s, head_s, params, x):
            sums = D.dskd_sums(**{**x, "h_s": h_s, "head_s": head_s}, params=params,
                               chunk_size=chunk_size)
            return D.dskd_loss(sums, 1.0, 1.0)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            x["h_s"], x["head_s"], params, x).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis is unavailable on this backend")
        return analysis.temp_size_in_bytes

    full_logits = b * ls * v * 4
    chunked, whole = temp_bytes(64), temp_bytes(b * ls)
    assert chunked < 0.6 * full_logits, (chunked, full_logits)
    assert whole > 2 * full_logits and chunked < whole / 4, (chunked, whole)


def test_projectors_learn_the_alignment():
    """Trained on ce_t2s alone, the query and t2s projectors fit a teacher whose hidden states
    carry the student's next tokens: ce_t2s falls well below the uniform log(V), and the
    student-space distribution it yields then puts most mass on the student's targets."""
    import optax
    x, params = make_inputs(3)
    x = {k: jnp.asarray(v) for k, v in x.items()}
    # A teacher state at position j that encodes the student target of the student position
    # reading the same document at the same rank: t2s can learn to read it out.
    rng = np.random.default_rng(0)
    code = rng.normal(size=(V, DT)).astype(np.float32)
    h_t = np.zeros((B, LT, DT), np.float32)
    for b in range(B):
        for s in (1, 2):
            si, ti = np.flatnonzero(SEG_S[b] == s), np.flatnonzero(SEG_T[b] == s)
            for k, j in enumerate(ti):
                h_t[b, j] = code[max(int(x["targets"][b, si[min(k, len(si) - 1)]]), 0)]
    x["h_t"] = jnp.asarray(h_t)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: D.dskd_sums(**x, params=p)[D.CE_T2S])(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    n = float(D.dskd_counts(**{k: x[k] for k in ("targets", "loss_mask", "segment_ids",
                                                  "teacher_segment_ids", "teacher_mask")})
              [D.STUDENT_TOKENS])
    first = None
    for _ in range(300):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    final = float(D.dskd_sums(**x, params=params)[D.CE_T2S]) / n
    assert first / n > 0.5 * np.log(V)
    assert final < 0.25 * first / n, (first / n, final)
