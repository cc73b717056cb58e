"""Building the teacher cache from a run config (distill_jax.cache.build) and the `cache` CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import data as D
from distill_jax.cache import CacheMismatchError, CacheReader, verify
from distill_jax.train.assemble import build_run_cache
from distill_jax.cache.build import (cache_data_config, dataset_fingerprint, pack_windows,
                                     teacher_token_stats, word_start_mask)
from distill_jax.config import load_run_config
from distill_jax.tokenizer import byte_tokenizer, tokenizer_fingerprint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TRAIN = str(ROOT / "configs" / "data" / "math_train.jsonl")
TEST = str(ROOT / "configs" / "data" / "math_test.jsonl")


def _cfg(cache_dir, *extra):
    return load_run_config(TINY, [f"teacher.cache={cache_dir}", f"data.sources=[{{path: {TRAIN}}}]",
                                  *extra])


def test_word_start_mask_byte_tokenizer():
    tok = byte_tokenizer()
    m = word_start_mask(tok, 259)
    assert m.shape == (259,)
    assert m[:3].all()  # <pad> <bos> <eos>
    assert m[3 + ord(" ")] and m[3 + ord("\n")] and m[3 + ord("\t")]
    assert not m[3 + ord("a")] and not m[3 + ord(".")]
    assert m.sum() == 3 + 6


def test_teacher_token_stats_match_float64_reference():
    """Top-k, tail, actual and boundary log-mass against float64 numpy, with ties at the k-th
    largest logit (tied entries not taken belong to the tail), at T = 2, and k = V."""
    rng = np.random.default_rng(0)
    C, V, k, T = 6, 50, 5, 2.0
    z = rng.normal(0, 3, (C, V)).astype(np.float32)
    z[0, [3, 9, 20, 21, 40]] = 9.0  # row 0: the 4th..7th largest tie
    z[0, [7, 8]] = [11.0, 12.0]
    z[0, 41] = 10.0
    wmask = rng.random(V) < 0.3
    targets = rng.integers(0, V, C)
    ids, lps, actual, tail, bound = (np.asarray(x) for x in jax.jit(
        lambda z, t: teacher_token_stats(z, t, k, jnp.asarray(wmask), T))(z, targets))
    ref = z.astype(np.float64) / T
    ref -= np.log(np.exp(ref - ref.max(1, keepdims=True)).sum(1, keepdims=True)) + ref.max(1, keepdims=True)
    for c in range(C):
        order = np.lexsort((np.arange(V), -z[c]))  # descending, ties to the lower id
        np.testing.assert_array_equal(ids[c], order[:k])
        np.testing.assert_allclose(lps[c], ref[c, order[:k]], atol=1e-5, rtol=0)
        rest = np.setdiff1d(np.arange(V), ids[c])
        np.testing.assert_allclose(tail[c], np.log(np.exp(ref[c, rest]).sum()), atol=1e-5, rtol=0)
        np.testing.assert_allclose(actual[c], ref[c, targets[c]], atol=1e-5, rtol=0)
        np.testing.assert_allclose(bound[c], np.log(np.exp(ref[c, wmask]).sum()), atol=1e-5, rtol=0)
    assert ids[0].tolist() == [8, 7, 41, 3, 9]  # 20, 21, 40 tie with 3 and 9 but go to the tail
    _, _, _, tail_full, _ = teacher_token_stats(jnp.asarray(z), jnp.asarray(targets), V, jnp.asarray(wmask))
    assert np.isneginf(np.asarray(tail_full)).all()


def _doc_tokens(cfg):
    """Every document's token ids, as the data pipeline tokenizes them (doc_id order)."""
    ds = D.make_dataset(cache_data_config(cfg.data, cfg.cache), byte_tokenizer())
    return [np.asarray(doc.ids) for g in range(len(ds.docs)) for doc in ds.docs[g]]


