"""Building a teacher cache from a run config: ``distill-jax cache CONFIG`` / :func:`build_cache`.

    from distill_jax.cache.build import build_cache
    path = build_cache(load_run_config("configs/tiny.yaml", ["teacher.cache=/tmp/c", "cache.k=64"]))

What runs. The mesh and the teacher are built exactly as the training loop builds them
(``train.build.load_model(cfg.teacher, mesh, rules)``). The data is the run's data section with
``shuffle=False``, ``num_epochs=1``, ``long_docs="split"``, ``num_shards=None``, the cache batch
size (``cache.batch_size`` rows, default ``data.batch_size``) and, for a mixture of several
sources, each source weighted by its size, so one pass yields *every* ``doc_id`` exactly once
(the cache is keyed by ``doc_id``, so it serves any mixture weights, shuffle and epoch of the same
documents). Per packed batch a jitted teacher step computes, per token, in token chunks of
``loss.chunk_size`` over the flattened batch (full ``(B, T, V)`` logits never exist): top-k ids
and log-probs and the tail log-mass (``losses.sparse.topk_from_logits`` at ``cache.temperature``),
the log-prob of the actual next token (``targets``), and the boundary log-mass (``logsumexp`` of the
log-probs of :func:`word_start_mask` tokens). Documents longer than a row are split by the
packer; the teacher then sees each piece without the previous piece's context, exactly as the
live teacher does during training at this ``seq_len``.

Assembling documents. A document's pieces arrive in order, possibly over several rows and
batches. Only the document the iterator is in the middle of after a batch (its ``get_state()``
has ``token_offset > 0``) can continue into the next batch; every other document seen so far is
complete. Complete documents (pieces sorted by ``doc_offsets``, checked to be exactly
``0..n-1``) go to :class:`~distill_jax.cache.store.CacheWriter`; ``actual_logprob`` is 0 at a
document's last token (no next token). Documents the pipeline never yields (empty after
tokenization, or bad records skipped with ``on_bad_record=skip``) are written with 0 tokens.

Resuming and processes. The writer commits at least every ``flush_tokens`` tokens and every
``commit_every_s`` seconds (env ``DISTILL_JAX_CACHE_COMMIT_S`` overrides the latter); a
restarted build skips committed documents and does not run the teacher on batches whose
documents are all committed. Process ``p`` of ``P`` reads the pipeline's shard (mixture
positions ``p, p + P, ...``) and owns exactly those ``doc_id``s (modulo rule for one source,
where positions are doc_ids; an explicit list otherwise). In multi-process runs all processes
step together (an all-gather of two flags per batch decides whether anyone needs the teacher
and when everyone is done; a process out of data feeds padding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.cache.store import CacheSpec, CacheWriter, Manifest
from distill_jax.tokenizer import bytes_to_unicode, tokenizer_fingerprint

__all__ = ["FINGERPRINT_VERSION", "build_cache", "cache_data_config", "dataset_fingerprint",
           "make_teacher_fn", "teacher_identity", "word_start_mask"]

FINGERPRINT_VERSION = 1
_MIB = 1 << 20
_WHITESPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")


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
    from distill_jax.data.records import _expand

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
        for match in _expand(src):
            for f in _source_files(match):
                files.append({"name": os.path.relpath(f, os.path.dirname(match)), **_file_digest(f)})
        fields["sources"].append({"path": os.path.basename(os.path.normpath(src.path)),
                                  "format": src.format, "split": src.split,
                                  "load_dataset_builder": src.load_dataset_builder, "files": files})
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def teacher_identity(teacher_cfg, model_config) -> dict[str, str]:
    """Strings identifying the teacher: name, and hashes of its config and weights.

    A checkpoint: ``config_hash`` = sha256 of ``config.json``; ``weights_hash`` = sha256 of the
    sorted ``(name, size)`` of its ``*.safetensors`` files (cheap; a re-saved checkpoint with the
    same sizes is assumed identical). A preset: the model config and the init seed.
    """
    ident = {"preset": str(teacher_cfg.preset or ""), "hf_path": str(teacher_cfg.hf_path or ""),
             "dtype": str(teacher_cfg.dtype), "param_dtype": str(teacher_cfg.param_dtype)}
    if teacher_cfg.hf_path:
        root = Path(teacher_cfg.hf_path)
        ident["name"] = root.name
        ident["config_hash"] = hashlib.sha256((root / "config.json").read_bytes()).hexdigest()[:16]
        files = sorted((p.name, p.stat().st_size) for p in root.glob("*.safetensors"))
        ident["weights_hash"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    else:
        ident["name"] = str(teacher_cfg.preset)
        ident["config_hash"] = hashlib.sha256(repr(model_config).encode()).hexdigest()[:16]
        ident["weights_hash"] = f"random-init-seed-{teacher_cfg.seed}"
    return ident


# ----------------------------------------------------------------------------- word starts


def word_start_mask(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """Bool ``(vocab_size,)``: tokens that start a new word -- their text begins with whitespace
    (byte-level BPE ``Ġ``/``Ċ``/``ĉ``..., SentencePiece ``▁``, a ``<0x20>``-style byte-fallback
    whitespace byte, or a literal whitespace character) -- or are special/added-special tokens.
    ``vocab_size`` (default: the tokenizer's) pads with False (ids the tokenizer does not have)."""
    vocab = tokenizer.get_vocab()
    n = vocab_size or (max(vocab.values()) + 1)
    mask = np.zeros(n, bool)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for tok, i in vocab.items():
        if i >= n or not tok:
            continue
        c = tok[0]
        if c == "\u2581" or c.isspace() or byte_of.get(c, -1) in _WHITESPACE_BYTES:
            mask[i] = True
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                mask[i] = int(tok[3:5], 16) in _WHITESPACE_BYTES
            except ValueError:
                pass
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        special |= {t for t, a in tokenizer.added_tokens_decoder.items() if a.special}
    except AttributeError:
        pass
    for i in special:
        if 0 <= i < n:
            mask[i] = True
    return mask


# ----------------------------------------------------------------------------- teacher step


def make_teacher_fn(model_config, k: int, temperature: float, word_mask: np.ndarray,
                    chunk_tokens: int = 512):
    """``fn(params, tokens, positions, segment_ids, targets) -> dict`` of per-token outputs
    ``(B, T, k)`` ids (int32) / log-probs, and ``(B, T)`` actual / tail / boundary (fp32).

    The lm_head and everything after it run over the flattened batch in chunks of
    ``chunk_tokens`` tokens (``lax.map``), so only ``(chunk_tokens, V)`` logits exist at once.
    """
    from distill_jax.losses.sparse import topk_from_logits
    from distill_jax.models import Model, hidden_states, logits_from_hidden

    wmask = jnp.asarray(word_mask)

    def fn(params, tokens, positions, segment_ids, targets):
        model = Model(model_config, params)
        h = jax.lax.stop_gradient(hidden_states(model, tokens, positions=positions,
                                                segment_ids=segment_ids))
        b, t, d = h.shape
        n = b * t
        c = min(chunk_tokens, n)
        pad = (-n) % c
        hf = jnp.pad(h.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, c, d)
        tf = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, c)

        def chunk(x):
            hc, tc = x
            z = logits_from_hidden(model, hc[None])[0]  # (c, V) fp32
            ids, lps, tail = topk_from_logits(z, k, temperature)
            z = z / temperature if temperature != 1.0 else z
            lse = jax.nn.logsumexp(z, axis=-1)
            actual = jnp.take_along_axis(z, tc[:, None].astype(jnp.int32), axis=-1)[:, 0] - lse
            bound = jax.nn.logsumexp(jnp.where(wmask[None, :z.shape[-1]], z, -jnp.inf), axis=-1) - lse
            return ids, lps, actual, tail, bound

        outs = jax.lax.map(chunk, (hf, tf))
        names = ("topk_ids", "topk_logprobs", "actual_logprob", "tail_logmass", "boundary_logmass")
        return {name: o.reshape((-1,) + o.shape[2:])[:n].reshape((b, t) + o.shape[2:])
                for name, o in zip(names, outs)}

    return fn


