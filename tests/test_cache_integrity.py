"""Teacher cache integrity: damaged data is detected (verify and every read), one writer per part
(the lock), the teacher's identity is checked in training, a resumed build is bitwise the
uninterrupted one, and `cache` ends with a summary."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from distill_jax.cache import (CacheDamagedError, CacheMismatchError, CacheReader, CacheSpec, CacheWriter,
                               Manifest, verify)
from distill_jax.train.assemble import build_run_cache
from distill_jax.cache.build import teacher_identity
from distill_jax.config import load_run_config
from distill_jax.locking import LockedError, exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TRAIN = str(ROOT / "configs" / "data" / "math_train.jsonl")
PART = "part-00000-of-00001"
# 12 documents of 10 tokens: rows 10d..10d+9; shards of 32 rows, chunks of 8.
SPEC = CacheSpec(k=4, vocab_size=1000, logprob_encoding="f32", chunk_rows=8, shard_rows=32)


def _docs(n=12, length=10, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        ids = np.argsort(rng.random((length, 1000)), axis=1)[:, :4]
        lps = np.sort(-rng.exponential(2.0, (length, 4)), axis=1)[:, ::-1].astype(np.float32)
        docs.append({"topk_ids": ids, "topk_logprobs": lps,
                     "actual_logprob": -rng.exponential(1.0, length).astype(np.float32),
                     "tail_logmass": np.full(length, -3.0, np.float32),
                     "boundary_logmass": -rng.exponential(1.0, length).astype(np.float32)})
    return docs


def _manifest():
    return Manifest(SPEC, teacher={"name": "t", "config_hash": "c", "weights_hash": "w"},
                    tokenizer_hash="tok", dataset_fingerprint="data")


def _write(path, docs):
    with CacheWriter(str(path), _manifest(), num_docs=len(docs)) as w:
        for d in w.pending_doc_ids():
            w.write_document(d, docs[d])
        w.finalize()


def _one_line_damage(e: pytest.ExceptionInfo, doc: int) -> str:
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "\n" not in msg and "tensorstore_spec" not in msg and len(msg) < 600, msg
    assert f"document {doc} " in msg and "the cache is damaged; run `distill-jax cache verify" in msg, msg
    return msg


# ----------------------------------------------------------------------------- damaged data


def test_deleted_shard_file_is_reported_not_read_as_zeros(tmp_path):
    docs = _docs()
    _write(tmp_path, docs)
    assert verify(str(tmp_path)).ok
    os.remove(tmp_path / PART / "actual_logprob" / "c" / "1")  # rows 32..63: documents 3..6
    rep = verify(str(tmp_path))
    assert not rep.ok and rep.damaged_documents == [3, 4, 5, 6], rep.errors
    assert any("4 damaged documents" in e and "actual_logprob" in e and "rebuild" in e for e in rep.errors), rep.errors
    r = CacheReader(str(tmp_path))
    np.testing.assert_array_equal(r.read_document(2)["actual_logprob"], docs[2]["actual_logprob"])
    with pytest.raises(CacheDamagedError) as e:
        r.read_document(4)
    assert "actual_logprob" in _one_line_damage(e, 4)
    for topk in (True, False):  # a packed batch touching document 5 (ALM reads the scalars only)
        with pytest.raises(CacheDamagedError) as e:
            CacheReader(str(tmp_path)).read_tokens(np.array([[1, 1, 5, -1]]), np.array([[0, 1, 3, 0]]),
                                                   topk=topk)
        _one_line_damage(e, 5)
    # A deleted array directory: the reader refuses to open, verify names the array.
    os.rename(tmp_path / PART / "tail_logmass", tmp_path / "moved")
    with pytest.raises(CacheDamagedError, match="tail_logmass: cannot open"):
        CacheReader(str(tmp_path))
    assert any("tail_logmass: cannot open" in e for e in verify(str(tmp_path)).errors)


@pytest.mark.parametrize("how", ["flipped byte", "rewritten rows"])
def test_damaged_float_data_is_reported(tmp_path, how):
    """A flipped byte in a shard file fails its chunk's crc32c; rows rewritten through tensorstore
    (valid chunks, other values) fail the document's checksum."""
    docs = _docs()
    _write(tmp_path, docs)
    array = tmp_path / PART / "tail_logmass"
    if how == "flipped byte":
        shard = array / "c" / "2"  # rows 64..95: documents 6..9
        raw = bytearray(shard.read_bytes())
        raw[20] ^= 0x10
        shard.write_bytes(bytes(raw))
        expect = {6, 7, 8, 9}
    else:
        st = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array)}}).result()
        st[53].write(np.float32(-2.5)).result()  # document 5
        expect = {5}
    rep = verify(str(tmp_path))
    assert not rep.ok and rep.damaged_documents and set(rep.damaged_documents) <= expect, rep.errors
    assert any("damaged documents" in e for e in rep.errors)
    if how == "rewritten rows":
        assert rep.damaged_documents == [5] and any("does not match its checksum" in e for e in rep.errors)
    r = CacheReader(str(tmp_path))
    bad = rep.damaged_documents[0]
    with pytest.raises(CacheDamagedError) as e:
        r.read_document(bad)
    _one_line_damage(e, bad)
    with pytest.raises(CacheDamagedError) as e:
        CacheReader(str(tmp_path)).read_tokens(np.array([0, bad]), np.array([0, 0]), topk=False)
    _one_line_damage(e, bad)
    for d in sorted(set(range(12)) - expect):
        np.testing.assert_array_equal(r.read_document(d)["tail_logmass"], docs[d]["tail_logmass"])


