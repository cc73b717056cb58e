"""ALM cross-tokenizer loss: golden values against a float64 numpy reference written from the
formulas with plain loops (hand-built and random alignments, every distance, boundary debias and
merging on and off), token statistics against numpy and across chunk sizes, gradients against
float64 finite differences and analytic numpy gradients, the identical-tokenizer invariance, and
exact additivity of sums and counts over a split batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import alm

jax.config.update("jax_default_matmul_precision", "highest")

RTOL = 1e-5
# Every ALM batch here is (4, 10) student / (4, 8) teacher rows, or twice as many rows: eager ops
# compile once per shape, and compiling dominates this file's run time.
ROWS, LEN, T_LEN = 4, 10, 8
DISTANCES = ("binary_ce", "abs", "reverse_binary_kl")


# ---------------------------------------------------------------------------------------------
# float64 reference, written from the formulas with loops
# ---------------------------------------------------------------------------------------------


def _lse(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def ref_token_stats(logits, targets, word_start):
    """(logp, boundary) from (..., V) float64 logits."""
    logp_all = logits - _lse(logits)[..., None]
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    boundary = _lse(np.where(word_start, logp_all, -np.inf))
    return logp, boundary


def ref_chunks(logp, boundary, ids, seg):
    """Per row, {chunk id: (l, b)}."""
    rows = []
    for r in range(ids.shape[0]):
        pos = {}
        for i in range(ids.shape[1]):
            if ids[r, i] >= 0:
                pos.setdefault(int(ids[r, i]), []).append(i)
        out = {}
        for c, ps in pos.items():
            last = max(ps)
            b = 0.0
            if last + 1 < ids.shape[1] and seg[r, last + 1] == seg[r, last]:
                b = float(boundary[r, last + 1])
            out[c] = (float(sum(logp[r, i] for i in ps)), b)
        rows.append(out)
    return rows


def ref_distance(name, s_t, s_s, tau):
    la = min(s_t / tau, -alm.EPS)
    lb = min(s_s / tau, -alm.EPS)
    a, b = math.exp(la), math.exp(lb)
    if name == "binary_ce":
        return -(a * lb + (1 - a) * math.log(1 - b))
    if name == "abs":
        return abs(a - b)
    assert name == "reverse_binary_kl"
    return b * (lb - la) + (1 - b) * (math.log(1 - b) - math.log(1 - a))


def ref_alm(student, teacher, *, append_space, theta, distance, tau):
    """(sum, count, groups per row). student / teacher: (logp, boundary, ids, seg) arrays."""
    S = ref_chunks(*[np.asarray(x, np.float64) if i < 2 else np.asarray(x)
                     for i, x in enumerate(student)])
    T = ref_chunks(*[np.asarray(x, np.float64) if i < 2 else np.asarray(x)
                     for i, x in enumerate(teacher)])
    total, count, all_groups = 0.0, 0, []
    for s_row, t_row in zip(S, T):
        ids = sorted(set(s_row) & set(t_row))
        groups, cur = [], []
        for c in ids:
            cur.append(c)
            if theta is None or math.exp(t_row[c][1]) > theta or c + 1 not in ids:
                groups.append(cur)
                cur = []
        assert not cur
        all_groups.append(groups)
        for g in groups:
            s_t = sum(t_row[c][0] for c in g) + (t_row[g[-1]][1] if append_space else 0.0)
            s_s = sum(s_row[c][0] for c in g) + (s_row[g[-1]][1] if append_space else 0.0)
            total += ref_distance(distance, s_t, s_s, tau)
            count += 1
    return total, count, all_groups


# ---------------------------------------------------------------------------------------------
# Alignments
# ---------------------------------------------------------------------------------------------


def hand_alignment():
    """Four rows (student L=10, teacher Lt=8): chunks of different lengths on each side, gaps,
    a segment change, -1 positions, chunks at the row end, a chunk on one side only, an empty
    row."""
    s_ids = np.array([
        [0, 0, 1, 2, 2, 2, -1, 3, 4, 4],          # chunk 4 ends the row (b = 0)
        [0, 1, 1, -1, 3, 3, 4, -1, -1, -1],       # id 2 absent: segment change between 1 and 3
        [0, 1, -1, 2, 3, 3, 5, 6, -1, -1],        # 2 on the student side only, 4 on the teacher's
        [-1] * 10,                                # nothing aligned
    ])
    s_seg = np.array([
        [1] * 10,
        [1, 1, 1, 1, 2, 2, 2, 2, 0, 0],
        [1] * 8 + [0, 0],
        [0] * 10,
    ])
    t_ids = np.array([
        [0, 1, 1, 2, 3, 4, 4, 4],                 # chunk 4 ends the row
        [0, 1, -1, 3, 4, 4, -1, -1],              # chunk 4 followed by padding (b = 0)
        [0, 1, 3, 4, 5, 5, 6, 6],
        [-1] * 8,
    ])
    t_seg = np.array([
        [1] * 8,
        [1, 1, 1, 2, 2, 2, 0, 0],
        [1] * 8,
        [0] * 8,
    ])
    return s_ids, s_seg, t_ids, t_seg


def random_alignment(rng, rows, length, t_length):
    """Random consistent alignments: chunks of 1-3 tokens per side, skipped spans (an id gap and
    -1 positions), segment changes (an id gap, a new segment id), rows ending in a chunk, in
    padding or in unaligned positions."""
    s_ids = -np.ones((rows, length), np.int32)
    t_ids = -np.ones((rows, t_length), np.int32)
    s_seg = np.zeros((rows, length), np.int32)
    t_seg = np.zeros((rows, t_length), np.int32)
    for r in range(rows):
        i = j = c = 0
        seg = 1
        while True:
            u = rng.random()
            if c > 0 and u < 0.25:
                k_s, k_t = (rng.integers(1, 3), rng.integers(0, 3)) if u < 0.15 else \
                    (rng.integers(0, 2), rng.integers(0, 2))
                s_seg[r, i:i + k_s] = seg
                t_seg[r, j:j + k_t] = seg
                i, j, c = i + k_s, j + k_t, c + 1
                if u >= 0.15:
                    seg += 1
            n_s, n_t = rng.integers(1, 4), rng.integers(1, 4)
            rest_s, rest_t = length - i, t_length - j
            if (i + n_s > length or j + n_t > t_length) and rest_s > 0 and rest_t > 0 \
                    and rest_s <= 3 and rest_t <= 3 and rng.random() < 0.6:
                n_s, n_t = rest_s, rest_t            # a chunk that ends both rows exactly
            if i + n_s > length or j + n_t > t_length or c >= min(length, t_length):
                break
            s_ids[r, i:i + n_s] = c
            t_ids[r, j:j + n_t] = c
            s_seg[r, i:i + n_s] = seg
            t_seg[r, j:j + n_t] = seg
            i, j, c = i + n_s, j + n_t, c + 1
        if rng.random() < 0.5:                       # the rest: unaligned text, not padding
            s_seg[r, i:] = seg
            t_seg[r, j:] = seg
    return s_ids, s_seg, t_ids, t_seg


def random_scores(rng, shape):
    """Finite log-probs and boundary log-masses (boundary probabilities on both sides of 0.1)."""
    logp = np.log(rng.uniform(0.05, 1.0, shape))
    boundary = np.log(rng.uniform(0.0, 1.0, shape) ** 2 + 1e-3)
    return logp.astype(np.float32), boundary.astype(np.float32)


def random_batch(seed, rows=2 * ROWS, length=LEN, t_length=T_LEN):
    rng = np.random.default_rng(seed)
    s_ids, s_seg, t_ids, t_seg = random_alignment(rng, rows, length, t_length)
    student = (*random_scores(rng, (rows, length)), s_ids, s_seg)
    teacher = (*random_scores(rng, (rows, t_length)), t_ids, t_seg)
    return student, teacher


def hand_batch(seed=0):
    rng = np.random.default_rng(seed)
    s_ids, s_seg, t_ids, t_seg = hand_alignment()
    student = (*random_scores(rng, s_ids.shape), s_ids, s_seg)
    teacher = (*random_scores(rng, t_ids.shape), t_ids, t_seg)
    return student, teacher


# ---------------------------------------------------------------------------------------------
# Chunk scores and groups
# ---------------------------------------------------------------------------------------------


def test_chunk_scores_hand_built():
    (s_lp, s_b, s_ids, s_seg), (t_lp, t_b, t_ids, t_seg) = hand_batch()
    s = alm.chunk_scores(s_lp, s_b, s_ids, s_seg, 10)
    t = alm.chunk_scores(t_lp, t_b, t_ids, t_seg, 10)
    l_s, b_s = np.asarray(s.loglik_BC), np.asarray(s.boundary_BC)
    l_t, b_t = np.asarray(t.loglik_BC), np.asarray(t.boundary_BC)
    # Row 0: student chunk 2 is positions 3-5, followed by position 6 (same segment).
    np.testing.assert_allclose(l_s[0, 2], s_lp[0, 3:6].sum(), rtol=1e-6)
    np.testing.assert_allclose(b_s[0, 2], s_b[0, 6], rtol=1e-6)
    assert b_s[0, 4] == 0.0 and b_t[0, 4] == 0.0          # chunk 4 ends both rows
    np.testing.assert_allclose(l_t[0, 4], t_lp[0, 5:8].sum(), rtol=1e-6)
    np.testing.assert_allclose(b_t[0, 1], t_b[0, 3], rtol=1e-6)
    # Row 1: student chunk 1 (positions 1-2) is followed by an unaligned position of its segment;
    # teacher chunk 1 (position 1) by a -1 position of the same segment; chunk 4 ends segment 2
    # on the student side inside the segment (position 7), on the teacher side before padding.
    np.testing.assert_allclose(b_s[1, 1], s_b[1, 3], rtol=1e-6)
    np.testing.assert_allclose(b_t[1, 1], t_b[1, 2], rtol=1e-6)
    np.testing.assert_allclose(b_s[1, 4], s_b[1, 7], rtol=1e-6)
    assert b_t[1, 4] == 0.0
    # Teacher chunk 3 of row 1 is at position 3 (segment 2), the segment before it ends at 2.
    np.testing.assert_allclose(b_t[1, 3], t_b[1, 4], rtol=1e-6)
    assert b_s[1, 0] != 0.0 and b_s[1, 0] == s_b[1, 1]
    np.testing.assert_array_equal(np.asarray(s.present_BC)[2, :7], [1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(t.present_BC)[2, :7], [1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(s.last_BC)[0, :5], [1, 2, 5, 7, 9])
    assert not np.asarray(s.present_BC)[3].any() and np.all(np.asarray(s.last_BC)[3] == -1)
    assert np.all(l_s[3] == 0) and np.all(b_s[3] == 0)


def test_groups_hand_built():
    (_, _, s_ids, _), (_, t_b, t_ids, t_seg) = hand_batch()
    # Teacher boundary probabilities chosen so that merging decisions are known.
    t_b = np.full(t_ids.shape, np.log(0.05), np.float32)       # below theta everywhere...
    t_b[0, 1] = np.log(0.5)                                    # ...except after row 0's chunk 0
    no_merge = alm.alm_groups(t_b, t_ids, t_seg, merge_threshold=None,
                              student_chunk_ids=s_ids)
    merged = alm.alm_groups(t_b, t_ids, t_seg, merge_threshold=0.1, student_chunk_ids=s_ids)
    # Chunks on both sides: row 0 {0..4}, row 1 {0, 1, 3, 4}, row 2 {0, 1, 3, 5, 6} (2 and 4 are
    # one-sided), row 3 {}.
    assert float(no_merge["count"]) == 5 + 4 + 5
    np.testing.assert_array_equal(np.asarray(no_merge["n_groups_B"]), [5, 4, 5, 0])
    # Merged: row 0 {0}, {1..4} (chunk 0's boundary is likely, 4 ends the row: b = 0);
    # row 1 {0, 1} (the gap at 2), {3, 4}; row 2 {0, 1} (gap), {3} (gap), {5, 6}.
    np.testing.assert_array_equal(np.asarray(merged["n_groups_B"]), [2, 2, 3, 0])
    assert float(merged["count"]) == 7
    np.testing.assert_array_equal(np.asarray(merged["group_BC"])[0, :6], [0, 1, 1, 1, 1, -1])
    np.testing.assert_array_equal(np.asarray(merged["group_BC"])[2, :8],
                                  [0, 0, -1, 1, -1, 2, 2, -1])
    # Without the student's ids, teacher presence decides: row 2's teacher-only chunk 4 closes
    # the gap, so chunks 3-6 form one group.
    teacher_only = alm.alm_groups(t_b, t_ids, t_seg, merge_threshold=0.1)
    np.testing.assert_array_equal(np.asarray(teacher_only["n_groups_B"]), [2, 2, 2, 0])
    assert float(teacher_only["count"]) == 6
    zeros_s, zeros_t = np.zeros(s_ids.shape), np.zeros(t_ids.shape)
    _, count, groups = ref_alm((zeros_s, zeros_s, s_ids, hand_alignment()[1]),
                               (zeros_t, t_b, t_ids, t_seg), append_space=True, theta=0.1,
                               distance="abs", tau=1.0)
    assert count == 7 and groups[2] == [[0, 1], [3], [5, 6]]


# ---------------------------------------------------------------------------------------------
# Golden sums
# ---------------------------------------------------------------------------------------------


def _sums(student, teacher, **kw):
    out = alm.alm_sums(*[jnp.asarray(x) for x in student], *[jnp.asarray(x) for x in teacher],
                       **kw)
    return float(out["sum"]), float(out["count"])


@pytest.mark.parametrize("tau", [100.0, 2.0])
@pytest.mark.parametrize("merge", [0.1, None])
@pytest.mark.parametrize("append_space", [True, False])
@pytest.mark.parametrize("distance", DISTANCES)
def test_sums_vs_float64(distance, append_space, merge, tau):
    batches = [hand_batch(0), random_batch(1), random_batch(2)]
    for student, teacher in batches:
        ref_sum, ref_count, _ = ref_alm(student, teacher, append_space=append_space, theta=merge,
                                        distance=distance, tau=tau)
        got_sum, got_count = _sums(student, teacher, append_space=append_space,
                                   merge_threshold=merge, distance=distance, tau=tau)
        assert ref_count > 0 and got_count == ref_count
        np.testing.assert_allclose(got_sum, ref_sum, rtol=RTOL)
        groups = alm.alm_groups(teacher[1], teacher[2], teacher[3], merge_threshold=merge,
                                student_chunk_ids=student[2])
        assert float(groups["count"]) == ref_count


def test_random_alignments_exercise_every_case():
    """The random alignments hold what the golden tests claim to cover."""
    seen = {"gap": 0, "segment_change": 0, "row_end": 0, "merged": 0, "multi_token": 0}
    for seed in (1, 2):
        student, teacher = random_batch(seed)
        _, _, groups = ref_alm(student, teacher, append_space=True, theta=0.1,
                               distance="binary_ce", tau=100.0)
        for r in range(student[2].shape[0]):
            ids = sorted(set(student[2][r][student[2][r] >= 0].tolist()))
            seen["gap"] += sum(b - a > 1 for a, b in zip(ids, ids[1:]))
            seen["segment_change"] += int(len(set(student[3][r].tolist()) - {0}) > 1)
            seen["row_end"] += int(student[2][r, -1] >= 0 or teacher[2][r, -1] >= 0)
            seen["merged"] += sum(len(g) > 1 for g in groups[r])
            seen["multi_token"] += int(np.bincount(student[2][r][student[2][r] >= 0]).max() > 1)
    assert all(v > 0 for v in seen.values()), seen


def test_loss_and_metrics():
    student, teacher = random_batch(3)
    loss, metrics = alm.alm_loss(*student, *teacher)
    ref_sum, ref_count, _ = ref_alm(student, teacher, append_space=True, theta=0.1,
                                    distance="binary_ce", tau=100.0)
    np.testing.assert_allclose(float(loss), ref_sum / ref_count, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["distill/alm"]), ref_sum / ref_count, rtol=RTOL)
    np.testing.assert_allclose(float(metrics["distill/alm_sum"]), ref_sum, rtol=RTOL)
    assert float(metrics["distill/alm_chunks"]) == ref_count
    # A global normaliser replaces the local count; jit gives the same numbers.
    loss_g, _ = alm.alm_loss(*student, *teacher, normalizer=4 * ref_count)
    np.testing.assert_allclose(float(loss_g), ref_sum / (4 * ref_count), rtol=RTOL)
    jitted = jax.jit(alm.alm_loss, static_argnames=("distance", "tau", "merge_threshold"))
    np.testing.assert_allclose(float(jitted(*student, *teacher)[0]), float(loss), rtol=1e-6)
    # An empty batch: loss 0, count 0, no nan.
    empty = [np.full_like(x, -1) if i == 2 else x for i, x in enumerate(student)]
    loss0, m0 = alm.alm_loss(*empty, *teacher)
    assert float(loss0) == 0.0 and float(m0["distill/alm_chunks"]) == 0.0


def test_split_batch_adds_up():
    """Sums and counts over two halves of the rows add up to the whole batch's."""
    student, teacher = random_batch(4)
    for merge in (0.1, None):
        kw = dict(merge_threshold=merge, distance="binary_ce", tau=100.0)
        whole = alm.alm_sums(*student, *teacher, **kw)
        halves = [alm.alm_sums(*[x[sl] for x in student], *[x[sl] for x in teacher], **kw)
                  for sl in (slice(0, ROWS), slice(ROWS, 2 * ROWS))]
        assert float(whole["count"]) == sum(float(h["count"]) for h in halves) > 0
        np.testing.assert_allclose(float(whole["sum"]), sum(float(h["sum"]) for h in halves),
                                   rtol=1e-6)
        g_whole = alm.alm_groups(teacher[1], teacher[2], teacher[3], merge_threshold=merge)
        g_halves = [alm.alm_groups(teacher[1][sl], teacher[2][sl], teacher[3][sl],
                                   merge_threshold=merge)
                    for sl in (slice(0, ROWS), slice(ROWS, 2 * ROWS))]
        assert float(g_whole["count"]) == sum(float(g["count"]) for g in g_halves) \
            == float(whole["count"])


