"""Cross-tokenizer baselines: chunk pairing on hand-built ids, ULD and MinED against float64 numpy
references written from the formulas, their invariances, and the MinED vocabulary mapping on
hand-made vocabularies (against a plain-Python edit distance), hand-built SentencePiece and
byte-level tokenizers, and real tokenizer pairs."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import assets
from distill_jax.losses import kd
from distill_jax.losses import xtok_baselines as X
from distill_jax.tokenizer import bytes_to_unicode, load_tokenizer

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------
# float64 / plain-Python references
# ---------------------------------------------------------------------------------------------


def _softmax64(z, temperature=1.0):
    z = np.asarray(z, np.float64) / temperature
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _ref_uld(zs, zt, w, temperature=1.0, top_k=None):
    """Sum over pairs with w > 0 of w * L1(sorted p_S, sorted p_T), zero-padded; and the count."""
    total, count = 0.0, 0.0
    for idx in np.ndindex(w.shape):
        if w[idx] <= 0:
            continue
        ps = np.sort(_softmax64(zs[idx], temperature))[::-1]
        pt = np.sort(_softmax64(zt[idx], temperature))[::-1]
        if top_k is not None:
            ps, pt = ps[:top_k], pt[:top_k]
        size = max(len(ps), len(pt), top_k or 0)
        ps = np.concatenate([ps, np.zeros(size - len(ps))])
        pt = np.concatenate([pt, np.zeros(size - len(pt))])
        total += w[idx] * np.abs(ps - pt).sum()
        count += w[idx]
    return total, count


def _ref_mined(zs, zt, mapping, w, temperature=1.0):
    """Sum over pairs of w * T^2 * KL(p_T projected || p_S); p_T projected = softmax over the
    student vocabulary of the teacher logit each student id maps to (none for -1)."""
    total, count = 0.0, 0.0
    for idx in np.ndindex(w.shape):
        if w[idx] <= 0:
            continue
        live = mapping >= 0
        proj = np.zeros(len(mapping))
        proj[live] = np.asarray(zt[idx], np.float64)[mapping[live]] / temperature
        proj[live] = np.exp(proj[live] - proj[live].max())
        proj /= proj.sum()
        ps = _softmax64(zs[idx], temperature)
        kl = sum(p * (np.log(p) - np.log(q)) for p, q in zip(proj, ps) if p > 0)
        total += w[idx] * temperature ** 2 * kl
        count += w[idx]
    return total, count


def _lev(a: bytes, b: bytes) -> int:
    """Textbook Levenshtein distance (unit costs), one cell at a time."""
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def _ref_nearest(queries, cands):
    """Brute force: exact match first, else min distance, ties to the lowest index."""
    out = []
    for q in queries:
        if q is None:
            out.append(-1)
            continue
        scored = [(_lev(q, c), i) for i, c in enumerate(cands) if c is not None]
        out.append(min(scored)[1] if scored else -1)
    return out


def _lev_to_all_np(q: bytes, cands: list[bytes]) -> np.ndarray:
    """Distances from q to every candidate: one full-width numpy row per byte of q, read at each
    candidate's own length (padding after a string does not change the cells before it)."""
    n_max = max(map(len, cands))
    mat = np.full((len(cands), n_max), -1, np.int64)
    for r, c in enumerate(cands):
        mat[r, :len(c)] = list(c)
    row = np.tile(np.arange(n_max + 1), (len(cands), 1))
    for i, byte in enumerate(q, start=1):
        new = np.empty_like(row)
        new[:, 0] = i
        for j in range(1, n_max + 1):
            new[:, j] = np.minimum(np.minimum(row[:, j] + 1, new[:, j - 1] + 1),
                                   row[:, j - 1] + (mat[:, j - 1] != byte))
        row = new
    return row[np.arange(len(cands)), [len(c) for c in cands]]


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------


