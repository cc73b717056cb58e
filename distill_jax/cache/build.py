"""Building a teacher cache: ``distill-jax cache CONFIG`` / :func:`build_cache`.

    from distill_jax.train.assemble import build_run_cache   # a run config's cache
    result = build_run_cache(load_run_config("configs/tiny.yaml",
                                             ["teacher.cache=/tmp/c", "cache.k=64"]))
    print(result.summary())   # documents, tokens, bytes/token, k, time, tokens/s, resumed or not

:func:`build_cache` itself takes narrow arguments: the cache path, the teacher's model section,
the data and cache sections, the tokenizer(s) and the mesh.

What runs. The teacher is placed on the mesh exactly as the training loop places it
(``models.source.load_model(teacher, mesh, rules)``). The documents are the run's data section
read with ``shuffle=False`` and ``num_epochs=1`` and, for a mixture of several sources, each
source weighted by its size, so one pass yields *every* ``doc_id`` exactly once (the cache is
keyed by ``doc_id``, so it serves any mixture weights, shuffle and epoch of the same documents);
they are read and tokenized as the data pipeline does (its ``docs`` stage), the teacher's tokens
being the teacher tokenizer's in cross-tokenizer runs (``loss.cross_tokenizer``).

Windows. Each document is cut into fixed windows of ``W`` tokens -- ``[0, W)``, ``[W, 2W)``, ...
-- each a segment of its own with positions from 0, where ``W`` is the cache run's row length
(``data.seq_len``; ``data.teacher_seq_len`` for cross-tokenizer runs) and is recorded as
``Manifest.window``. The windows are packed first-fit into rows of ``W`` tokens, ``cache.batch_size``
rows (default ``data.batch_size``) per batch. Attention never crosses segments, so what the cache
holds for a document is a function of the document and ``W`` alone, up to float rounding: not of
the packing, the batch size or the number of processes (bitwise only for the same packing, see
Resuming). Row ``t`` of the last token of a window still predicts the
document's next token (the first of the next window), so only a document's last token has no
``actual_logprob`` (stored as 0).

The teacher step. Per batch a jitted step computes, per token, in token chunks of
``loss.chunk_size`` over the flattened batch (full ``(B, T, V)`` logits never exist): top-k ids
and log-probs and the tail log-mass (the values of ``losses.sparse.topk_from_logits`` at
``cache.temperature``), the log-prob of the actual next token, and the boundary log-mass (of the
:func:`word_start_mask` tokens), all in one pass over each chunk's logits (:func:`teacher_token_stats`).

Overlap. The host work runs beside the teacher: a thread reads and tokenizes documents ahead,
the step for batch ``n + 1`` is enqueued (JAX dispatches asynchronously) before the outputs of
batch ``n`` are fetched, and a writer thread (fed through a bounded queue) assembles documents
from their windows, encodes them and writes them with :class:`~distill_jax.cache.store.CacheWriter`.
Only whole documents are written, and a document is committed (journaled) only after its rows are
durably written; the writer thread is the only one that touches the writer. Measured
(``benchmarks/cache_write.py``: d=256, 4 layers, vocab 49,152, rows of 512, k=64): on an H100
the build runs at 99.7% of the teacher step's own speed (212k tokens/s); on CPU the difference
is within the measurement noise (a few percent).

Resuming and processes. The writer commits at least every ``flush_tokens`` tokens and every
``commit_every_s`` seconds (env ``DISTILL_JAX_CACHE_COMMIT_S`` overrides the latter). A
restarted build packs all documents as the first build did and skips the batches whose documents
are all committed, so the batches it runs are the uninterrupted build's and the result is
bitwise the same (given the same backend, ``cache.batch_size`` and process count; otherwise the
values agree to float rounding, which depends on where a window sits in its row). One build per
part at a time: the writer locks its part (a second one gets
:class:`~distill_jax.locking.LockedError` before loading the teacher). Process ``p`` of ``P``
reads the pipeline's shard (mixture positions ``p, p + P, ...``) and owns exactly those
``doc_id``s (modulo rule for one source, where positions are doc_ids; an explicit list
otherwise). Documents that are empty after tokenization or bad records skipped with
``on_bad_record=skip`` are written with 0 tokens. In multi-process runs all processes step
together (an all-gather of one flag per batch says whether anyone still has windows; a process
out of windows feeds padding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.cache.store import CacheSpec, CacheWriter, Manifest
from distill_jax.tokens import tokenizer_fingerprint, word_start_mask

__all__ = ["FINGERPRINT_VERSION", "BuildResult", "build_cache", "cache_data_config", "dataset_fingerprint",
           "document_windows", "make_teacher_fn", "pack_windows", "teacher_identity",
           "teacher_token_stats", "WindowBatch", "word_start_mask"]

FINGERPRINT_VERSION = 1
_MIB = 1 << 20


# ----------------------------------------------------------------------------- fingerprints


def _file_digest(path: str) -> dict[str, Any]:
    """Size plus sha256 of the first and last MiB (cheap on huge files, catches edits/appends)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            h.update(f.read(_MIB))
    return {"size": size, "head_tail_sha256": h.hexdigest()}