def test_rows_sharded_over_8_devices(devices8):
    """Rows sharded over a data axis of 8 devices give the unsharded sums, with the sum's
    gradient sharded like its input rows."""
    student, teacher = random_batch(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices8)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    place = lambda xs: [jax.device_put(jnp.asarray(x), rows) for x in xs]

    @jax.jit
    def f(s_lp, *rest):
        out = alm.alm_sums(s_lp, *rest)
        return out["sum"], out["count"]

    (total, count), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(
        *place(student), *place(teacher))
    ref_sum, ref_count = _sums(student, teacher)
    assert float(count) == ref_count
    np.testing.assert_allclose(float(total), ref_sum, rtol=1e-6)
    assert grad.sharding.is_equivalent_to(rows, 2)


def test_extreme_scores_stay_finite():
    """Group scores of exactly 0 (certain chunks) and rounding-positive ones, on either side, and
    very unlikely chunks give a finite loss and finite gradients for every distance."""
    student, teacher = random_batch(5, rows=ROWS)
    s_lp, s_b = student[0].copy(), student[1].copy()
    t_lp, t_b = teacher[0].copy(), teacher[1].copy()
    s_lp[0], s_b[0] = 0.0, 0.0        # row 0: student certain of everything (scores 0)
    s_lp[1], s_b[1] = 1e-7, 0.0       # row 1: rounding-positive student log-probs
    t_lp[:2], t_b[:2] = 0.0, 0.0      # ...and a certain teacher on both rows
    s_lp[2, ::2] = -80.0              # row 2: very unlikely chunks
    t_lp[3], t_b[3] = 1e-7, 0.0       # row 3: rounding-positive teacher log-probs
    for distance in DISTANCES:
        for append_space in (True, False):
            def f(lp, b):
                return alm.alm_loss(lp, b, *student[2:], t_lp, t_b, *teacher[2:],
                                    distance=distance, tau=1.0, append_space=append_space)[0]
            val, grads = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(s_lp),
                                                               jnp.asarray(s_b))
            assert np.isfinite(float(val)), (distance, append_space)
            assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), (distance,
                                                                            append_space)


