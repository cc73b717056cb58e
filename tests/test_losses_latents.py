"""alm_latents: chunk-end positions and the hidden-state matching sum, against float64 numpy
references written from the definitions (loops), plus its zero at teacher == student."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import terms, xtok

jax.config.update("jax_enable_x64", False)


def _ref_ends(chunk_ids, segment_ids):
    """{(row, chunk): position after the chunk's last target} for valid chunk ends."""
    out = {}
    B, L = chunk_ids.shape
    for b in range(B):
        last = {}
        for i in range(L):
            if chunk_ids[b, i] >= 0:
                last[int(chunk_ids[b, i])] = i
        for c, p in last.items():
            if p + 1 < L and segment_ids[b, p] > 0 and segment_ids[b, p + 1] == segment_ids[b, p]:
                out[(b, c)] = p + 1
    return out


def _random_ids(rng, B, L, max_len=4, skip=0.2):
    """Row-local chunk ids in order with gaps (-1 runs) and two segments per row."""
    ids = np.full((B, L), -1, np.int32)
    seg = np.zeros((B, L), np.int32)
    for b in range(B):
        cut = rng.integers(L // 3, L)
        seg[b, :cut] = 1
        seg[b, cut:rng.integers(cut, L + 1)] = 2
        i, c = 0, 0
        while i < L:
            n = int(rng.integers(1, max_len + 1))
            if rng.random() < skip:
                i += n  # a skipped span
            else:
                ids[b, i:i + n] = c
                i += n
            c += int(rng.integers(1, 3))  # a gap in ids: a skipped chunk
        ids[b, seg[b] == 0] = -1
    return ids, seg


@pytest.mark.parametrize("seed", range(5))
def test_chunk_ends_match_reference(seed):
    rng = np.random.default_rng(seed)
    ids, seg = _random_ids(rng, 3, 40)
    pos, valid = xtok.chunk_ends(jnp.asarray(ids), jnp.asarray(seg), 40)
    pos, valid = np.asarray(pos), np.asarray(valid)
    ref = _ref_ends(ids, seg)
    got = {(b, c): int(pos[b, c]) for b in range(3) for c in range(40) if valid[b, c]}
    assert got == ref
    assert (pos[~valid] == 0).all()


def _ref_latents(hs, ht, sids, sseg, tids, tseg, kernel=None, bias=None):
    s_end, t_end = _ref_ends(sids, sseg), _ref_ends(tids, tseg)
    total, scale, pairs = 0.0, 0.0, 0
    for (b, c), p in s_end.items():
        if (b, c) not in t_end:
            continue
        x = hs[b, p].astype(np.float64)
        if kernel is not None:
            x = x @ kernel.astype(np.float64) + bias.astype(np.float64)
        y = ht[b, t_end[(b, c)]].astype(np.float64)
        total += float(np.sum((x - y) ** 2))
        scale += float(np.sum(y ** 2))
        pairs += 1
    return total, scale, pairs


@pytest.mark.parametrize("widths", [(8, 8), (6, 10)])
@pytest.mark.parametrize("seed", range(3))
def test_latents_sum_and_normaliser_match_reference(widths, seed):
    ds, dt = widths
    rng = np.random.default_rng(100 + seed)
    B, L, Lt = 2, 32, 24
    sids, sseg = _random_ids(rng, B, L, max_len=3)
    tids = np.full((B, Lt), -1, np.int32)
    tseg = np.zeros((B, Lt), np.int32)
    for b in range(B):  # the teacher covers the same chunks with fewer, longer tokens
        chunks = [c for c in np.unique(sids[b]) if c >= 0]
        i = 0
        for c in chunks:
            n = int(rng.integers(1, 3))
            if i + n > Lt:
                break
            tids[b, i:i + n] = c
            s = sseg[b][sids[b] == c][0]
            tseg[b, i:i + n] = s
            i += n
    hs = rng.normal(size=(B, L, ds)).astype(np.float32)
    ht = rng.normal(size=(B, Lt, dt)).astype(np.float32)
    proj = None
    if ds != dt:
        proj = {"kernel": rng.normal(size=(ds, dt)).astype(np.float32) / np.sqrt(ds),
                "bias": rng.normal(size=(dt,)).astype(np.float32)}
    batch = {"chunk_ids": jnp.asarray(sids), "segment_ids": jnp.asarray(sseg),
             "teacher_chunk_ids": jnp.asarray(tids), "teacher_segment_ids": jnp.asarray(tseg)}
    got = float(xtok.latents_sums(jnp.asarray(hs), jnp.asarray(ht), batch, proj))
    spec = xtok.XtokSpec(terms={"alm_latents": 1.0})
    norms = terms.counts(spec, {**batch, "loss_mask": jnp.ones((B, L)),
                                "teacher_hidden": jnp.asarray(ht)})
    ref_total, ref_scale, ref_pairs = _ref_latents(
        hs, ht, sids, sseg, tids, tseg, *((proj["kernel"], proj["bias"]) if proj else ()))
    assert ref_pairs > 0
    np.testing.assert_allclose(got, ref_total, rtol=1e-5)
    np.testing.assert_allclose(float(norms[xtok.LATENT_SCALE]), ref_scale, rtol=1e-5)
    assert int(norms[xtok.LATENT_PAIRS]) == ref_pairs
    sums = {"distill/alm_latents_sum": jnp.asarray(got)}
    np.testing.assert_allclose(float(terms.objective(spec, sums, norms)), ref_total / ref_scale,
                               rtol=1e-5)


def test_latents_zero_iff_equal_and_gradient_vanishes():
    """With the same positions on both sides, the loss is 0 exactly at h_student == h_teacher,
    where its gradient vanishes, and positive elsewhere."""
    rng = np.random.default_rng(7)
    B, L, D = 2, 16, 8
    ids = np.tile(np.arange(L, dtype=np.int32), (B, 1))
    ids[:, -1] = -1
    seg = np.ones((B, L), np.int32)
    batch = {"chunk_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg),
             "teacher_chunk_ids": jnp.asarray(ids), "teacher_segment_ids": jnp.asarray(seg)}
    ht = jnp.asarray(rng.normal(size=(B, L, D)).astype(np.float32))
    f = lambda h: xtok.latents_sums(h, ht, batch)  # noqa: E731
    assert float(f(ht)) == 0.0
    assert float(jnp.max(jnp.abs(jax.grad(f)(ht)))) == 0.0
    assert float(f(ht + 1e-2)) > 0.0


def test_width_mismatch_without_projector_is_refused():
    spec = xtok.XtokSpec(terms={"alm_latents": 1.0})
    assert spec.uses_projector(8, 16) and not spec.uses_projector(8, 8)
    assert xtok.XtokSpec(terms={"alm_latents": 1.0}, latents_projector=True).uses_projector(8, 8)
    with pytest.raises(ValueError, match="needs a projector"):
        xtok.XtokSpec(terms={"alm_latents": 1.0}, latents_projector=False).uses_projector(8, 16)
    batch = {k: jnp.zeros((1, 4), jnp.int32) for k in
             ("chunk_ids", "segment_ids", "teacher_chunk_ids", "teacher_segment_ids")}
    with pytest.raises(ValueError, match="needs a projector"):
        xtok.latents_sums(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 16)), batch)


def test_projector_init_keeps_scale():
    p = xtok.init_projector(jax.random.key(0), 256, 128)
    assert p["kernel"].shape == (256, 128) and p["bias"].shape == (128,)
    x = jax.random.normal(jax.random.key(1), (512, 256))
    ratio = float(jnp.mean(jnp.square(x @ p["kernel"])) / jnp.mean(jnp.square(x)))
    assert 0.8 < ratio < 1.25