# ----------------------------------------------------------------------------- data


def cache_data_config(cfg, records=None):
    """The run's data config as the cache build reads it (see the module docstring)."""
    from distill_jax.data import read_records

    data_cfg = cfg.data
    cache_cfg = getattr(cfg, "cache", None)
    bs = getattr(cache_cfg, "batch_size", None) or data_cfg.batch_size
    out = dataclasses.replace(data_cfg, shuffle=False, num_epochs=1, batch_size=bs,
                              long_docs="split", num_shards=None)
    if len(out.sources) > 1:
        records = records if records is not None else read_records(out)
        out = dataclasses.replace(out, sources=tuple(
            dataclasses.replace(s, weight=float(n)) for s, n in zip(out.sources, records.source_sizes)))
    return out


# ----------------------------------------------------------------------------- build


class _Progress:
    def __init__(self, total_docs: int, done_docs: int, every_s: float = 5.0):
        self.total, self.start_done, self.every = total_docs, done_docs, every_s
        self.t0 = self.last = time.perf_counter()
        self.tokens = 0

    def update(self, done_docs: int, tokens: int, force: bool = False) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        new = done_docs - self.start_done
        dps, tps = new / dt, self.tokens / dt
        left = self.total - done_docs
        eta = f"{left / dps:.0f}s" if dps > 0 else "?"
        print(f"[cache] {done_docs}/{self.total} docs, {self.tokens} tokens this run, "
              f"{dps:.1f} docs/s, {tps:.0f} tokens/s, ETA {eta}", file=sys.stderr, flush=True)


