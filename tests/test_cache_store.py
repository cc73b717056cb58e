"""Teacher cache store: encodings, exactly-once resumable writing, multi-process parts, reader checks, verify."""

from __future__ import annotations

import json
import os
import threading

import ml_dtypes
import numpy as np
import pytest
from scipy.special import logsumexp, ndtri

from distill_jax.cache import CacheError, CacheMismatchError, CacheReader, CacheSpec, CacheWriter, Manifest, verify
from distill_jax.cache.store import _REC, JOURNAL_NAME, _pack_records, _read_journal, decode_rows, encode_rows

TEACHER = {"name": "test-teacher", "config_hash": "c0ffee", "weights_hash": "beef"}


def distinct_ids(rng, T, k, V, ids="uniform"):
    """(T, k) ids, distinct within each row: "uniform" (worst case: every id equally likely) or
    "zipf" (p(id) ~ 1/(id + 10), like a real teacher whose top-k favour frequent tokens, which BPE
    vocabularies give low ids)."""
    def draw(n):
        if ids == "uniform":
            return rng.integers(0, V, size=n)
        return np.clip((np.exp(rng.random(n) * np.log(V + 10.0)) - 10).astype(np.int64), 0, V - 1)

    out = np.empty((T, k), np.int64)
    for t in range(T):
        row = np.zeros(0, np.int64)
        while len(row) < k:  # first k distinct draws, in draw order
            cand = np.concatenate([row, draw(2 * k)])
            _, first = np.unique(cand, return_index=True)
            row = cand[np.sort(first)][:k]
        out[t] = row
    return out


def realistic_rows(rng, T, k, V, sigma=2.5, ids="uniform"):
    """Top-k (sorted descending) of log-softmax over V iid N(0, sigma^2) logits, via order
    statistics, with distinct ids drawn as :func:`distinct_ids`."""
    e = rng.exponential(size=(T, k)) / (V - np.arange(k))
    logits = sigma * ndtri(np.exp(-np.cumsum(e, axis=1)))  # the k largest of V normals, descending
    logz = np.logaddexp(logsumexp(logits, axis=1), np.log(V - k) + sigma**2 / 2) if V > k else logsumexp(logits, axis=1)
    lps = (logits - logz[:, None]).astype(np.float32)
    tid = distinct_ids(rng, T, k, V, ids)
    with np.errstate(divide="ignore"):
        tail = np.log1p(-np.minimum(np.exp(logsumexp(lps, axis=1)), 1.0)).astype(np.float32)
    return {"topk_ids": tid, "topk_logprobs": lps,
            "actual_logprob": lps[np.arange(T), rng.integers(0, k, T)],
            "tail_logmass": tail,
            "boundary_logmass": np.log(rng.uniform(0.05, 0.9, T)).astype(np.float32)}


def make_docs(seed, n, k, V, max_len=40, **kw):
    rng = np.random.default_rng(seed)
    return [realistic_rows(rng, int(rng.integers(0, max_len)), k, V, **kw) for _ in range(n)]


def manifest(spec, **kw):
    return Manifest(spec, teacher=TEACHER, tokenizer_hash=kw.get("tok", "tokhash"),
                    dataset_fingerprint=kw.get("fp", "datafp"))


def write_all(path, spec, docs, process_index=0, process_count=1, **kw):
    with CacheWriter(str(path), manifest(spec), num_docs=len(docs), process_index=process_index,
                     process_count=process_count, **kw) as w:
        for d in w.pending_doc_ids():
            w.write_document(d, docs[d])
        w.finalize()


def assert_same_cache(a, b):
    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    assert ra.num_docs == rb.num_docs and ra.complete and rb.complete
    for d in range(ra.num_docs):
        x, y = ra.read_document(d), rb.read_document(d)
        assert x.keys() == y.keys()
        for f in x:
            np.testing.assert_array_equal(x[f], y[f], err_msg=f"doc {d} field {f}")


SMALL = dict(chunk_rows=16, shard_rows=64)  # several shards/chunks with few tokens


def by_id(doc):
    """A document's top-k sorted by id (the order the cache stores and returns)."""
    order = np.argsort(doc["topk_ids"], axis=1, kind="stable")
    return np.take_along_axis(doc["topk_ids"], order, 1), np.take_along_axis(doc["topk_logprobs"], order, 1)