def test_first_positions_hand_built():
    ids = jnp.array([[0, 0, 1, 2, 2, -1],
                     [-1, 3, 1, 1, 3, 0]])
    pos, valid = X.first_positions(ids, 4)
    np.testing.assert_array_equal(pos, [[0, 2, 3, 0], [5, 2, 0, 1]])
    np.testing.assert_array_equal(valid, [[True, True, True, False], [True, True, False, True]])
    pos, valid = X.first_positions(ids, 2)  # ids outside [0, 2) are ignored
    np.testing.assert_array_equal(pos, [[0, 2], [5, 2]])
    assert bool(valid.all())


def test_aligned_pairs_hand_built():
    student = jnp.array([[0, 0, 1, 2, 2, -1],
                         [-1, 0, 1, 1, 3, 3]])
    teacher = jnp.array([[-1, 0, 1, 1, 1, 2, -1, -1],
                         [0, 0, 0, 1, 2, 2, -1, -1]])   # row 1: 2 teacher-only, 3 student-only
    s_pos, t_pos, mask = jax.jit(X.aligned_pairs)(student, teacher)
    assert s_pos.shape == t_pos.shape == mask.shape == (2, 6)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(s_pos, [[0, 2, 3, 0, 0, 0], [1, 2, 0, 0, 0, 0]])
    np.testing.assert_array_equal(t_pos, [[1, 2, 5, 0, 0, 0], [0, 3, 0, 0, 0, 0]])
    # the pairs read the positions whose targets start each chunk
    x = jnp.arange(2 * 8 * 3).reshape(2, 8, 3)
    np.testing.assert_array_equal(X.take_positions(x, t_pos)[1, 1], x[1, 3])
    np.testing.assert_array_equal(X.take_positions(x, t_pos)[0, 2], x[0, 5])


def test_aligned_pairs_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same batch"):
        X.aligned_pairs(jnp.zeros((2, 4), jnp.int32), jnp.zeros((3, 4), jnp.int32))


# ---------------------------------------------------------------------------------------------
# ULD
# ---------------------------------------------------------------------------------------------


def _pairs(seed, v, w_vocab, shape=(3, 4), scale=2.0):
    rng = np.random.default_rng(seed)
    zs = (scale * rng.standard_normal(shape + (v,))).astype(np.float32)
    zt = (scale * rng.standard_normal(shape + (w_vocab,))).astype(np.float32)
    w = rng.uniform(0.2, 1.5, shape).astype(np.float32)
    w[0, 1] = 0.0
    w[2, 3] = -1.0            # weights <= 0 are masked
    return zs, zt, w


@pytest.mark.parametrize("v,w_vocab,temperature", [(37, 53, 1.0), (61, 19, 2.0), (24, 24, 0.7)])
def test_uld_matches_numpy(v, w_vocab, temperature):
    zs, zt, w = _pairs(0, v, w_vocab)
    out = jax.jit(functools.partial(X.uld_sums, temperature=temperature))(zs, zt, w)
    ref_sum, ref_count = _ref_uld(zs, zt, w, temperature)
    np.testing.assert_allclose(out["sum"], ref_sum, rtol=2e-6)
    np.testing.assert_allclose(out["count"], ref_count, rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 7, 30, 80])
def test_uld_top_k_matches_numpy_truncation(top_k):
    zs, zt, w = _pairs(1, 37, 53)
    out = X.uld_sums(zs, zt, w, top_k=top_k)
    ref_sum, _ = _ref_uld(zs, zt, w, top_k=top_k)
    np.testing.assert_allclose(out["sum"], ref_sum, rtol=2e-6)
    exact = X.uld_sums(zs, zt, w)["sum"]
    if top_k >= 53:                         # covers both vocabularies: the exact distance
        np.testing.assert_allclose(out["sum"], exact, rtol=1e-6)
    else:
        assert float(out["sum"]) < float(exact)