def test_bad_options_raise():
    assert alm.ALM_DISTANCES == DISTANCES
    student, teacher = random_batch(6)
    with pytest.raises(ValueError, match="binary_ce"):
        alm.alm_sums(*student, *teacher, distance="binary_cross_entropy")
    with pytest.raises(ValueError, match="tau"):
        alm.alm_sums(*student, *teacher, tau=0.0)
    with pytest.raises(ValueError, match="merge_threshold"):
        alm.alm_groups(teacher[1], teacher[2], teacher[3], merge_threshold=1.5)
    with pytest.raises(ValueError, match="num_chunks"):
        alm.alm_sums(*student, *teacher, num_chunks=3)
    with pytest.raises(ValueError, match="segment_ids"):
        alm.alm_sums(*student[:3], student[3][:, :-1], *teacher)


def test_log1mexp():
    x = np.array([-1e-7, -1e-4, -0.5, -np.log(2), -0.7, -5.0, -40.0, -100.0])
    ref = np.log1p(-np.exp(x))   # float64: accurate to ~1e-9 relative even at x = -1e-7
    # atol: fp32 cannot hold e^-100 (a subnormal); log(1 - e^x) rounds to 0 there.
    np.testing.assert_allclose(np.asarray(alm.log1mexp(jnp.asarray(x, jnp.float32))), ref,
                               rtol=2e-6, atol=1e-37)
    g = jax.grad(lambda v: jnp.sum(alm.log1mexp(v)))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), -np.exp(x) / -np.expm1(x), rtol=1e-5, atol=1e-37)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def _logit_batch(seed, rows=ROWS, length=LEN, t_length=T_LEN, vocab=3):
    rng = np.random.default_rng(seed)
    s_ids, s_seg, t_ids, t_seg = random_alignment(rng, rows, length, t_length)
    z_s = rng.normal(size=(rows, length, vocab)) * 2.0
    z_t = rng.normal(size=(rows, t_length, vocab)) * 2.0
    tg_s = rng.integers(0, vocab, (rows, length))
    tg_t = rng.integers(0, vocab, (rows, t_length))
    ws = np.zeros(vocab, bool)
    ws[[0, 2]] = True
    return z_s, tg_s, s_ids, s_seg, z_t, tg_t, t_ids, t_seg, ws


