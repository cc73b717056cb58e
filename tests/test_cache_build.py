"""Building the teacher cache from a run config (distill_jax.cache.build) and the `cache` CLI."""

from __future__ import annotations

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
from distill_jax.cache.build import build_cache, cache_data_config, dataset_fingerprint, word_start_mask
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


def test_build_k_full_vocab_matches_live_teacher(tmp_path):
    from distill_jax import models, sharding
    from distill_jax.train import build

    cfg = _cfg(tmp_path / "c", "data.max_records=24", "cache.k=259", "cache.batch_size=4")
    build_cache(cfg, spec_overrides={"chunk_rows": 256, "shard_rows": 1024})
    assert verify(str(tmp_path / "c")).ok
    r = CacheReader(str(tmp_path / "c"))
    r.check(expected_tokenizer_hash=tokenizer_fingerprint(byte_tokenizer()),
            expected_dataset_fingerprint=dataset_fingerprint(cfg.data), k=259, vocab_size=259)
    assert r.manifest.num_docs == 24
    mesh = sharding.make_mesh(-1, 1, 1, jax.devices())
    teacher = build.load_model(cfg.teacher, mesh, sharding.DEFAULT_RULES)
    fwd = jax.jit(lambda p, t, pos, seg: jax.nn.log_softmax(
        models.forward(models.Model(teacher.config, p), t, positions=pos, segment_ids=seg), -1))
    it = D.make_iterator(cache_data_config(cfg), byte_tokenizer())
    wmask = word_start_mask(byte_tokenizer(), 259)
    checked = 0
    for batch in it:
        lp = np.asarray(fwd(teacher.params, batch["tokens"], batch["positions"], batch["segment_ids"]))
        got = r.read_tokens(batch["doc_ids"], batch["doc_offsets"])
        valid = got["valid"]
        lengths = np.where(valid, r.doc_length[np.maximum(batch["doc_ids"], 0)], 0)
        has_next = valid & (batch["doc_offsets"] < lengths - 1)
        live_actual = np.take_along_axis(lp, batch["targets"][..., None], -1)[..., 0]
        np.testing.assert_allclose(got["actual_logprob"][has_next], live_actual[has_next], atol=1e-5, rtol=0)
        assert (got["actual_logprob"][valid & ~has_next] == 0).all()
        live_topk = np.take_along_axis(lp, got["topk_ids"], -1)  # all 259 ids, cached order
        np.testing.assert_allclose(got["topk_logprobs"][valid], live_topk[valid], rtol=2 ** -8, atol=1e-6)
        assert (np.sort(got["topk_ids"][valid], -1) == np.arange(259)).all()
        assert np.isneginf(got["tail_logmass"][valid]).all()
        live_b = np.log(np.exp(lp)[..., wmask].sum(-1))
        np.testing.assert_allclose(got["boundary_logmass"][valid], live_b[valid], atol=1e-5)
        checked += int(valid.sum())
    assert checked == int(r.doc_length.sum()) > 1000


def _cli(*args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTILL_JAX_CACHE_COMMIT_S": "0"}
    return subprocess.Popen([sys.executable, "-m", "distill_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _all_docs(path):
    r = CacheReader(str(path))
    return r, [r.read_document(d) for d in range(r.num_docs)]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    over = ["data.max_records=200", "cache.k=8", "cache.batch_size=2", f"data.sources=[{{path: {TRAIN}}}]"]
    killed = tmp_path / "killed"
    p = _cli("cache", TINY, f"teacher.cache={killed}", *over)
    journal = killed / "part-00000-of-00001" / "journal.bin"
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if journal.exists() and journal.stat().st_size >= 32 * 5:
            break
        time.sleep(0.005)
    assert p.poll() is None, "the build finished before it could be killed; give it more data"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (killed / "part-00000-of-00001" / "DONE.json").exists()
    partial = verify(str(killed))
    assert not partial.ok and 0 < partial.documents < 200
    out = _cli("cache", TINY, f"teacher.cache={killed}", *over).communicate()
    rep = _cli("cache", "verify", str(killed))
    stdout, _ = rep.communicate()
    assert rep.returncode == 0, (stdout, out)
    assert "200 documents (0 missing)" in stdout and "ok" in stdout
    build_cache(_cfg(tmp_path / "clean", *over))
    r1, docs1 = _all_docs(killed)
    r2, docs2 = _all_docs(tmp_path / "clean")
    assert (r1.doc_length == r2.doc_length).all()
    for a, b in zip(docs1, docs2):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_cli_verify_and_corruption(tmp_path):
    c = tmp_path / "c"
    build_cache(_cfg(c, "data.max_records=10", "cache.k=4"))
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
    build_cache(cfg)
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
    build_cache(cfg, max_batches=1)
    part = verify(str(c))
    assert not part.ok and part.documents > 0
    assert json.loads((c / "manifest.json").read_text())["ownership"] == "explicit"
    build_cache(cfg)
    rep = verify(str(c))
    assert rep.ok, rep.errors
    assert rep.documents == 10
    # A finished cache: rebuilding runs no teacher step.
    import distill_jax.cache.build as B
    calls = []
    real = B.make_teacher_fn
    monkeypatch.setattr(B, "make_teacher_fn", lambda *a, **k: (lambda *x: calls.append(1) or real(*a, **k)(*x)))
    build_cache(cfg)
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
    # Rows long enough that no document is split: a split document's pieces (and so their teacher
    # context) depend on how documents are packed, which differs between process layouts.
    args = ["configs/tiny.yaml", "data.max_records=40", "data.batch_size=8", "cache.k=16",
            "data.seq_len=1024",
            "logging.progress=false"]

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
    assert a.num_docs == b.num_docs == 40
    for doc in range(40):
        da, db = a.read_document(doc), b.read_document(doc)
        for key in da:
            np.testing.assert_allclose(da[key], db[key], atol=1e-5, err_msg=f"doc {doc} {key}")