def test_uld_zero_for_permuted_distributions():
    rng = np.random.default_rng(2)
    zs = rng.standard_normal((4, 5, 31)).astype(np.float32)
    perm = rng.permutation(31)
    zt = zs[..., perm]
    out = X.uld_sums(zs, zt, np.ones((4, 5), bool))
    assert float(out["count"]) == 20.0
    # 0 up to fp32 rounding: the two softmaxes sum their terms in different orders
    assert abs(float(out["sum"])) / 20 < 1e-6
    # a larger teacher vocabulary whose extra tokens have no mass: zero padding makes it equal
    zt_wide = np.concatenate([zt, np.full((4, 5, 9), -np.inf, np.float32)], axis=-1)
    assert abs(float(X.uld_sums(zs, zt_wide, np.ones((4, 5)))["sum"])) / 20 < 1e-6
    # and a different distribution is not at distance 0
    assert float(X.uld_sums(zs, zt[..., ::-1] * 2.0, np.ones((4, 5)))["sum"]) > 0.1


def test_uld_masking_and_gradients():
    zs, zt, w = _pairs(3, 20, 26)
    zs_nan, zt_nan = zs.copy(), zt.copy()
    zs_nan[0, 1] = np.nan                    # masked pairs hold garbage
    zt_nan[2, 3] = np.inf
    loss = lambda a, b: X.uld_sums(a, b, w)["sum"]
    np.testing.assert_allclose(loss(zs_nan, zt_nan), loss(zs, zt), rtol=1e-6)
    g_s, g_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(zs_nan, zt_nan)
    assert bool(jnp.all(jnp.isfinite(g_s))) and bool(jnp.all(g_s[0, 1] == 0))
    assert float(jnp.abs(g_s).sum()) > 0
    assert bool(jnp.all(g_t == 0))           # the teacher is under stop_gradient


# ---------------------------------------------------------------------------------------------
# MinED loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_mined_sums_match_numpy(temperature):
    zs, zt, w = _pairs(4, 29, 41)
    rng = np.random.default_rng(5)
    mapping = rng.integers(0, 41, 29).astype(np.int32)   # several ids share a teacher id
    mapping[[3, 17]] = -1                                 # no counterpart
    out = jax.jit(functools.partial(X.mined_sums, temperature=temperature))(zs, zt, mapping, w)
    ref_sum, ref_count = _ref_mined(zs, zt, mapping, w, temperature)
    np.testing.assert_allclose(out["sum"], ref_sum, rtol=3e-6)
    np.testing.assert_allclose(out["count"], ref_count, rtol=1e-6)


def test_mined_zero_when_student_is_projected_teacher():
    _, zt, w = _pairs(6, 29, 41)
    rng = np.random.default_rng(7)
    mapping = rng.integers(0, 41, 29).astype(np.int32)
    assert float(X.mined_sums(X.project_teacher_logits(zt, mapping) + 3.0, zt, mapping,
                              w)["sum"]) == pytest.approx(0.0, abs=1e-5)
    mapping[[2, 9]] = -1
    zs = X.project_teacher_logits(zt, mapping)            # -inf where unmapped
    assert float(X.mined_sums(zs, zt, mapping, w, temperature=2.0)["sum"]) \
        == pytest.approx(0.0, abs=1e-5)
    # a student that differs is penalised
    assert float(X.mined_sums(zs.at[..., 0].add(1.0), zt, mapping, w)["sum"]) > 1e-3


def test_mined_identity_mapping_is_forward_kl():
    zs, zt, w = _pairs(8, 33, 33)
    out = X.mined_sums(zs, zt, np.arange(33, dtype=np.int32), w, temperature=1.3)
    _, metrics = kd.forward_kl(zs, zt, w, temperature=1.3)
    np.testing.assert_allclose(out["sum"], metrics[kd.sum_key(kd.FORWARD_KL)], rtol=1e-6)
    np.testing.assert_allclose(out["count"], metrics[kd.TOKENS])