# ----------------------------------------------------------------------------- one writer per part


def test_second_writer_of_a_part_is_refused(tmp_path):
    docs = _docs()
    w = CacheWriter(str(tmp_path), _manifest(), num_docs=12)
    with pytest.raises(LockedError, match=rf"{PART} of .* is in use by pid {os.getpid()} on host "
                                          rf"{socket.gethostname()} since .*; wait for it to finish or stop it"):
        CacheWriter(str(tmp_path), _manifest(), num_docs=12)
    for d in w.pending_doc_ids():
        w.write_document(d, docs[d])
    w.finalize()
    w.close()
    w2 = CacheWriter(str(tmp_path), _manifest(), num_docs=12)  # the lock went with close()
    assert w2.pending_doc_ids() == [] and not w2.write_document(3, docs[3])
    w2.close()
    rep = verify(str(tmp_path))
    assert rep.ok and rep.documents == 12 and rep.tokens == 120, rep.errors


def test_cli_cache_refuses_a_locked_part(tmp_path):
    """`distill-jax cache` on a part another process is writing exits at once with one line
    naming the holder, and writes nothing."""
    cache = tmp_path / "c"
    (cache / PART).mkdir(parents=True)
    with exclusive_lock(cache / PART / "LOCK", what="test holder"):
        p = subprocess.run([sys.executable, "-m", "distill_jax.cli", "cache", TINY, f"teacher.cache={cache}",
                            "data.max_records=4", "cache.k=4"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in lines[0], p.stderr
    assert not (cache / PART / "journal.bin").exists()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    lock = tmp_path / "LOCK"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom distill_jax.locking import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, what='run dir'):\n    print('held', flush=True)\n    time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"^{lock} is in use by pid {holder.pid} on host "
                                              rf"{socket.gethostname()} since "):
            with exclusive_lock(lock):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with exclusive_lock(lock, what="run dir") as held:  # the kernel dropped the dead holder's lock
            assert held.held and f'"pid": {os.getpid()}' in lock.read_text()
        assert lock.read_text() == ""  # released: no holder named
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- teacher identity


def test_teacher_identity_tells_checkpoints_of_one_shape_apart(tmp_path):
    """Two checkpoints with the same config and same-size weight files (a model and its
    fine-tune) have different identities; a moved, renamed copy keeps its identity."""
    idents = []
    for name, fill in (("a", 1), ("b", 2), ("elsewhere/copy-of-a", 1)):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "config.json").write_text('{"model_type": "llama"}')
        (d / "model.safetensors").write_bytes(bytes([fill]) * 4096)
        cfg = types.SimpleNamespace(hf_path=str(d), preset=None, dtype="float32", param_dtype="float32",
                                    overrides={}, seed=0)
        idents.append(teacher_identity(cfg, None))
    assert idents[0]["weights_hash"] != idents[1]["weights_hash"]
    assert idents[0]["config_hash"] == idents[1]["config_hash"]
    assert idents[2].pop("name") == "copy-of-a" and idents[0].pop("name") == "a"
    assert idents[0] == idents[2]