def _any_across_processes(flags: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(flags)).any(0)


def build_cache(cfg, *, max_batches: int | None = None, flush_tokens: int | None = None,
                commit_every_s: float | None = None, spec_overrides: dict | None = None,
                progress_every_s: float = 5.0) -> Path:
    """Build (or resume) the teacher cache of run config ``cfg`` at ``cfg.teacher.cache``.

    ``max_batches`` stops after that many batches of this process (the cache stays resumable
    and is not finalized unless the data ran out). ``spec_overrides``: extra
    :class:`CacheSpec` fields (``scalar_dtype``, ``chunk_rows``, ``shard_rows``, ...).
    Returns the cache path.
    """
    from distill_jax import data as D
    from distill_jax import sharding
    from distill_jax.data.records import read_records
    from distill_jax.tokenizer import load_tokenizer
    from distill_jax.train import build

    if cfg.teacher is None or not getattr(cfg.teacher, "cache", None):
        raise ValueError("set teacher.cache (the cache directory) and a teacher section to build a cache")
    path = Path(cfg.teacher.cache)
    cache_cfg = getattr(cfg, "cache", None)
    k = int(getattr(cache_cfg, "k", 64))
    encoding = getattr(cache_cfg, "logprob_encoding", "bf16")
    temperature = float(getattr(cache_cfg, "temperature", 1.0))
    if commit_every_s is None:
        commit_every_s = float(os.environ.get("DISTILL_JAX_CACHE_COMMIT_S", "30"))
    pi, pc = jax.process_index(), jax.process_count()

    # Mesh and teacher, as train.loop.run builds them.
    mesh, rules = build.make_mesh(cfg.mesh)
    teacher = build.load_model(cfg.teacher, mesh, rules)
    vocab = teacher.config.vocab_size
    tokenizer = load_tokenizer(cfg.tokenizer_path())

    # Data: every doc_id once, in document (mixture-position) order.
    data_cfg = cache_data_config(cfg)
    if data_cfg.batch_size % pc:
        raise ValueError(f"cache batch size {data_cfg.batch_size} does not divide over {pc} processes")
    records = read_records(data_cfg)
    if not (records.source_counts == records.source_sizes).all():
        raise AssertionError("cache data config does not cover every document once")
    per_epoch = (records.num_docs - pi + pc - 1) // pc
    owned = [records.locate(q * pc + pi, 0) for q in range(per_epoch)]
    local_doc = owned  # local document index -> doc_id
    explicit = len(data_cfg.sources) > 1

    spec = CacheSpec(k=k, vocab_size=vocab, logprob_encoding=encoding, temperature=temperature,
                     **(spec_overrides or {}))
    manifest = Manifest(spec, teacher=teacher_identity(cfg.teacher, teacher.config),
                        tokenizer_hash=tokenizer_fingerprint(tokenizer),
                        dataset_fingerprint=dataset_fingerprint(cfg.data),
                        extra={"seq_len": data_cfg.seq_len, "builder": "distill_jax.cache.build"})
    writer = CacheWriter(str(path), manifest, num_docs=records.num_docs, process_index=pi,
                         process_count=pc, flush_tokens=flush_tokens or spec.shard_rows,
                         owned_doc_ids=owned if explicit else None)

    word_mask = word_start_mask(tokenizer, vocab)
    fn = make_teacher_fn(teacher.config, k, temperature, word_mask,
                         chunk_tokens=getattr(cfg.loss, "chunk_size", 512))
    batch_sh = sharding.batch_sharding(mesh, 2, rules)
    step = jax.jit(fn)
    in_keys = ("tokens", "positions", "segment_ids", "targets")
    rows = data_cfg.batch_size // pc
    row_mult = max(1, mesh.devices.size // pc)  # rows are padded to shard over the local devices

    it = D.make_iterator(data_cfg, tokenizer, process_index=pi, process_count=pc, records=records)
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    seen: set[int] = set()
    done_count = sum(writer.is_done(d) for d in owned)
    progress = _Progress(len(owned), done_count, progress_every_s)
    last_commit = time.perf_counter()
    batches = 0
    exhausted = False
    try:
        while max_batches is None or batches < max_batches:
            batch = next(it, None)
            if batch is None:
                exhausted = True
            work = False
            if batch is not None:
                ids_in = np.unique(batch["doc_ids"][batch["doc_ids"] >= 0])
                seen.update(ids_in.tolist())
                work = any(not writer.is_done(int(d)) for d in ids_in)
            more, any_work = _any_across_processes(np.array([batch is not None, work]))
            if not more:
                break
            batches += batch is not None
            if any_work:
                local = batch if batch is not None else {
                    key: np.zeros((rows, data_cfg.seq_len), np.int32) for key in in_keys}
                args = [jax.make_array_from_process_local_data(batch_sh, _pad_rows(local[key], row_mult))
                        for key in in_keys]
                out = step(teacher.params, *args)
                if work:
                    host = {name: _to_host(v, mesh, batch_sh)[:rows] for name, v in out.items()}
                    _collect(batch, host, writer, pending)
            if batch is None:
                continue
            # Which document (if any) continues into the next batch.
            state = it.get_state()
            open_doc = local_doc[state["doc_index"]] if state["token_offset"] > 0 else None
            ntok = 0
            for d in [d for d in pending if d != open_doc]:
                ntok += _write_doc(writer, d, pending.pop(d))
                done_count += 1
            now = time.perf_counter()
            if now - last_commit >= commit_every_s:
                writer.flush()
                last_commit = now
            progress.update(done_count, ntok)
        if exhausted:
            if pending:
                raise AssertionError(f"documents {sorted(pending)[:5]} incomplete at the end of the data")
            skipped = [d for d in owned if d not in seen and not writer.is_done(d)]
            for d in skipped:  # empty or skipped-bad documents: present with 0 tokens
                _write_doc(writer, d, [])
            if skipped:
                print(f"[cache] {len(skipped)} documents had no tokens (empty or bad records); "
                      "stored with 0 tokens", file=sys.stderr)
            writer.finalize()
        else:
            writer.flush()
        progress.update(sum(writer.is_done(d) for d in owned), 0, force=True)
    finally:
        writer.flush()
        it.close()
    return path


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


def _collect(batch, host, writer: CacheWriter, pending: dict) -> None:
    """Append this batch's rows of not-yet-committed documents to their pending pieces."""
    d = batch["doc_ids"].reshape(-1)
    sel = np.flatnonzero(d >= 0)
    if not len(sel):
        return
    d = d[sel]
    order = np.argsort(d, kind="stable")
    sel, d = sel[order], d[order]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    ends = np.r_[starts[1:], len(d)]
    offs = batch["doc_offsets"].reshape(-1)
    flat = {name: v.reshape((-1,) + v.shape[2:]) for name, v in host.items()}
    for s, e in zip(starts, ends):
        doc = int(d[s])
        if writer.is_done(doc):
            continue
        idx = sel[s:e]
        piece = {name: v[idx] for name, v in flat.items()}
        piece["offsets"] = offs[idx]
        pending.setdefault(doc, []).append(piece)


def _write_doc(writer: CacheWriter, doc: int, pieces: list[dict[str, np.ndarray]]) -> int:
    names = ("topk_ids", "topk_logprobs", "actual_logprob", "tail_logmass", "boundary_logmass")
    k = writer.spec.k
    if not pieces:
        arrays = {"topk_ids": np.zeros((0, k), np.int32), "topk_logprobs": np.zeros((0, k), np.float32),
                  **{n: np.zeros(0, np.float32) for n in names[2:]}}
        writer.write_document(doc, arrays)
        return 0
    offs = np.concatenate([p["offsets"] for p in pieces])
    order = np.argsort(offs, kind="stable")
    n = len(offs)
    if not (offs[order] == np.arange(n)).all():
        raise AssertionError(f"document {doc}: token offsets are not 0..{n - 1} (missing or repeated pieces)")
    arrays = {name: np.concatenate([p[name] for p in pieces])[order] for name in names}
    arrays["actual_logprob"] = arrays["actual_logprob"].copy()
    arrays["actual_logprob"][-1] = 0.0  # the last token has no next token
    writer.write_document(doc, arrays)
    return n