def test_mined_masking_and_gradients():
    zs, zt, w = _pairs(10, 29, 41)
    mapping = np.random.default_rng(11).integers(-1, 41, 29).astype(np.int32)
    zs_nan, zt_nan = zs.copy(), zt.copy()
    zs_nan[0, 1] = np.nan
    zt_nan[2, 3] = -np.inf
    loss = lambda a, b: X.mined_sums(a, b, mapping, w)["sum"]
    np.testing.assert_allclose(loss(zs_nan, zt_nan), loss(zs, zt), rtol=1e-6)
    g_s, g_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(zs_nan, zt_nan)
    assert bool(jnp.all(jnp.isfinite(g_s))) and bool(jnp.all(g_s[0, 1] == 0))
    assert float(jnp.abs(g_s).sum()) > 0
    assert bool(jnp.all(g_t == 0))


def _ref_mined_bucket(zs, zt, mapping, w, temperature=1.0):
    """float64: per pair, KL over (each matched student id's teacher/student probability, and
    one bucket with each side's remaining mass), times T^2, weighted."""
    total, count = 0.0, 0.0
    live = mapping >= 0
    for idx in np.ndindex(w.shape):
        if w[idx] <= 0:
            continue
        pt, ps = _softmax64(zt[idx], temperature), _softmax64(zs[idx], temperature)
        p = np.append(pt[mapping[live]], 1.0 - pt[mapping[live]].sum())
        q = np.append(ps[live], 1.0 - ps[live].sum())
        kl = sum(a * (np.log(a) - np.log(b)) for a, b in zip(p, q) if a > 0)
        total += w[idx] * temperature ** 2 * kl
        count += w[idx]
    return total, count


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_mined_exact_bucket_matches_numpy(temperature):
    zs, zt, w = _pairs(12, 29, 41)
    rng = np.random.default_rng(13)
    mapping = np.full(29, -1, np.int32)
    ids = rng.choice(29, 18, replace=False)
    mapping[ids] = rng.choice(41, 18, replace=False)        # injective, 11 unmatched ids
    fn = jax.jit(functools.partial(X.mined_sums, temperature=temperature, bucket=True))
    out = fn(zs, zt, mapping, w)
    ref_sum, ref_count = _ref_mined_bucket(zs, zt, mapping, w, temperature)
    np.testing.assert_allclose(out["sum"], ref_sum, rtol=3e-6)
    np.testing.assert_allclose(out["count"], ref_count, rtol=1e-6)
    # Gradients: finite, zero at masked pairs, and equal to float64 finite differences.
    g = jax.grad(lambda a: fn(a, zt, mapping, w)["sum"])(zs)
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(g[0, 1] == 0))
    eps = 1e-3
    for idx in [(1, 2, 0), (2, 0, int(ids[0])), (1, 1, int(np.flatnonzero(mapping < 0)[0]))]:
        a, b = zs.astype(np.float64).copy(), zs.astype(np.float64).copy()
        a[idx] += eps
        b[idx] -= eps
        fd = (_ref_mined_bucket(a, zt, mapping, w, temperature)[0]
              - _ref_mined_bucket(b, zt, mapping, w, temperature)[0]) / (2 * eps)
        assert float(g[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-5)


def test_mined_exact_bucket_is_forward_kl_for_the_identity_map():
    zs, zt, w = _pairs(14, 33, 33)
    out = X.mined_sums(zs, zt, np.arange(33, dtype=np.int32), w, temperature=1.3, bucket=True)
    _, metrics = kd.forward_kl(zs, zt, w, temperature=1.3)
    np.testing.assert_allclose(out["sum"], metrics[kd.sum_key(kd.FORWARD_KL)], rtol=1e-5)


def test_mined_mapping_exact_keeps_only_same_bytes_and_is_injective():
    sp, bl = _tiny_tokenizers()
    mapping = X.mined_mapping(sp, bl, student_vocab_size=13, exact=True)
    # as the nearest map, but "s", "▁dogs" and "▁" (no same-bytes teacher token) map to -1
    assert mapping.tolist() == [-1, 1, 0, 3, 4, 2, 5, -1, -1, -1, 8, -1, -1]
    live = mapping[mapping >= 0]
    assert len(set(live.tolist())) == len(live)


def test_mined_checks_the_mapping():
    zs, zt, w = _pairs(9, 10, 12)
    with pytest.raises(ValueError, match="student_vocab_size=10"):
        X.mined_sums(zs, zt, np.zeros(11, np.int32), w)
    with pytest.raises(ValueError, match="must lie in"):
        X.mined_sums(zs, zt, np.full(10, 12, np.int32), w)


# ---------------------------------------------------------------------------------------------
# MinED mapping
# ---------------------------------------------------------------------------------------------


def test_nearest_tokens_hand_made():
    teacher = [b"the", b" the", None, b"cat", b"cats", b"at", b"the", b"dog"]
    student = [b" the", b"the", b"cat", b"hat", b"bat", b"catz", b"dgo", None, b"zzzzzzzz", b""]
    got = X.nearest_tokens(student, teacher).tolist()
    assert got[:3] == [1, 0, 3]          # exact matches (b"the" twice: the lowest id)
    assert got[3] == 3                   # "hat": "cat" and "at" at distance 1, lowest id
    assert got[4] == 3                   # "bat": "cat" and "at" at 1, lowest id
    assert got[5] == 3                   # "catz": "cat" and "cats" at 1
    assert got[6] == 7                   # "dgo": "dog" at 2
    assert got[7] == -1                  # no token
    assert got[8] == 0                   # shares no byte: distance 8 to all, lowest id
    assert got[9] == 5                   # empty: the shortest token, "at"
    assert got == _ref_nearest(student, teacher)
    assert X.nearest_tokens([b"a"], [None, None]).tolist() == [-1]


@pytest.mark.parametrize("seed", range(6))
def test_nearest_tokens_random_against_brute_force(seed):
    rng = random.Random(seed)
    alphabet = [b"ab", b"abcd", b"abcdefghij", bytes(range(256))][seed % 4]
    make = lambda: bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 11)))
    teacher = [make() for _ in range(rng.randint(20, 120))]
    student = [make() for _ in range(80)]
    assert X.nearest_tokens(student, teacher).tolist() == _ref_nearest(student, teacher)
    # every search stage alone gives the same answer (radius 0: the bounded scan only)
    queries = [q for q in student if q not in set(teacher)]
    for radius in (0, 1, 2):
        got = X._nearest_by_edit_distance(queries, teacher, radius=radius).tolist()
        assert got == _ref_nearest(queries, teacher), radius