def _jax_stats(z, targets, ws):
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, jax.nn.logsumexp(jnp.where(ws, logp_all, -jnp.inf), axis=-1)


def test_gradient_vs_finite_differences():
    """jax.grad of the fp32 loss w.r.t. the student's logits (through log_softmax) against
    central differences of the float64 reference, for every distance."""
    z_s, tg_s, s_ids, s_seg, z_t, tg_t, t_ids, t_seg, ws = _logit_batch(7)
    teacher = (*ref_token_stats(z_t, tg_t, ws), t_ids, t_seg)
    t32 = [jnp.asarray(x, jnp.float32) for x in teacher[:2]]

    @jax.jit
    def grads(z):   # one compilation for all three distances
        def loss(z_, distance):
            logp, bnd = _jax_stats(z_, jnp.asarray(tg_s), jnp.asarray(ws))
            return alm.alm_loss(logp, bnd, s_ids, s_seg, *t32, t_ids, t_seg, distance=distance,
                                tau=2.0, merge_threshold=0.1)[0]
        return [jax.grad(loss)(z, d) for d in DISTANCES]

    got = grads(jnp.asarray(z_s, jnp.float32))
    for distance, g in zip(DISTANCES, got):
        def ref_loss(z):
            total, count, _ = ref_alm((*ref_token_stats(z, tg_s, ws), s_ids, s_seg), teacher,
                                      append_space=True, theta=0.1, distance=distance, tau=2.0)
            return total / count

        fd = np.zeros_like(z_s)
        h = 1e-6
        for idx in np.ndindex(z_s.shape):
            zp, zm = z_s.copy(), z_s.copy()
            zp[idx] += h
            zm[idx] -= h
            fd[idx] = (ref_loss(zp) - ref_loss(zm)) / (2 * h)
        assert np.abs(fd).max() > 1e-3
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max(),
                                   err_msg=distance)