def test_build_k_full_vocab_matches_live_teacher(tmp_path):
    """k = V (every log-prob of every token): the cache equals the live teacher run on each
    document's fixed windows [0, W), [W, 2W), ... on its own, with documents longer than W."""
    from distill_jax import models, sharding
    from distill_jax.train import build

    W = 96
    cfg = _cfg(tmp_path / "c", "data.max_records=24", "cache.k=259", "cache.batch_size=4",
               f"data.seq_len={W}", "cache.logprob_encoding=f32", "mesh.num_devices=1")
    build_run_cache(cfg, spec_overrides={"chunk_rows": 256, "shard_rows": 1024})
    assert verify(str(tmp_path / "c")).ok
    r = CacheReader(str(tmp_path / "c"))
    r.check(expected_tokenizer_hash=tokenizer_fingerprint(byte_tokenizer()),
            expected_dataset_fingerprint=dataset_fingerprint(cfg.data), k=259, vocab_size=259)
    assert r.manifest.num_docs == 24 and r.manifest.window == W
    docs = _doc_tokens(cfg)
    assert [len(d) for d in docs] == r.doc_length.tolist() and max(map(len, docs)) > 3 * W
    # The reference: every window alone, one row each (padding after it is never attended to).
    windows = [(d, s) for d, ids in enumerate(docs) for s in range(0, len(ids), W)]
    toks = np.zeros((len(windows), W), np.int32)
    for i, (d, s) in enumerate(windows):
        toks[i, :len(docs[d][s:s + W])] = docs[d][s:s + W]
    mesh = sharding.make_mesh(-1, 1, 1, jax.devices())
    teacher = build.load_model(cfg.teacher, mesh, sharding.DEFAULT_RULES)
    pos = np.tile(np.arange(W, dtype=np.int32), (len(windows), 1))
    lp = np.asarray(jax.jit(lambda p, t: jax.nn.log_softmax(models.forward(
        models.Model(teacher.config, p), t, positions=pos, segment_ids=jnp.ones_like(t)), -1))(teacher.params, toks),
        np.float64)
    wmask = word_start_mask(byte_tokenizer(), 259)
    checked = 0
    for i, (d, s) in enumerate(windows):
        ids = docs[d]
        n = len(ids[s:s + W])
        got = r.read_tokens(np.full(n, d), np.arange(s, s + n))
        ref = lp[i, :n]
        assert (got["topk_ids"] == np.arange(259)).all()  # k = V, in id order
        np.testing.assert_allclose(got["topk_logprobs"], ref, atol=2e-5, rtol=0)
        nxt = np.arange(s + 1, s + n + 1)
        has_next = nxt < len(ids)  # the window's last token predicts the next window's first
        np.testing.assert_allclose(got["actual_logprob"][has_next],
                                   ref[np.arange(n)[has_next], ids[nxt[has_next]]], atol=2e-5, rtol=0)
        assert (got["actual_logprob"][~has_next] == 0).all()
        assert np.isneginf(got["tail_logmass"]).all()
        np.testing.assert_allclose(got["boundary_logmass"], np.log(np.exp(ref)[:, wmask].sum(-1)), atol=2e-5)
        checked += n
    assert checked == int(r.doc_length.sum()) > 1000


def test_pack_windows_cuts_documents_at_fixed_windows():
    """Windows [0, W), [W, 2W), ... of each document, each a segment with positions from 0 and
    the document's next tokens as targets, packed first-fit in order."""
    W, rows = 5, 2
    docs = [(0, np.arange(100, 112)), (1, np.arange(200, 203)), (2, np.arange(300, 302)),
            (3, np.arange(400, 406))]
    batches = list(pack_windows(iter(docs), rows, W))
    pieces = {}
    for b in batches:
        assert b.tokens.shape == (rows, W)
        for doc, length, start, r, c, n in b.placements:
            ids = dict(docs)[doc]
            assert length == len(ids) and start % W == 0 and n == min(W, len(ids) - start)
            np.testing.assert_array_equal(b.tokens[r, c:c + n], ids[start:start + n])
            np.testing.assert_array_equal(b.positions[r, c:c + n], np.arange(n))
            np.testing.assert_array_equal(b.targets[r, c:c + n], np.append(ids, 0)[start + 1:start + n + 1])
            seg = b.segment_ids[r, c:c + n]
            assert (seg == seg[0]).all() and seg[0] > 0
            assert (b.segment_ids[r] == seg[0]).sum() == n  # a segment of its own
            pieces.setdefault(doc, []).append(start)
        occupied = b.segment_ids > 0
        assert (b.tokens[~occupied] == 0).all()
    assert pieces == {0: [0, 5, 10], 1: [0], 2: [0], 3: [0, 5]}
    # first fit, in stream order: doc 0's tail (2 tokens) shares a row with docs 1 (3 tokens)...
    assert [[p[:3] for p in b.placements] for b in batches] == [
        [(0, 12, 0), (0, 12, 5)], [(0, 12, 10), (1, 3, 0), (2, 2, 0)], [(3, 6, 0), (3, 6, 5)]]


def _all_docs_equal(a, b, atol=0.0):
    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    assert ra.num_docs == rb.num_docs and (ra.doc_length == rb.doc_length).all()
    for d in range(ra.num_docs):
        da, db = ra.read_document(d), rb.read_document(d)
        for key in da:
            np.testing.assert_allclose(da[key], db[key], atol=atol, rtol=0, err_msg=f"doc {d} {key}")