def _source_files(path: str) -> list[str]:
    if os.path.isdir(path):  # a saved dataset directory: every file inside
        return sorted(os.path.join(r, f) for r, ds, fs in os.walk(path) for f in fs
                      if not f.startswith("."))
    return [path]


def dataset_fingerprint(data_cfg) -> str:
    """A hex sha256 identifying the documents behind each ``doc_id`` and their tokens.

    Hashed: a version tag; the fields that change which records exist, their order (``doc_id``)
    or their tokens -- per source ``path``, ``format``, ``split``, ``load_dataset_builder``; the
    ``record`` kind and the field names it reads, ``loss_on_prompt``, ``add_bos``, ``add_eos``,
    ``long_docs`` and ``max_records`` -- and, for every file each source matches (sorted, as the
    reader opens them; every file inside a saved-dataset directory), its base name, size and the
    sha256 of its first and last MiB.

    Not hashed: mixture weights, ``shuffle``, ``seed``, ``num_epochs``, ``seq_len``,
    ``batch_size``, ``workers``, ``num_shards`` -- they change how documents are mixed, ordered
    and packed, not what ``doc_id`` d is, and the cache (keyed by ``doc_id``, one row per token
    of the whole document) serves any of them. The tokenizer is fingerprinted separately
    (``Manifest.tokenizer_hash``). Paths enter by base name only, so a moved dataset still matches.
    """
    from distill_jax.data.records import expand_source

    fields = {
        "version": FINGERPRINT_VERSION,
        "record": data_cfg.record,
        "text_field": data_cfg.text_field, "prompt_field": data_cfg.prompt_field,
        "response_field": data_cfg.response_field, "messages_field": data_cfg.messages_field,
        "loss_on_prompt": data_cfg.loss_on_prompt, "add_bos": data_cfg.add_bos,
        "add_eos": data_cfg.add_eos, "long_docs": data_cfg.long_docs,
        "max_records": data_cfg.max_records,
        "sources": [],
    }
    for src in data_cfg.sources:
        files = []
        for match in expand_source(src):
            for f in _source_files(match):
                files.append({"name": os.path.relpath(f, os.path.dirname(match)), **_file_digest(f)})
        fields["sources"].append({"path": os.path.basename(os.path.normpath(src.path)),
                                  "format": src.format, "split": src.split,
                                  "load_dataset_builder": src.load_dataset_builder, "files": files})
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def teacher_identity(teacher_cfg, model_config) -> dict[str, str]:
    """Strings identifying the teacher: name, numerics, and hashes of its config and weights
    (recorded as ``Manifest.teacher``; training compares them with its own teacher's).

    A checkpoint: ``config_hash`` = sha256 of ``config.json`` and the config's ``overrides``;
    ``weights_hash`` = sha256 over its ``*.safetensors`` files of each one's name, size and the
    sha256 of its first and last MiB (cheap on huge files; two checkpoints of one architecture,
    e.g. a base model and its fine-tune, differ there). A preset: the model config (without
    ``remat``, which does not change the outputs) and the init seed. ``name`` (the preset, or
    the checkpoint directory's name) is for messages; paths are not hashed, so a moved or
    renamed checkpoint still matches.
    """
    ident = {"dtype": str(teacher_cfg.dtype), "param_dtype": str(teacher_cfg.param_dtype)}
    if getattr(teacher_cfg, "quantize", "none") != "none":  # absent: full precision (older caches)
        ident["quantize"] = str(teacher_cfg.quantize)
    if teacher_cfg.hf_path:
        root = Path(teacher_cfg.hf_path)
        ident["name"] = root.name
        ident["config_hash"] = hashlib.sha256((root / "config.json").read_bytes() + json.dumps(
            dict(teacher_cfg.overrides), sort_keys=True, default=str).encode()).hexdigest()[:16]
        files = [{"name": p.name, **_file_digest(str(p))} for p in sorted(root.glob("*.safetensors"))]
        ident["weights_hash"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    else:
        ident["name"] = str(teacher_cfg.preset)
        arch = dataclasses.replace(model_config, remat="none")
        ident["config_hash"] = hashlib.sha256(repr(arch).encode()).hexdigest()[:16]
        ident["weights_hash"] = f"random-init-seed-{teacher_cfg.seed}"
    return ident





# ----------------------------------------------------------------------------- teacher step


def teacher_token_stats(logits_CV, targets_C, k: int, word_mask_V, temperature: float = 1.0):
    """What the cache stores per token, from the teacher's logits ``(C, V)`` and next tokens ``(C,)``.

    Returns ``(ids (C, k) int32, logprobs (C, k), actual (C,), tail (C,), boundary (C,))``, fp32,
    at temperature T: the ``k`` most likely next tokens (``lax.top_k``: descending, ties to the
    lower id) and their log-probs, the log-prob of ``targets``, the log of the mass outside the
    top-k (``-inf`` when k = V) and the log of the mass of ``word_mask_V`` tokens -- the values of
    ``losses.sparse.topk_from_logits`` plus two, in one pass over the logits: every sum is of
    ``exp(z - max z)`` (no cancellation; the tail sums the entries below the k-th largest and adds
    back those tied with it but not taken).
    """
    z = logits_CV.astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    # The barrier keeps XLA from fusing the top-k into the passes below (on CPU it would redo it
    # per element); z goes through it too, which also keeps XLA's top-k decomposition (k near V)
    # from seeing the barrier as the top-k's only user.
    top_z, ids, z = jax.lax.optimization_barrier((*jax.lax.top_k(z, k), z))
    m, kth = top_z[:, :1], top_z[:, -1:]
    e = jnp.exp(z - m)
    below = z < kth
    tied = (z.shape[-1] - k) - jnp.sum(below, axis=-1)  # entries equal to the k-th, not taken
    s_all = jnp.sum(e, axis=-1)
    s_tail = jnp.sum(jnp.where(below, e, 0.0), axis=-1) + tied.astype(jnp.float32) * jnp.exp(kth - m)[:, 0]
    s_word = jnp.sum(jnp.where(word_mask_V[None, :z.shape[-1]], e, 0.0), axis=-1)
    lse = m[:, 0] + jnp.log(s_all)
    actual = jnp.take_along_axis(z, targets_C[:, None].astype(jnp.int32), axis=-1)[:, 0] - lse
    tail = m[:, 0] + jnp.log(s_tail) - lse
    boundary = m[:, 0] + jnp.log(s_word) - lse
    return ids.astype(jnp.int32), top_z - lse[:, None], actual, tail, boundary


def make_teacher_fn(model_config, k: int, temperature: float, word_mask: np.ndarray,
                    chunk_tokens: int = 512):
    """``fn(params, tokens, positions, segment_ids, targets) -> dict`` of per-token outputs
    ``(B, T, k)`` ids (int32) / log-probs, and ``(B, T)`` actual / tail / boundary (fp32): see
    :func:`teacher_token_stats`.

    The lm_head and everything after it run over the flattened batch in chunks of
    ``chunk_tokens`` tokens (``losses.chunked.chunked_scan``), so only ``(chunk_tokens, V)``
    logits exist at once.
    """
    from distill_jax.losses.chunked import chunked_scan, unchunk
    from distill_jax.models import Model, hidden_states, logits_from_hidden

    wmask = jnp.asarray(word_mask)

    def fn(params, tokens, positions, segment_ids, targets):
        model = Model(model_config, params)
        h = jax.lax.stop_gradient(hidden_states(model, tokens, positions=positions,
                                                segment_ids=segment_ids))
        b, t, d = h.shape
        n = b * t

        def chunk(carry, x):
            hc, tc = x
            z = logits_from_hidden(model, hc[None])[0]  # (c, V) fp32
            return carry, teacher_token_stats(z, tc, k, wmask, temperature)

        _, outs = chunked_scan(chunk, (), (h.reshape(n, d), targets.reshape(n)), chunk_tokens)
        names = ("topk_ids", "topk_logprobs", "actual_logprob", "tail_logmass", "boundary_logmass")
        return {name: o.reshape((b, t) + o.shape[1:]) for name, o in zip(names, unchunk(outs, n))}

    return fn


# ----------------------------------------------------------------------------- data


def cache_data_config(data_cfg, cache_cfg=None, records=None):
    """The run's data config (``data_cfg``) as the cache build reads it (see the module
    docstring); ``cache_cfg.batch_size``, when set, is its batch size."""
    from distill_jax.data import read_records

    bs = (cache_cfg.batch_size if cache_cfg is not None else None) or data_cfg.batch_size
    out = dataclasses.replace(data_cfg, shuffle=False, num_epochs=1, batch_size=bs,
                              long_docs="split", num_shards=None)
    if len(out.sources) > 1:
        records = records if records is not None else read_records(out)
        out = dataclasses.replace(out, sources=tuple(
            dataclasses.replace(s, weight=float(n)) for s, n in zip(out.sources, records.source_sizes)))
    return out


# ----------------------------------------------------------------------------- windows


@dataclasses.dataclass
class WindowBatch:
    """One packed batch of document windows: the teacher's inputs and where each window sits.

    ``tokens``, ``positions``, ``segment_ids``, ``targets``: ``(rows, W)`` int32 (0 on padding;
    each window its own segment, numbered from 1 within its row). ``placements``: per window
    ``(doc_id, document length, start in the document, row, column, length)``.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    placements: list[tuple[int, int, int, int, int, int]]

    def inputs(self) -> tuple[np.ndarray, ...]:
        """The teacher step's inputs: tokens, positions, segment_ids, targets."""
        return self.tokens, self.positions, self.segment_ids, self.targets


def document_windows(ids: np.ndarray, window: int):
    """Yield ``(start, tokens, targets)`` for the windows ``[0, W)``, ``[W, 2W)``, ... of one
    document's token ids; ``targets`` are the next tokens of the *document* (0 after its last)."""
    n = len(ids)
    nxt = np.append(ids[1:], 0).astype(np.int32)
    for start in range(0, n, window):
        end = min(start + window, n)
        yield start, ids[start:end], nxt[start:end]


def pack_windows(docs, rows: int, window: int):
    """Pack the windows of ``docs`` (an iterable of ``(doc_id, ids)``) first-fit, in order, into
    batches of ``rows`` rows of ``window`` tokens; yields :class:`WindowBatch` es. The first window
    that fits no row closes the batch. Each window is its own segment, with positions from 0."""
    def empty():
        z = lambda: np.zeros((rows, window), np.int32)  # noqa: E731
        return WindowBatch(z(), z(), z(), z(), []), np.zeros(rows, np.int64), np.zeros(rows, np.int32)

    batch, used, segs = empty()
    for doc_id, ids in docs:
        for start, toks, tgts in document_windows(ids, window):
            n = len(toks)
            fits = np.flatnonzero(used + n <= window)
            if not len(fits):
                yield batch
                batch, used, segs = empty()
                fits = np.array([0])
            r = int(fits[0])
            c = int(used[r])
            segs[r] += 1
            batch.tokens[r, c:c + n] = toks
            batch.targets[r, c:c + n] = tgts
            batch.positions[r, c:c + n] = np.arange(n)
            batch.segment_ids[r, c:c + n] = segs[r]
            batch.placements.append((doc_id, len(ids), start, r, c, n))
            used[r] += n
    if batch.placements:
        yield batch


def _tokenized_documents(data_cfg, tokenizer, teacher_tokenizer, process_index: int, process_count: int,
                         records, owned: list[int]):
    """``(doc_id, teacher token ids)`` of this process's documents in order; ids are None for a
    bad record (``on_bad_record="skip"``). Reads and tokenizes as the data pipeline does (its
    document stage, in this process: ``data.workers`` is not used)."""
    from distill_jax import data as D
    from distill_jax.data.records import BadRecordError

    ds = D.make_dataset(data_cfg, tokenizer, process_index=process_index, process_count=process_count,
                        teacher_tokenizer=teacher_tokenizer, records=records)
    q = 0
    for g in range(len(ds.docs)):
        for item in ds.docs[g]:
            doc_id = owned[q]
            q += 1
            if isinstance(item, BadRecordError):
                yield doc_id, None
                continue
            if item.doc_id != doc_id:
                raise AssertionError(f"the data pipeline yielded doc_id {item.doc_id} where the cache "
                                     f"expected {doc_id}")
            toks = item.teacher if teacher_tokenizer is not None else item.student
            yield doc_id, np.asarray(toks.ids, np.int32)


def _prefetch(iterable, depth: int):
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (errors re-raised)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def put(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            put(_Failure(e))

    t = threading.Thread(target=produce, name="cache-read", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


@dataclasses.dataclass
class _Failure:
    error: BaseException


# ----------------------------------------------------------------------------- writing


class _Assembler:
    """Runs in the writer thread: joins each document's windows and writes whole documents."""

    NAMES = ("topk_ids", "topk_logprobs", "actual_logprob", "tail_logmass", "boundary_logmass")

    def __init__(self, writer: CacheWriter, window: int, commit_every_s: float, progress: "_Progress"):
        self.writer, self.window = writer, window
        self.commit_every_s, self.progress = commit_every_s, progress
        self.pending: dict[int, dict[str, Any]] = {}  # doc_id -> {"left": windows, "pieces": [...]}
        self.last_commit = time.perf_counter()
        self.docs_written = 0

    def add(self, placements, host: dict[str, np.ndarray] | None, empty_docs: list[int]) -> None:
        """Take a batch's windows (``host``: its teacher outputs) and write the documents they
        complete, and the 0-token documents ``empty_docs``."""
        for doc_id in empty_docs:
            self._write(doc_id, [])
        ntok = 0
        for doc_id, length, start, r, c, n in placements:
            p = self.pending.setdefault(doc_id, {"left": -(-length // self.window), "pieces": []})
            p["pieces"].append((start, {name: host[name][r, c:c + n] for name in self.NAMES}))
            p["left"] -= 1
            if not p["left"]:
                del self.pending[doc_id]
                ntok += self._write(doc_id, p["pieces"])
        now = time.perf_counter()
        if now - self.last_commit >= self.commit_every_s:
            self.writer.flush()
            self.last_commit = now
        self.progress.update(self.docs_written, ntok)

    def _write(self, doc_id: int, pieces) -> int:
        k = self.writer.spec.k
        if not pieces:
            arrays = {"topk_ids": np.zeros((0, k), np.int32), "topk_logprobs": np.zeros((0, k), np.float32),
                      **{name: np.zeros(0, np.float32) for name in self.NAMES[2:]}}
        else:
            pieces.sort(key=lambda p: p[0])
            arrays = {name: np.concatenate([a[name] for _, a in pieces]) for name in self.NAMES}
            arrays["actual_logprob"][-1] = 0.0  # the last token has no next token
        self.writer.write_document(doc_id, arrays)
        self.docs_written += 1
        return len(arrays["topk_ids"])


class _WriterThread:
    """A bounded queue of jobs (callables) run in order by one thread; errors surface in ``put``
    and ``close``."""

    def __init__(self, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
                    self.error = e

    def put(self, job) -> None:
        self._raise()
        self.q.put(job)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err


# ----------------------------------------------------------------------------- build


class _Progress:
    def __init__(self, total_docs: int, done_docs: int, every_s: float = 5.0):
        self.total, self.start_done, self.every = total_docs, done_docs, every_s
        self.t0 = self.last = time.perf_counter()
        self.tokens = 0

    def update(self, new_docs: int, tokens: int, force: bool = False) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        done = self.start_done + new_docs
        dps, tps = new_docs / dt, self.tokens / dt
        left = self.total - done
        eta = f"{left / dps:.0f}s" if dps > 0 else "?"
        print(f"[cache] {done}/{self.total} docs, {self.tokens} tokens this run, "
              f"{dps:.1f} docs/s, {tps:.0f} tokens/s, ETA {eta}", file=sys.stderr, flush=True)


def _any_across_processes(flags: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(flags)).any(0)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What :func:`build_cache` did, for this process's part of the cache.

    ``documents``/``tokens``: committed in the part now (of ``owned_documents``);
    ``resumed_documents``: already committed when the build started (0 for a fresh build);
    ``written_documents``/``written_tokens``: written by this call, in ``elapsed_s`` seconds;
    ``bytes_per_token``: the part's bytes on disk per committed token; ``complete``: the part
    is finalized (every owned document written).
    """

    path: Path
    documents: int
    owned_documents: int
    tokens: int
    resumed_documents: int
    written_documents: int
    written_tokens: int
    bytes_per_token: float
    k: int
    elapsed_s: float
    complete: bool

    @property
    def tokens_per_s(self) -> float:
        """Tokens written per second by this call."""
        return self.written_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        """One line for people: what is in the cache and how fast this call wrote it."""
        resumed = (f"resumed: {self.resumed_documents} documents were already there" if self.resumed_documents
                   else "fresh build")
        state = "complete" if self.complete else f"incomplete ({self.owned_documents - self.documents} to go)"
        return (f"teacher cache {self.path}: {self.documents} documents, {self.tokens} tokens, "
                f"{self.bytes_per_token:.1f} bytes/token, k={self.k}, {state}; this run wrote "
                f"{self.written_documents} documents ({self.written_tokens} tokens) in {self.elapsed_s:.1f} s, "
                f"{self.tokens_per_s:.0f} tokens/s; {resumed}")


def _skip_done(batches, done: set[int]):
    """The batches that hold a window of a document not in ``done``, with ``placements`` reduced
    to those documents' windows (the others' rows still run, so the batch is the same one)."""
    for batch in batches:
        placements = [p for p in batch.placements if p[0] not in done]
        if placements:
            yield dataclasses.replace(batch, placements=placements)


def build_cache(path: str | Path, teacher, data_cfg, cache_cfg, *, tokenizer,
                teacher_tokenizer=None, mesh: tuple, chunk_tokens: int = 512,
                max_batches: int | None = None, flush_tokens: int | None = None,
                commit_every_s: float | None = None, spec_overrides: dict | None = None,
                progress_every_s: float = 5.0, queue_batches: int = 4) -> BuildResult:
    """Build (or resume) a teacher cache at ``path``.

    ``teacher``: the teacher's model section (``hf_path`` or ``preset``, ``overrides``, dtypes,
    seed: what ``models.source.load_model`` reads and the manifest records). ``data_cfg``: the
    run's data section; ``cache_cfg``: k, encoding, temperature, batch size
    (``config.CacheConfig``). ``tokenizer``: the run's (student's) tokenizer;
    ``teacher_tokenizer``: the teacher's, for a cross-tokenizer cache only (its rows are then
    the teacher's tokens, ``data.teacher_seq_len`` long). ``mesh``: ``(mesh, rules)`` to place
    the teacher on. ``chunk_tokens``: tokens per lm_head chunk. (From a run config:
    ``distill_jax.train.assemble.build_run_cache``.)

    ``max_batches`` stops after that many batches of this process (the cache stays resumable
    and is not finalized unless the data ran out). ``spec_overrides``: extra
    :class:`CacheSpec` fields (``scalar_dtype``, ``chunk_rows``, ``shard_rows``, ...).
    ``queue_batches``: batches of teacher outputs the writer thread may fall behind by.
    Returns a :class:`BuildResult` (``.summary()`` is what ``distill-jax cache`` prints).

    A resumed build packs every document, written or not, exactly as an uninterrupted build
    does and runs the teacher only on the batches that hold a document not yet written (the
    written documents' windows in those batches run again and are dropped), so every batch the
    teacher sees is one an uninterrupted build sees too: the cache is bitwise the same (on the
    same backend, with the same ``cache.batch_size`` and process count).
    """
    from distill_jax.data.records import read_records
    from distill_jax.models import source

    t0 = time.perf_counter()
    path = Path(path)
    k, encoding, temperature = int(cache_cfg.k), cache_cfg.logprob_encoding, \
        float(cache_cfg.temperature)
    if commit_every_s is None:
        commit_every_s = float(os.environ.get("DISTILL_JAX_CACHE_COMMIT_S", "30"))
    pi, pc = jax.process_index(), jax.process_count()

    teacher_config = source.model_config(teacher)
    vocab = teacher_config.vocab_size
    teacher_tok = teacher_tokenizer
    cross = teacher_tok is not None
    fingerprint = dataset_fingerprint(data_cfg)

    # Documents: every doc_id once, in document (mixture-position) order.
    data_cfg = cache_data_config(data_cfg, cache_cfg)
    if data_cfg.batch_size % pc:
        raise ValueError(f"cache batch size {data_cfg.batch_size} does not divide over {pc} processes")
    window = data_cfg.teacher_len if cross else data_cfg.seq_len
    records = read_records(data_cfg)
    if not (records.source_counts == records.source_sizes).all():
        raise AssertionError("cache data config does not cover every document once")
    per_epoch = (records.num_docs - pi + pc - 1) // pc
    owned = [records.locate(q * pc + pi, 0) for q in range(per_epoch)]
    explicit = len(data_cfg.sources) > 1

    # The writer first: it takes the part's lock, so a second build of the same part is refused
    # before it loads a teacher.
    spec = CacheSpec(k=k, vocab_size=vocab, logprob_encoding=encoding, temperature=temperature,
                     **(spec_overrides or {}))
    manifest = Manifest(spec, teacher=teacher_identity(teacher, teacher_config),
                        tokenizer_hash=tokenizer_fingerprint(teacher_tok or tokenizer),
                        dataset_fingerprint=fingerprint, window=window,
                        extra={"builder": "distill_jax.cache.build"})
    writer = CacheWriter(str(path), manifest, num_docs=records.num_docs, process_index=pi,
                         process_count=pc, flush_tokens=flush_tokens or spec.shard_rows,
                         owned_doc_ids=owned if explicit else None)
    try:
        # the mesh is ambient while the teacher step is traced, as in training: the model keeps
        # its activations batch-sharded (``models.transformer.constrain_batch``)
        with jax.set_mesh(mesh[0]):
            return _run_build(teacher, mesh, chunk_tokens, writer, owned, records, data_cfg,
                              tokenizer, teacher_tok, window, commit_every_s, progress_every_s,
                              queue_batches, max_batches, t0)
    finally:
        writer.close()


def _run_build(teacher_src, mesh_rules: tuple, chunk_tokens: int, writer: CacheWriter,
               owned: list[int], records, data_cfg, tokenizer, teacher_tok, window: int, commit_every_s: float, progress_every_s: float, queue_batches: int,
               max_batches: int | None, t0: float) -> BuildResult:
    """The teacher loop of :func:`build_cache`, writing through ``writer``."""
    from distill_jax import sharding
    from distill_jax.models import source

    pi, pc = jax.process_index(), jax.process_count()
    spec = writer.spec
    done_at_start = {d for d in owned if writer.is_done(d)}
    tokens_at_start = writer.committed_tokens

    # The teacher, placed as the training run places it.
    mesh, rules = mesh_rules
    teacher = source.load_model(teacher_src, mesh, rules)
    if teacher.config.vocab_size != spec.vocab_size:
        raise AssertionError(f"teacher vocab {teacher.config.vocab_size} != config's {spec.vocab_size}")
    word_mask = word_start_mask(teacher_tok or tokenizer, spec.vocab_size)
    fn = make_teacher_fn(teacher.config, spec.k, spec.temperature, word_mask,
                         chunk_tokens=chunk_tokens)
    batch_sh = sharding.batch_sharding(mesh, 2, rules)
    step = jax.jit(fn)
    rows = data_cfg.batch_size // pc
    row_mult = max(1, mesh.devices.size // pc)  # rows are padded to shard over the local devices

    progress = _Progress(len(owned), len(done_at_start), progress_every_s)
    assembler = _Assembler(writer, window, commit_every_s, progress)
    jobs = _WriterThread(queue_batches)
    seen: set[int] = set()
    empty_docs: list[int] = []  # 0-token documents not yet handed to the writer thread

    def documents():  # every document with tokens, written or not: the packing does not change
        for doc_id, ids in _prefetch(_tokenized_documents(data_cfg, tokenizer, teacher_tok, pi, pc,
                                                          records, owned), 64):
            seen.add(doc_id)
            if ids is None or not len(ids):
                if doc_id not in done_at_start:
                    empty_docs.append(doc_id)
            else:
                yield doc_id, ids

    docs = documents()
    batches = _skip_done(pack_windows(docs, rows, window), done_at_start)
    in_flight = None  # (placements, device outputs) of the last enqueued batch
    n_batches = 0
    exhausted = False
    try:
        while max_batches is None or n_batches < max_batches:
            batch = next(batches, None)
            exhausted = batch is None
            if not _any_across_processes(np.array([batch is not None]))[0]:
                break
            inputs = batch.inputs() if batch is not None else [np.zeros((rows, window), np.int32)] * 4
            args = [jax.make_array_from_process_local_data(batch_sh, _pad_rows(x, row_mult)) for x in inputs]
            out = step(teacher.params, *args)  # enqueued; runs while the previous batch is fetched
            for v in out.values():
                v.copy_to_host_async()
            if in_flight is not None:
                _hand_over(in_flight, mesh, batch_sh, rows, jobs, assembler, empty_docs)
            in_flight = (batch.placements if batch is not None else [], out)
            n_batches += batch is not None
        if in_flight is not None:
            _hand_over(in_flight, mesh, batch_sh, rows, jobs, assembler, empty_docs)
            in_flight = None
        if exhausted:  # a safety net: documents the stream never yielded get 0 tokens
            empty_docs += [d for d in owned if d not in seen and d not in done_at_start]
            _hand_over(([], None), mesh, batch_sh, rows, jobs, assembler, empty_docs)
    finally:
        batches.close()
        docs.close()
        jobs.close()  # finish the queued writes; documents not complete stay unwritten
        writer.flush()
    if exhausted:
        if assembler.pending:
            raise AssertionError(f"documents {sorted(assembler.pending)[:5]} incomplete at the end of the data")
        writer.finalize()
    progress.update(assembler.docs_written, 0, force=True)
    part_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(writer.part_dir) for f in fs)
    return BuildResult(
        path=Path(writer.path), documents=writer.committed_documents, owned_documents=len(owned),
        tokens=writer.committed_tokens, resumed_documents=len(done_at_start),
        written_documents=writer.committed_documents - len(done_at_start),
        written_tokens=writer.committed_tokens - tokens_at_start,
        bytes_per_token=part_bytes / writer.committed_tokens if writer.committed_tokens else 0.0,
        k=spec.k, elapsed_s=time.perf_counter() - t0, complete=exhausted)


def _hand_over(in_flight, mesh, batch_sh, rows: int, jobs: _WriterThread, assembler: _Assembler,
               empty_docs: list[int]) -> None:
    """Fetch a batch's teacher outputs (waiting for the device) and queue them for writing, with
    the 0-token documents seen so far."""
    placements, out = in_flight
    if not placements and not empty_docs:
        return
    host = None if not placements else {name: _to_host(v, mesh, batch_sh)[:rows] for name, v in out.items()}
    empties = list(empty_docs)
    empty_docs.clear()
    jobs.put(lambda: assembler.add(placements, host, empties))


def _pad_rows(x, mult: int) -> np.ndarray:
    x = np.asarray(x)
    pad = (-x.shape[0]) % mult
    return np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x


def _to_host(x, mesh, batch_sh) -> np.ndarray:
    """This process's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_sh.spec))