def bucket_kl(exact_lps, tail, decoded_lps):
    """Mean over rows of KL(exact || decoded) of the k + 1 outcomes (top-k + tail), float64."""
    e = np.concatenate([exact_lps, tail[:, None]], 1).astype(np.float64)
    d = np.concatenate([decoded_lps, tail[:, None]], 1).astype(np.float64)
    e, d = e - logsumexp(e, 1, keepdims=True), d - logsumexp(d, 1, keepdims=True)
    return float(np.sum(np.where(np.isneginf(e), 0.0, np.exp(e) * (e - d)), 1).mean())


@pytest.mark.parametrize("V,enc", [(49_152, "bf16"), (151_936, "q8"), (262_144, "f32"), (2**31, "q8")])
def test_round_trip(tmp_path, V, enc):
    spec = CacheSpec(k=8, vocab_size=V, logprob_encoding=enc, **SMALL)
    docs = make_docs(0, 12, 8, V)
    for doc in docs:  # include extreme ids, and gaps >= 2**16 / 2**24 between sorted ids
        if len(doc["topk_ids"]):
            doc["topk_ids"][0] = [0, V - 1, 1, 2, V - 2, V // 3, V // 2, V // 2 + 1]
    docs[3]["topk_logprobs"] = docs[3]["topk_logprobs"][:, ::-1].copy()  # any order in
    docs[3]["topk_ids"] = docs[3]["topk_ids"][:, ::-1].copy()
    write_all(tmp_path, spec, docs)
    r = CacheReader(str(tmp_path))
    assert r.manifest.spec == spec and r.complete
    for d, doc in enumerate(docs):
        got = r.read_document(d)
        ids, lps = by_id(doc)
        assert got["topk_ids"].dtype == np.int32 and got["topk_logprobs"].dtype == np.float32
        np.testing.assert_array_equal(got["topk_ids"], ids)  # ids exact, ascending
        if enc == "f32":
            np.testing.assert_array_equal(got["topk_logprobs"], lps)
        elif enc == "bf16":
            np.testing.assert_array_equal(got["topk_logprobs"], lps.astype(ml_dtypes.bfloat16).astype(np.float32))
            np.testing.assert_allclose(got["topk_logprobs"], lps, rtol=2**-8, atol=0)
        else:
            assert np.all(np.abs(got["topk_logprobs"] - lps) <= q8_max_error(spec, lps, got["topk_logprobs"]))
        for f in ("actual_logprob", "tail_logmass", "boundary_logmass"):
            np.testing.assert_array_equal(got[f], doc[f])
    rep = verify(str(tmp_path))
    assert rep.ok, rep.errors
    assert rep.documents == 12 and rep.tokens == sum(len(d["topk_ids"]) for d in docs)


def q8_max_error(spec, exact, decoded):
    """|decoded - exact| allowed by q8: half the step s(x) = min(s0 exp(x/2), 1 nat) at the far
    end of the step (at most 0.5 nats beyond the larger of the two x = -logprob), with s0 from
    the spec's KL bound (1.1 k s0^2 / 24)."""
    s0 = np.sqrt(24 * spec.q8_kl_bound / (1.1 * spec.k))
    x = np.maximum(-np.minimum(exact, decoded).astype(np.float64), 0) + 0.5
    return 0.5 * np.minimum(s0 * np.exp(x / 2), 1.0) + 1e-5


def test_q8_error_kl_and_full_vocab(tmp_path):
    """q8: per-entry error within half a step, mean KL of the decoded top-k + tail distribution
    below the spec's bound (and below 1e-3 nats), at several k and shapes of distribution."""
    V = 151_936
    for k, sigma in ((16, 2.5), (128, 2.5), (128, 6.0)):
        spec = CacheSpec(k=k, vocab_size=V, logprob_encoding="q8", **SMALL)
        assert spec.q8_kl_bound == pytest.approx(5e-4)
        doc = realistic_rows(np.random.default_rng(k), 400, k, V, sigma=sigma)
        doc["topk_logprobs"][:3, -1] = doc["topk_logprobs"][:3, 0] - 300.0  # below the last level
        dec = decode_rows(spec, encode_rows(spec, doc))
        ids, lps = by_id(doc)
        np.testing.assert_array_equal(dec["topk_ids"], ids)
        far = lps < -250.0
        assert far.any()
        assert np.all((np.abs(dec["topk_logprobs"] - lps) <= q8_max_error(spec, lps, dec["topk_logprobs"]))[~far])
        assert np.all(dec["topk_logprobs"][far] >= lps[far]) and np.all(dec["topk_logprobs"][far] <= -30.0)
        kl = bucket_kl(lps, doc["tail_logmass"], dec["topk_logprobs"])
        assert 0 < kl <= spec.q8_kl_bound <= 1e-3, (k, sigma, kl)
    # k = V: tail mass is -inf (allowed), top-k log-probs may be -inf too
    for enc in ("q8", "bf16"):
        spec = CacheSpec(k=6, vocab_size=6, logprob_encoding=enc, **SMALL)
        with np.errstate(divide="ignore"):
            lp = np.log(np.array([[0.5, 0.3, 0.2, 0.0, 0.0, 0.0]], np.float32).repeat(3, 0))
        doc = {"topk_ids": np.tile([5, 0, 3, 1, 2, 4], (3, 1)), "topk_logprobs": lp, "actual_logprob": lp[:, 0],
               "tail_logmass": np.full(3, -np.inf, np.float32), "boundary_logmass": np.zeros(3, np.float32)}
        write_all(tmp_path / f"full-{enc}", spec, [doc])
        got = CacheReader(str(tmp_path / f"full-{enc}")).read_document(0)
        np.testing.assert_array_equal(got["topk_ids"], np.tile(np.arange(6), (3, 1)))
        want = lp[:, [1, 3, 4, 2, 5, 0]]  # ids 0..5 in order
        assert (np.isneginf(got["topk_logprobs"]) == np.isneginf(want)).all()
        fin = np.isfinite(want)
        assert np.all(np.abs(got["topk_logprobs"][fin] - want[fin]) <= 2**-8 * np.abs(want[fin]) + 0.02)
        assert np.isneginf(got["tail_logmass"]).all()
        assert verify(str(tmp_path / f"full-{enc}")).ok


def test_encode_rejects_repeated_ids_and_old_format(tmp_path):
    spec = CacheSpec(k=4, vocab_size=100, **SMALL)
    doc = make_docs(7, 1, 4, 100, max_len=5)[0]
    while not len(doc["topk_ids"]):
        doc = make_docs(8, 1, 4, 100, max_len=5)[0]
    doc["topk_ids"][-1, :2] = 17
    with pytest.raises(ValueError, match="repeat an id in row"):
        encode_rows(spec, doc)
    write_all(tmp_path, spec, make_docs(9, 3, 4, 100))
    mpath = tmp_path / "manifest.json"
    old = json.loads(mpath.read_text())
    old["format_version"] = 1
    mpath.write_text(json.dumps(old))
    for open_it in (lambda: CacheReader(str(tmp_path)),
                    lambda: CacheWriter(str(tmp_path), manifest(spec), num_docs=3)):
        with pytest.raises(CacheError, match=r"format_version 1.*rebuild the cache"):
            open_it()
    rep = verify(str(tmp_path))
    assert not rep.ok and "format_version 1" in rep.errors[0]


def test_read_tokens_gathers_packed_batch(tmp_path):
    spec = CacheSpec(k=4, vocab_size=262_144, **SMALL)
    docs = make_docs(2, 9, 4, 262_144, max_len=30)
    for i in range(2):
        write_all(tmp_path, spec, docs, process_index=i, process_count=2)
    r = CacheReader(str(tmp_path))
    rng = np.random.default_rng(0)
    B, L = 3, 50
    doc_ids, offs = np.full((B, L), -1), np.zeros((B, L), np.int64)
    for b in range(B):  # pack random document pieces, then padding
        pos = 0
        while pos < L - 5:
            d = int(rng.integers(0, 9))
            n = len(docs[d]["topk_ids"])
            if n == 0:
                continue
            s = int(rng.integers(0, n))
            m = min(n - s, L - 5 - pos)
            doc_ids[b, pos:pos + m], offs[b, pos:pos + m] = d, np.arange(s, s + m)
            pos += m
    got = r.read_tokens(doc_ids, offs)
    assert got["topk_ids"].shape == (B, L, 4) and got["actual_logprob"].shape == (B, L)
    np.testing.assert_array_equal(got["valid"], doc_ids >= 0)
    for b in range(B):
        for t in range(L):
            if doc_ids[b, t] < 0:
                assert (got["topk_ids"][b, t] == 0).all() and got["tail_logmass"][b, t] == 0
                continue
            ref = r.read_document(int(doc_ids[b, t]))
            for f in ref:
                np.testing.assert_array_equal(got[f][b, t], ref[f][offs[b, t]])
    with pytest.raises(IndexError, match="outside document"):
        r.read_tokens(np.array([1]), np.array([1000]))


def test_resume_after_kill_is_exactly_once(tmp_path):
    spec = CacheSpec(k=8, vocab_size=151_936, **SMALL)
    docs = make_docs(3, 30, 8, 151_936)
    write_all(tmp_path / "ref", spec, docs)
    path = str(tmp_path / "resumed")
    # run 1: commits some documents, then "dies" with documents still buffered
    w = CacheWriter(path, manifest(spec), num_docs=30, flush_tokens=50)
    for d in range(30):
        w.write_document(d, docs[d])
        if w._done and w._buf and d >= 8:
            break
    committed = sorted(w._done)
    assert 0 < len(committed) < 30 and w._buf
    del w  # killed: no flush, no finalize
    # run 2: the data of a flush reaches disk but the process dies before the journal commit,
    # and a torn half record is left at the journal's end
    w = CacheWriter(path, manifest(spec), num_docs=30, flush_tokens=10**9)
    assert sorted(w._done) == committed and not w.write_document(committed[0], docs[committed[0]])
    for d in w.pending_doc_ids()[:6]:
        w.write_document(d, docs[d])
    w._journal_path = os.path.join(path, "not-the-journal")  # the rows are written, the commit is lost
    w.flush()
    del w
    jpath = os.path.join(path, "part-00000-of-00001", JOURNAL_NAME)
    with open(jpath, "ab") as f:
        f.write(_pack_records([29], [123], [4], [0])[:17])
    assert not CacheReader(path).complete
    assert "torn journal tail" in " ".join(verify(path).errors)
    # run 3: finishes; every document exactly once, identical to an uninterrupted write
    w = CacheWriter(path, manifest(spec), num_docs=30, flush_tokens=40)
    assert sorted(w._done) == committed
    for d in w.pending_doc_ids():
        assert w.write_document(d, docs[d])
    w.finalize()
    rep = verify(path)
    assert rep.ok, rep.errors
    assert rep.documents == 30 and rep.tokens == verify(str(tmp_path / "ref")).tokens
    recs, _, _ = _read_journal(jpath)
    assert sorted(recs[:, 0].tolist()) == list(range(30))
    assert_same_cache(tmp_path / "ref", path)


def test_two_processes_equal_single_writer(tmp_path):
    spec = CacheSpec(k=8, vocab_size=49_152, logprob_encoding="q8", **SMALL)
    docs = make_docs(4, 25, 8, 49_152)
    write_all(tmp_path / "one", spec, docs)
    threads = [threading.Thread(target=write_all, args=(tmp_path / "two", spec, docs, i, 2)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep = verify(str(tmp_path / "two"))
    assert rep.ok, rep.errors
    assert sorted(os.listdir(tmp_path / "two")) == ["manifest.json", "part-00000-of-00002", "part-00001-of-00002"]
    assert_same_cache(tmp_path / "one", tmp_path / "two")
    w = CacheWriter(str(tmp_path / "two"), manifest(spec), num_docs=25, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="does not belong"):
        w.write_document(4, docs[4])
    with pytest.raises(CacheMismatchError, match="different manifest"):
        CacheWriter(str(tmp_path / "two"), manifest(spec), num_docs=25, process_index=0, process_count=3)


def test_reader_refuses_mismatch(tmp_path):
    spec = CacheSpec(k=8, vocab_size=49_152, **SMALL)
    docs = make_docs(5, 4, 8, 49_152)
    write_all(tmp_path, spec, docs)
    r = CacheReader(str(tmp_path))
    r.check(expected_tokenizer_hash="tokhash", expected_dataset_fingerprint="datafp", k=8)
    with pytest.raises(CacheMismatchError, match=r"tokenizer hash tokhash .* hashes to other.*rebuild the cache"):
        r.check(expected_tokenizer_hash="other")
    with pytest.raises(CacheMismatchError, match=r"dataset fingerprint datafp .* fingerprint fp2"):
        r.check(expected_dataset_fingerprint="fp2")
    with pytest.raises(CacheMismatchError, match=r"k=8 but the run asks for k=16"):
        r.check(k=16)
    with pytest.raises(CacheMismatchError, match="different manifest"):
        CacheWriter(str(tmp_path), manifest(spec, tok="other"), num_docs=4)
    with pytest.raises(CacheError, match="no teacher cache"):
        CacheReader(str(tmp_path / "nope"))


def test_verify_detects_corrupt_offsets_and_missing_doc(tmp_path):
    spec = CacheSpec(k=4, vocab_size=49_152, **SMALL)
    docs = make_docs(6, 10, 4, 49_152, max_len=20)
    write_all(tmp_path, spec, docs)
    jpath = os.path.join(tmp_path, "part-00000-of-00001", JOURNAL_NAME)
    good = open(jpath, "rb").read()
    recs, _, _ = _read_journal(jpath)
    assert verify(str(tmp_path)).ok
    # a shifted start (valid CRC): offsets no longer contiguous
    bad = recs.copy()
    bad[4, 1] += 3
    open(jpath, "wb").write(_pack_records(*bad.T))
    rep = verify(str(tmp_path))
    assert not rep.ok and any("not contiguous" in e for e in rep.errors), rep.errors
    # a flipped byte in a middle record: CRC mismatch
    raw = bytearray(good)
    raw[_REC.size * 3 + 9] ^= 0xFF
    open(jpath, "wb").write(bytes(raw))
    rep = verify(str(tmp_path))
    assert not rep.ok and any("corrupt" in e for e in rep.errors), rep.errors
    with pytest.raises(CacheError, match="corrupt"):
        CacheReader(str(tmp_path))
    # a missing document
    keep = recs[recs[:, 0] != 7]
    open(jpath, "wb").write(_pack_records(*keep.T))
    rep = verify(str(tmp_path))
    assert not rep.ok and any("1 of 10 documents missing (first: [7])" in e for e in rep.errors), rep.errors
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(str(tmp_path)).check()
    open(jpath, "wb").write(good)
    assert verify(str(tmp_path)).ok


def test_bytes_per_token(tmp_path, capsys):
    """Measured on-disk size (all files) per token, 4096 tokens per configuration, and the KL
    the q8 encoding costs."""
    rows = []
    for ids in ("uniform", "zipf"):
        for V in (49_152, 151_936):
            rng = np.random.default_rng(0)
            full = [realistic_rows(rng, 1024, 128, V, ids=ids) for _ in range(4)]
            for k in (16, 64, 128):
                docs = [dict(d, topk_ids=d["topk_ids"][:, :k], topk_logprobs=d["topk_logprobs"][:, :k],
                             tail_logmass=np.log1p(-np.exp(logsumexp(d["topk_logprobs"][:, :k], 1))))
                        for d in full]  # the top-k of the top-128
                for enc in ("bf16", "q8"):
                    spec = CacheSpec(k=k, vocab_size=V, logprob_encoding=enc)
                    path = str(tmp_path / f"{ids}-{V}-{k}-{enc}")
                    write_all(path, spec, docs)
                    rep = verify(path, check_values=False)
                    assert rep.ok and rep.tokens == 4096
                    assert rep.bytes_per_token < spec.raw_bytes_per_token()
                    r = CacheReader(path)
                    dec = np.concatenate([r.read_document(i)["topk_logprobs"] for i in range(4)])
                    exact = np.concatenate([by_id(d)[1] for d in docs])
                    kl = bucket_kl(exact, np.concatenate([d["tail_logmass"] for d in docs]), dec)
                    rows.append((ids, V, k, enc, rep.bytes_per_token, spec.raw_bytes_per_token(), kl))
    with capsys.disabled():
        print("\nids      vocab    k  enc   bytes/token  raw    KL(exact||decoded)")
        for r in rows:
            print(f"{r[0]:8s} {r[1]:6d} {r[2]:4d}  {r[3]:4s}  {r[4]:10.1f}  {r[5]:5.1f}  {r[6]:.1e}")
    got = {r[:4]: r[4:] for r in rows}
    # The target: <= 256 bytes/token at k=128, V=151,936 with a realistic (frequency-skewed) id
    # distribution, the decoded top-k + tail within 1e-3 nats of KL (mean over tokens).
    size, _, kl = got[("zipf", 151_936, 128, "q8")]
    assert size <= 256 and kl <= 1e-3
    for key, (size, _, kl) in got.items():
        if key[3] == "q8":
            assert size < got[key[:3] + ("bf16",)][0]  # q8 is the smaller encoding
            assert kl <= CacheSpec(k=key[2], vocab_size=key[1]).q8_kl_bound
        else:
            assert kl < 3e-5  # bf16: rounding to 8 significant bits