def test_cache_independent_of_batch_size(tmp_path):
    """Documents longer than the window are cut at fixed windows, so caches built with 2 and 3
    rows per batch (different packings) hold the same values."""
    over = ["data.max_records=20", "cache.k=8", "data.seq_len=64", "cache.logprob_encoding=f32"]
    build_run_cache(_cfg(tmp_path / "b2", *over, "cache.batch_size=2"))
    build_run_cache(_cfg(tmp_path / "b3", *over, "cache.batch_size=3"))
    for c in ("b2", "b3"):
        assert verify(str(tmp_path / c)).ok
    r = CacheReader(str(tmp_path / "b2"))
    assert r.manifest.window == 64 and (r.doc_length > 3 * 64).any()
    _all_docs_equal(tmp_path / "b2", tmp_path / "b3", atol=1e-5)


def test_cross_tokenizer_cache_holds_the_teachers_tokens(tmp_path):
    """A cross-tokenizer run's cache is keyed by the teacher's tokens: its tokenizer's hash, one
    row per teacher token, windows of data.teacher_seq_len; the pipeline's teacher rows index it."""
    from distill_jax.tokenizer import load_tokenizer

    teacher_tok = load_tokenizer("smollm2")
    cfg = _cfg(tmp_path / "c", "data.max_records=6", "cache.k=4", "teacher.tokenizer=smollm2",
               "teacher.overrides={vocab_size: 49152, num_layers: 1, hidden_size: 32, intermediate_size: 64, "
               "num_heads: 2, num_kv_heads: 1}", "loss.terms={alm: 1.0, sft: 0.1}", "data.teacher_seq_len=48",
               "mesh.num_devices=1")
    build_run_cache(cfg)
    r = CacheReader(str(tmp_path / "c"))
    r.check(expected_tokenizer_hash=tokenizer_fingerprint(teacher_tok), require_complete=True)
    assert r.manifest.window == 48
    ds = D.make_dataset(cache_data_config(cfg.data, cfg.cache), byte_tokenizer(), teacher_tokenizer=teacher_tok)
    docs = [doc for g in range(len(ds.docs)) for doc in ds.docs[g]]
    assert r.doc_length.tolist() == [len(doc.teacher) for doc in docs] != [len(doc.student) for doc in docs]
    assert r.doc_length.max() > 48
    data_cfg = dataclasses.replace(cache_data_config(cfg.data, cfg.cache), batch_size=2)
    seen = 0
    for batch in D.make_iterator(data_cfg, byte_tokenizer(), teacher_tokenizer=teacher_tok):
        rows = r.read_tokens(batch["teacher_doc_ids"], batch["teacher_doc_offsets"])
        np.testing.assert_array_equal(rows["valid"], batch["teacher_doc_ids"] >= 0)
        seen += int(rows["valid"].sum())
    assert seen == int(r.doc_length.sum())