def _tiny_tokenizers():
    """A SentencePiece-style tokenizer (``▁`` spaces, <0xNN> byte fallback) and a byte-level
    one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x41>": 3, "<0x0A>": 4, "▁the": 5, "▁cat": 6,
                "s": 7, "▁dogs": 8, "▁": 9, "hat": 10}
    sp = Tokenizer(models.BPE(vocab=sp_vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")
    table = bytes_to_unicode()
    sym = lambda s: "".join(table[b] for b in s.encode())
    bl_vocab = {"<|end|>": 0, "<s>": 1, sym(" the"): 2, sym("A"): 3, sym("\n"): 4,
                sym(" cat"): 5, sym("cats"): 6, sym(" dog"): 7, sym("hat"): 8, sym("at"): 9}
    bl = Tokenizer(models.BPE(vocab=bl_vocab, merges=[]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bl.decoder = decoders.ByteLevel()
    bl = PreTrainedTokenizerFast(tokenizer_object=bl, bos_token="<s>", eos_token="<|end|>")
    return sp, bl


def test_mined_mapping_normalises_sentencepiece_and_byte_level():
    sp, bl = _tiny_tokenizers()
    sp_bytes, sp_special = X.token_byte_strings(sp)
    assert sp_bytes[3] == b"A" and sp_bytes[4] == b"\n" and sp_bytes[5] == b" the"
    assert sp_special == {0, 1, 2}
    bl_bytes, bl_special = X.token_byte_strings(bl)
    assert bl_bytes[2] == b" the" and bl_bytes[4] == b"\n" and bl_special == {0, 1}
    mapping = X.mined_mapping(sp, bl, student_vocab_size=13)
    assert mapping.dtype == np.int32 and mapping.shape == (13,)
    assert mapping.tolist() == [
        -1,   # <unk>: no teacher special with that content or role
        1,    # <s>: the same content
        0,    # </s>: no "</s>", but both are eos
        3,    # <0x41> is the byte "A"
        4,    # <0x0A> is "\n"
        2,    # ▁the = " the"
        5,    # ▁cat = " cat"
        3,    # "s": one substitution from "A" and from "\n", the lowest id
        7,    # ▁dogs: " dog" at distance 1
        3,    # ▁ = " ": one substitution from "A" and from "\n", the lowest id
        8,    # hat
        -1, -1,                                        # padded logits: no token
    ]
    regular = [None if i in sp_special else b for i, b in enumerate(sp_bytes)]
    teacher = [None if i in bl_special else b for i, b in enumerate(bl_bytes)]
    assert mapping[:11].tolist()[3:] == _ref_nearest(regular, teacher)[3:]
    with pytest.raises(ValueError, match="student_vocab_size"):
        X.mined_mapping(sp, bl, student_vocab_size=5)


def test_mined_mapping_smollm2_to_bytes():
    student = load_tokenizer(assets.smollm2_hf_dir())
    teacher = load_tokenizer("bytes")
    mapping = X.mined_mapping(student, teacher)
    s_bytes, s_special = X.token_byte_strings(student)
    assert mapping.shape == (len(s_bytes),) == (49152,)
    singles = multi = 0
    for i, b in enumerate(s_bytes):
        if i in s_special:
            continue
        if len(b) == 1:          # every single-byte token maps to the same byte (id = byte + 3)
            assert mapping[i] == b[0] + 3, (i, b)
            singles += 1
        else:                    # distance len - 1 to each of its bytes: ties to the lowest id
            assert mapping[i] == min(b) + 3, (i, b)
            multi += 1
    assert singles > 200 and multi > 48000
    assert mapping[student.bos_token_id] == teacher.bos_token_id
    assert mapping[student.eos_token_id] == teacher.eos_token_id


@pytest.mark.slow
def test_mined_mapping_mistral_to_smollm2(tmp_path):
    """A 32k SentencePiece vocabulary against SmolLM2's 49k byte-level one: exact matches map
    exactly and a sample of the rest matches a brute-force numpy search."""
    import shutil

    from transformers import AutoTokenizer

    model = assets.fetch_package("mistral-common") / "mistral_common/data/tokenizer.model.v1"
    shutil.copy(model, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
        '"unk_token": "<unk>"}')
    student = AutoTokenizer.from_pretrained(tmp_path)
    teacher = load_tokenizer(assets.smollm2_hf_dir())
    mapping = X.mined_mapping(student, teacher)
    s_bytes, s_special = X.token_byte_strings(student)
    t_bytes, t_special = X.token_byte_strings(teacher)
    assert mapping.shape == (32000,) and (mapping[3:] >= 0).all()
    cands = [b for i, b in enumerate(t_bytes) if i not in t_special]
    cand_ids = np.array([i for i in range(len(t_bytes)) if i not in t_special])
    first = {}
    for i, b in zip(cand_ids, cands):
        first.setdefault(b, i)
    inexact = [i for i, b in enumerate(s_bytes) if i not in s_special and b not in first]
    for i, b in enumerate(s_bytes):
        if i not in s_special and b in first:
            assert mapping[i] == first[b]
    for i in random.Random(0).sample(inexact, 12):
        d = _lev_to_all_np(s_bytes[i], cands)
        assert mapping[i] == cand_ids[np.argmin(d)], (s_bytes[i], t_bytes[mapping[i]])