def test_no_gradient_reaches_the_teacher():
    z_s, tg_s, s_ids, s_seg, z_t, tg_t, t_ids, t_seg, ws = _logit_batch(8)
    s = [jnp.asarray(x, jnp.float32) for x in ref_token_stats(z_s, tg_s, ws)]
    g = jax.grad(lambda lp, b: alm.alm_loss(*s, s_ids, s_seg, lp, b, t_ids, t_seg)[0],
                 argnums=(0, 1))(*[jnp.asarray(x, jnp.float32)
                                   for x in ref_token_stats(z_t, tg_t, ws)])
    assert all(np.all(np.asarray(x) == 0) for x in g)


def test_identical_tokenizers_minimum_at_teacher():
    """One token per chunk, same ids on both sides, no debias, no merging: the gradient with
    respect to the student's logits vanishes where they equal the teacher's, and only there."""
    rng = np.random.default_rng(9)
    rows, length, vocab = ROWS, LEN, 7
    z_t = jnp.asarray(rng.normal(size=(rows, length, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, length)))
    ids = np.tile(np.arange(length), (rows, 1))
    seg = np.ones((rows, length), np.int32)
    ws = jnp.asarray(rng.random(vocab) < 0.5)
    teacher = _jax_stats(z_t, targets, ws)

    def loss(z_s):
        return alm.alm_loss(*_jax_stats(z_s, targets, ws), ids, seg, *teacher, ids, seg,
                            append_space=False, merge_threshold=None, tau=100.0)[0]

    at_teacher, g = jax.value_and_grad(loss)(z_t)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
    for scale in (0.1, 1.0):
        z_p = z_t + scale * jnp.asarray(rng.normal(size=z_t.shape), jnp.float32)
        val, g_p = jax.value_and_grad(loss)(z_p)
        assert float(val) > float(at_teacher)
        assert np.abs(np.asarray(g_p)).max() > 1e-5