def test_reader_check_compares_teacher_identity(tmp_path):
    _write(tmp_path, _docs())
    r = CacheReader(str(tmp_path))
    r.check(expected_teacher={"name": "renamed", "config_hash": "c", "weights_hash": "w"})  # name: messages only
    with pytest.raises(CacheMismatchError, match=r"built by teacher 't' but this run's teacher is 'u' \(cache vs "
                                                 r"run: weights_hash 'w' vs 'w2'\); rebuild the cache"):
        r.check(expected_teacher={"name": "u", "config_hash": "c", "weights_hash": "w2"})


def test_training_refuses_a_cache_of_another_teacher(tmp_path):
    from distill_jax.train.loop import run

    common = [f"data.sources=[{{path: {TRAIN}}}]", "data.max_records=8", "cache.k=8", "steps=1",
              "logging.progress=false", f"teacher.cache={tmp_path / 'c'}"]
    build_run_cache(load_run_config(TINY, common))
    with pytest.raises(CacheMismatchError, match=r"built by teacher 'tiny-llama' .*weights_hash "
                                                 r"'random-init-seed-1' vs 'random-init-seed-7'"):
        run(load_run_config(TINY, [*common, f"run_dir={tmp_path / 'run'}", "teacher.seed=7"]))
    with pytest.raises(CacheMismatchError, match=r"config_hash"):
        run(load_run_config(TINY, [*common, f"run_dir={tmp_path / 'run2'}",
                                   "teacher.overrides={vocab_size: 259, num_layers: 3, hidden_size: 64, "
                                   "intermediate_size: 128}"]))


# ----------------------------------------------------------------------------- resume, summary


def _cfg(cache, *extra):
    return load_run_config(TINY, [f"teacher.cache={cache}", f"data.sources=[{{path: {TRAIN}}}]",
                                  "data.max_records=40", "cache.k=8", "cache.batch_size=2", "data.seq_len=512",
                                  "cache.logprob_encoding=f32", "mesh.num_devices=1", *extra])


def _bitwise_equal(a, b):
    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    assert ra.complete and rb.complete
    np.testing.assert_array_equal(ra.doc_length, rb.doc_length)
    np.testing.assert_array_equal(ra.doc_crc, rb.doc_crc)  # the stored bytes of every array
    for d in range(ra.num_docs):
        x, y = ra.read_document(d), rb.read_document(d)
        for key in x:
            np.testing.assert_array_equal(x[key].view(np.uint32) if x[key].dtype == np.float32 else x[key],
                                          y[key].view(np.uint32) if y[key].dtype == np.float32 else y[key],
                                          err_msg=f"doc {d} {key}")


def test_resumed_build_is_bitwise_the_uninterrupted_one(tmp_path):
    """Builds stopped after 3, 6 and 9 batches (windows of 512 packed 2 rows a batch, so the
    documents after a stop would pack differently) and resumed equal the uninterrupted build
    bit for bit, every array."""
    clean = build_run_cache(_cfg(tmp_path / "clean"), progress_every_s=1e9)
    assert clean.complete and clean.resumed_documents == 0 and clean.documents == 40
    for stop in (3, 6, 9):
        path = tmp_path / f"stop{stop}"
        part = build_run_cache(_cfg(path), max_batches=stop, flush_tokens=1, commit_every_s=0, progress_every_s=1e9)
        assert not part.complete and 0 < part.documents < 40
        rest = build_run_cache(_cfg(path), progress_every_s=1e9)
        assert rest.complete and rest.resumed_documents == part.documents
        assert rest.written_documents == 40 - part.documents and rest.tokens == clean.tokens
        _bitwise_equal(tmp_path / "clean", path)


def test_cli_cache_prints_a_summary(tmp_path):
    cache = tmp_path / "c"
    over = [f"teacher.cache={cache}", f"data.sources=[{{path: {TRAIN}}}]", "data.max_records=12", "cache.k=4",
            "cache.batch_size=2", "mesh.num_devices=1"]
    part = build_run_cache(load_run_config(TINY, over), max_batches=4, flush_tokens=1, commit_every_s=0,
                       progress_every_s=1e9)
    assert 0 < part.documents < 12
    p = subprocess.run([sys.executable, "-m", "distill_jax.cli", "cache", TINY, *over], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    line = p.stdout.strip().splitlines()[-1]
    rep = verify(str(cache))
    assert rep.ok
    for want in (f"{cache}: 12 documents", f"{rep.tokens} tokens", "bytes/token", "k=4", "complete",
                 f"this run wrote {12 - part.documents} documents", " s, ", "tokens/s",
                 f"resumed: {part.documents} documents were already there"):
        assert want in line, (want, line)