def _cli(*args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTILL_JAX_CACHE_COMMIT_S": "0"}
    return subprocess.Popen([sys.executable, "-m", "distill_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    """`cache` runs SIGKILLed after 5, 60 and 150 committed documents, then run again, equal an
    uninterrupted run bit for bit (every stored array), and say that they resumed."""
    from distill_jax.cache.store import _REC

    over = ["data.max_records=200", "cache.k=8", "cache.batch_size=2", "cache.logprob_encoding=f32",
            "data.seq_len=512", f"data.sources=[{{path: {TRAIN}}}]"]
    clean = tmp_path / "clean"
    p = _cli("cache", TINY, f"teacher.cache={clean}", *over)
    out, err = p.communicate()
    assert p.returncode == 0, err[-2000:]
    assert "200 documents" in out and "fresh build" in out
    for kill_after in (5, 60, 150):
        killed = tmp_path / f"killed{kill_after}"
        p = _cli("cache", TINY, f"teacher.cache={killed}", *over)
        journal = killed / "part-00000-of-00001" / "journal.bin"
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if journal.exists() and journal.stat().st_size >= _REC.size * kill_after:
                break
            time.sleep(0.005)
        assert p.poll() is None, "the build finished before it could be killed; give it more data"
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (killed / "part-00000-of-00001" / "DONE.json").exists()
        partial = verify(str(killed))
        assert not partial.ok and kill_after <= partial.documents < 200
        p = _cli("cache", TINY, f"teacher.cache={killed}", *over)
        out, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
        assert f"resumed: {partial.documents} documents were already there" in out, out
        rep = _cli("cache", "verify", str(killed))
        stdout, _ = rep.communicate()
        assert rep.returncode == 0, stdout
        assert "200 documents (0 missing)" in stdout and "ok" in stdout
        a, b = CacheReader(str(clean)), CacheReader(str(killed))
        np.testing.assert_array_equal(a.doc_length, b.doc_length)
        np.testing.assert_array_equal(a.doc_crc, b.doc_crc)  # checksums of every document's stored bytes
        _all_docs_equal(clean, killed, atol=0.0)


def test_cli_verify_and_corruption(tmp_path):
    c = tmp_path / "c"
    build_run_cache(_cfg(c, "data.max_records=10", "cache.k=4"))
    p = _cli("cache", "verify", str(c))
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "10 documents" in out and "k=4" in out and "bytes/token" in out and ": ok" in out
    jpath = c / "part-00000-of-00001" / "journal.bin"
    data = bytearray(jpath.read_bytes())
    data[40] ^= 0xFF  # corrupt the second record (followed by more records)
    jpath.write_bytes(bytes(data))
    p = _cli("cache", "verify", str(c))
    out, _ = p.communicate()
    assert p.returncode != 0 and "error" in out


def test_fingerprint_mismatch_refused(tmp_path):
    c = tmp_path / "c"
    cfg = _cfg(c, "data.max_records=6", "cache.k=4")
    build_run_cache(cfg)
    r = CacheReader(str(c))
    r.check(expected_tokenizer_hash=tokenizer_fingerprint(byte_tokenizer()),
            expected_dataset_fingerprint=dataset_fingerprint(cfg.data))
    other = load_run_config(TINY, [f"data.sources=[{{path: {TEST}}}]", "data.max_records=6"]).data
    assert dataset_fingerprint(other) != dataset_fingerprint(cfg.data)
    with pytest.raises(CacheMismatchError, match="dataset fingerprint"):
        r.check(expected_dataset_fingerprint=dataset_fingerprint(other))
    # max_records changes which documents exist; shuffle/seed/batch size do not.
    more = load_run_config(TINY, [f"data.sources=[{{path: {TRAIN}}}]", "data.max_records=7"]).data
    assert dataset_fingerprint(more) != dataset_fingerprint(cfg.data)
    same = load_run_config(TINY, [f"data.sources=[{{path: {TRAIN}}}]", "data.max_records=6",
                                  "data.shuffle=false", "data.batch_size=2", "data.seed=3"]).data
    assert dataset_fingerprint(same) == dataset_fingerprint(cfg.data)
    with pytest.raises(CacheMismatchError, match="tokenizer hash"):
        r.check(expected_tokenizer_hash="0123456789abcdef")


def test_multi_source_explicit_ownership_and_resume_skips_teacher(tmp_path, monkeypatch):
    c = tmp_path / "c"
    cfg = load_run_config(TINY, [f"teacher.cache={c}", "data.max_records=5", "cache.k=4",
                                 f"data.sources=[{{path: {TRAIN}, weight: 1.0}}, {{path: {TEST}, weight: 9.0}}]"])
    build_run_cache(cfg, max_batches=1)
    part = verify(str(c))
    assert not part.ok and part.documents > 0
    assert json.loads((c / "manifest.json").read_text())["ownership"] == "explicit"
    build_run_cache(cfg)
    rep = verify(str(c))
    assert rep.ok, rep.errors
    assert rep.documents == 10
    # A finished cache: rebuilding runs no teacher step.
    import distill_jax.cache.build as B
    calls = []
    real = B.make_teacher_fn
    monkeypatch.setattr(B, "make_teacher_fn", lambda *a, **k: (lambda *x: calls.append(1) or real(*a, **k)(*x)))
    build_run_cache(cfg)
    assert calls == []


@pytest.mark.slow
def test_two_processes_write_the_same_cache_as_one(tmp_path):
    """Two local processes (jax.distributed, 4 fake devices each) each write their own
    documents; the result equals a one-process cache document for document."""
    import os
    import socket
    import subprocess
    import sys

    from distill_jax.cache import CacheReader, verify

    repo = Path(__file__).resolve().parents[1]
    # Rows shorter than most documents: the documents are cut into fixed windows, so the cache
    # does not depend on how each process layout packs them.
    args = ["configs/tiny.yaml", "data.max_records=24", "data.batch_size=8", "cache.k=16",
            "data.seq_len=64", "cache.logprob_encoding=f32", "logging.progress=false"]

    def env(devices, **extra):
        e = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_JAX_")}
        e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                 JAX_PLATFORMS="cpu", **extra)
        return e

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "distill_jax.cli", "cache", *args,
                    f"teacher.cache={one}"], cwd=repo, env=env(8), check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distill_jax.cli", "cache", *args, f"teacher.cache={two}"],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env(4, DISTILL_JAX_COORDINATOR=f"127.0.0.1:{port}", DISTILL_JAX_NUM_PROCESSES="2",
                DISTILL_JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    report = verify(two)
    assert report.ok, report.errors
    a, b = CacheReader(one), CacheReader(two)
    assert a.num_docs == b.num_docs == 24
    assert a.manifest.window == b.manifest.window == 64 and (a.doc_length > 2 * 64).sum() > 10
    _all_docs_equal(one, two, atol=1e-5)