# ---------------------------------------------------------------------------------------------
# Token statistics
# ---------------------------------------------------------------------------------------------


def _stats_data(seed=10, rows=2, length=7, dim=4, vocab=11):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(rows, length, dim))
    head = rng.normal(size=(dim, vocab))
    targets = rng.integers(0, vocab, (rows, length))
    ws = rng.random(vocab) < 0.4
    ws[0] = True
    return h, head, targets, ws


def _ref_stats_and_grads(h, head, targets, ws, softcap, w_logp, w_bnd):
    """float64 values and analytic gradients of sum(w_logp * logp + w_bnd * boundary)."""
    raw = h @ head
    z = np.tanh(raw / softcap) * softcap if softcap else raw
    logp, bnd = ref_token_stats(z, targets, ws)
    p = np.exp(z - _lse(z)[..., None])
    onehot = np.eye(head.shape[1])[targets]
    p_ws = np.where(ws, p, 0.0)
    d_logp = onehot - p
    d_bnd = p_ws / p_ws.sum(-1, keepdims=True) - p
    dz = w_logp[..., None] * d_logp + w_bnd[..., None] * d_bnd
    if softcap:
        dz = dz * (1 - np.tanh(raw / softcap) ** 2)
    dh = dz @ head.T
    dhead = np.einsum("bld,blv->dv", h, dz)
    return logp, bnd, dh, dhead


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_stats_vs_float64(softcap):
    h, head, targets, ws = _stats_data()
    rng = np.random.default_rng(11)
    w_logp, w_bnd = rng.normal(size=targets.shape), rng.normal(size=targets.shape)
    logp_r, bnd_r, dh_r, dhead_r = _ref_stats_and_grads(h, head, targets, ws, softcap, w_logp,
                                                        w_bnd)
    h32, head32 = jnp.asarray(h, jnp.float32), jnp.asarray(head, jnp.float32)

    def f(h_, head_, chunk_size):
        logp, bnd = alm.token_stats(h_, head_, jnp.asarray(targets), jnp.asarray(ws),
                                    softcap=softcap, chunk_size=chunk_size)
        return jnp.sum(w_logp * logp + w_bnd * bnd), (logp, bnd)

    # 3 does not divide the 14 tokens: several scan steps, the last one padded, under remat.
    (_, (logp, bnd)), (dh, dhead) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        h32, head32, 3)
    assert logp.shape == targets.shape and logp.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), logp_r, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bnd), bnd_r, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), dh_r, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dhead), dhead_r, rtol=1e-4, atol=1e-5)
    # Independent of the chunk size: one token per step, and all 14 at once (512 is clipped).
    for chunk_size in (1, 512):
        _, (logp_c, bnd_c) = f(h32, head32, chunk_size)
        np.testing.assert_allclose(np.asarray(logp_c), np.asarray(logp), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(bnd_c), np.asarray(bnd), rtol=1e-6, atol=1e-7)


def test_token_stats_no_word_starts():
    h, head, targets, _ = _stats_data(12)
    ws = np.zeros(head.shape[1], bool)
    head32 = jnp.asarray(head, jnp.float32)

    def f(h_):
        logp, bnd = alm.token_stats(h_, head32, targets, ws, chunk_size=5)
        return jnp.sum(logp) + jnp.sum(jnp.where(jnp.isneginf(bnd), 0.0, bnd)), (logp, bnd)

    g, (logp, bnd) = jax.grad(f, has_aux=True)(jnp.asarray(h, jnp.float32))
    assert np.all(np.isneginf(np.asarray(bnd))) and np.all(np.isfinite(np.asarray(logp)))
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0
    with pytest.raises(ValueError, match="word_start"):
        alm.token_stats(jnp.asarray(h), jnp.asarray(head), targets, ws[:-1])


def test_token_stats_to_loss_end_to_end():
    """token_stats from hidden states feeding alm_loss equals the float64 pipeline."""
    rng = np.random.default_rng(13)
    rows, length, t_length, dim, vocab = ROWS, LEN, T_LEN, 4, 13
    s_ids, s_seg, t_ids, t_seg = random_alignment(rng, rows, length, t_length)
    h_s, h_t = rng.normal(size=(rows, length, dim)), rng.normal(size=(rows, t_length, dim))
    head_s, head_t = rng.normal(size=(dim, vocab)), rng.normal(size=(dim, vocab))
    tg_s, tg_t = rng.integers(0, vocab, (rows, length)), rng.integers(0, vocab, (rows, t_length))
    ws = rng.random(vocab) < 0.5
    ref_sum, ref_count, _ = ref_alm((*ref_token_stats(h_s @ head_s, tg_s, ws), s_ids, s_seg),
                                    (*ref_token_stats(h_t @ head_t, tg_t, ws), t_ids, t_seg),
                                    append_space=True, theta=0.1, distance="binary_ce",
                                    tau=100.0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    s = alm.token_stats(f32(h_s), f32(head_s), tg_s, ws, chunk_size=4)
    t = alm.token_stats(f32(h_t), f32(head_t), tg_t, ws, chunk_size=4)
    loss, metrics = alm.alm_loss(*s, s_ids, s_seg, *t, t_ids, t_seg)
    assert float(metrics["distill/alm_chunks"]) == ref_count > 0
    np.testing.assert_allclose(float(loss), ref_sum / ref_count, rtol=RTOL)
