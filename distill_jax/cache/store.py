"""On-disk teacher cache: ragged per-document teacher outputs in tensorstore zarr v3.

Layout of a cache directory ``PATH``::

    PATH/manifest.json                      # Manifest, written atomically (tmp + rename)
    PATH/part-00000-of-00002/               # one part per writing process
        journal.bin                         # committed document index (the "offsets array")
        LOCK                                # held by the part's one writer (flock)
        topk_ids/  [topk_ids_hi/]           # zarr v3 arrays, flat over the part's tokens
        topk_logprobs/
        actual_logprob/  tail_logmass/  boundary_logmass/
        DONE.json                           # written by CacheWriter.finalize()

Every per-token array has the part's token count as its first dimension (ragged per document:
document ``d`` occupies rows ``[start, start + length)`` of its part). Arrays are zarr v3 with
the ``sharding_indexed`` codec (shards of ``shard_rows`` tokens, inner chunks of ``chunk_rows``)
and blosc-zstd compression (byte shuffle), each compressed chunk followed by its crc32c. One
cache serves any packing and sequence length: the data pipeline's ``doc_ids`` / ``doc_offsets``
index it directly (:meth:`CacheReader.read_tokens`).

Row ``t`` of a document is the teacher's next-token distribution after tokens ``0..t`` (at the
manifest's temperature): it predicts token ``t+1``. ``actual_logprob[t]`` is the log-prob of
token ``t+1``; for the last token of a document there is no next token and the caller stores 0.

Encodings (format version 3; ``k`` = top-k, ``V`` = vocabulary size)
--------------------------------------------------------------------
A row's top-k entries are stored **in ascending id order**, and read back in that order: the k
ids of a token are a set, and a sorted set costs far less than a ranked list (``log2 C(V, k)``
bits instead of ``log2(V! / (V-k)!)``, about ``k (log2(V/k) + 1.44)`` instead of ``k log2 V``).
Every consumer of the top-k (the sparse losses) is order-independent.

* ``topk_ids``: the gaps ``g_0 = id_0``, ``g_i = id_i - id_{i-1} - 1`` (ids must be distinct
  within a row), as uint8 if ``V <= 256``, uint16 if ``V <= 65,536``; above that the low 16
  bits go to ``topk_ids`` (uint16) and ``g >> 16`` to ``topk_ids_hi`` (uint8 up to ``V = 2**24``,
  else uint16; almost all zeros, so it compresses to almost nothing). Supported up to ``V = 2**31``.
* ``topk_logprobs``, one of (:attr:`CacheSpec.logprob_encoding`):
  - ``"q8"`` (default): one byte per entry, a KL-budgeted quantisation of ``x = -logprob``.
    The step is ``s(x) = min(s0 exp(x / 2), 1 nat)`` -- uniform in ``sqrt(p)`` for likely tokens,
    1 nat for unlikely ones -- so every entry adds at most ``s0**2 / 24`` to the expected KL of
    the decoded distribution, whatever its probability: the expected ``KL(exact || decoded)`` of
    a row's ``k + 1`` outcomes (top-k plus tail) is at most about ``k s0**2 / 24`` (reached by
    flat rows, whose entries all lie where the step is below 1 nat), and ``s0`` is chosen so that
    this, with 10% to spare, is ``q8_kl`` (default 5e-4 nats; :attr:`CacheSpec.q8_kl_bound` is
    the bound achieved, larger than ``q8_kl`` only when 255 levels covering 30 nats cannot meet
    it, i.e. for k above about 250). A code decodes to the middle of the values it stands for.
    Code 255 is ``-inf`` (probability exactly 0, e.g. when k = V); log-probs below the last
    level (at least 30 nats down) decode as that level.
  - ``"bf16"``: bfloat16 (log-probs rounded to 8 significant bits).
  - ``"f32"``: float32, exact; for checks that need full precision.
* ``actual_logprob``, ``tail_logmass``, ``boundary_logmass``: float32 (default) or bfloat16
  (``CacheSpec.scalar_dtype``).

Tail convention (``Manifest.tail_convention``, default ``"log1m_topk_mass"``):
``tail_logmass = log(1 - sum(exp(topk_logprobs)))`` over the teacher's full-precision
distribution at the manifest temperature; ``-inf`` when the top-k hold all the mass (k = V).
``boundary_logmass = log(sum of p(next) over tokens that start a new word or are special))``.

Raw bytes/token before compression: ``k * (id_bytes + lp_bytes) + 3 * scalar_bytes``; e.g.
k=128, V=151,936, q8, float32 scalars: ``128 * (2 + 1 + 1) + 12 = 524``. Measured on disk (all
files; ``benchmarks/cache_size.py``), k = 16 / 64 / 128, q8: SmolLM2-135M on real text (vocab
49,152) 41 / 119 / 216 bytes/token; vocab 151,936 with frequency-skewed synthetic distributions
41 / 119 / 221 (at k=128: ids 130, log-probs 81, scalars 11), decoded within 3e-4 to 4.5e-4
nats of KL. ``bf16`` takes 25-65 bytes more at k=128. With uniformly random ids, which no real
teacher produces, k=128 takes about 264 (the id set alone then costs about 190 bytes).

Integrity
---------
Every journal record carries the crc32 of its document's stored bytes (``zlib.crc32`` over the
document's rows of each stored array in turn, in :func:`_stored_fields` order, little-endian), and
every compressed chunk its crc32c (zarr ``crc32c`` codec, checked by tensorstore on every read).
Arrays are read with ``fill_missing_data_reads=False`` (and written with
``store_data_equal_to_fill_value=True``, so no chunk is legitimately absent): a deleted shard or
chunk is an error, never a run of zeros. :func:`verify` checks every document's checksum;
:class:`CacheReader` checks a document's checksum the first time it reads any of its rows (it then
reads the whole document) and relies on the chunk checksums for later reads. Damage raises
:class:`CacheDamagedError` naming the document and the array.

Exactly-once writing (resumable, multi-process)
-----------------------------------------------
Process ``i`` of ``n`` owns the documents with ``doc_id % n == i`` (``Manifest.ownership ==
"modulo"``, the default) or exactly the ``doc_id``s it is handed (``"explicit"``:
``CacheWriter(..., owned_doc_ids=...)``, e.g. the data pipeline's shard of a multi-source mixture,
whose positions are not doc_ids), and writes only its own part directory, so processes never
coordinate; :func:`verify` checks global exactly-once coverage either way. A second writer of the
same part (two ``cache`` runs on one path) is refused (:class:`distill_jax.locking.LockedError`,
naming the holder) by an exclusive ``flock`` on the part's ``LOCK`` file, which the kernel drops
when the writer dies. A part is append-only: the writer buffers whole documents, writes their
rows at the part's current end (``committed tokens``), waits for tensorstore to finish
(durably), and only then appends one 36-byte record per document ``(doc_id, start, length,
data crc32, record crc32, magic)`` to ``journal.bin`` and fsyncs it. A document is in the cache
if and only if its journal record is valid. On restart the writer reads the journal, drops a
torn (incomplete or CRC-invalid) trailing record, resumes writing at the end of the last valid
record (overwriting any uncommitted rows), and skips every already-committed ``doc_id``
(:meth:`CacheWriter.write_document` returns ``False``). Hence a killed writer restarted on the
same path neither loses nor duplicates documents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
import tensorstore as ts

from distill_jax import fsutil
from distill_jax.locking import FileLock

FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
# teacher identity keys a builder records only when not at these values
_IDENTITY_DEFAULTS = {"quantize": "none"}
JOURNAL_NAME = "journal.bin"
DONE_NAME = "DONE.json"
LOCK_NAME = "LOCK"
TAIL_CONVENTION = "log1m_topk_mass"
SCALAR_FIELDS = ("actual_logprob", "tail_logmass", "boundary_logmass")
INPUT_FIELDS = ("topk_ids", "topk_logprobs") + SCALAR_FIELDS

_REC = struct.Struct("<qqqIII")  # doc_id, start, length, data crc32, crc32(first 28 bytes), magic
_REC_HEAD = struct.Struct("<qqqI")
_MAGIC = 0x54434A33  # "TCJ3"
_BF16 = np.dtype(ml_dtypes.bfloat16)
_Q8_NEG_INF = 255  # the q8 code of a log-prob of -inf
_Q8_MAX_STEP = 1.0  # nats: the q8 step for unlikely entries
_Q8_MIN_RANGE = 30.0  # nats: the finite q8 codes reach at least this far below log-prob 0
# Where the density of log-probs changes within a step, the rounding error's second moment exceeds
# step**2 / 12 by a few percent (measured up to 4% on flat rows); the bound allows 10%.
_Q8_SLACK = 1.1


class CacheError(ValueError):
    """A teacher cache is unusable (missing, corrupt, or does not match the run)."""


class CacheMismatchError(CacheError):
    """The cache was built for a different teacher, tokenizer, dataset or k than the run expects."""


class CacheDamagedError(CacheError):
    """Stored data is missing or does not match its checksum."""


def _damaged_fix(path: str) -> str:
    return f"the cache is damaged; run `distill-jax cache verify {path}` and rebuild the affected part"


def _short(e: BaseException) -> str:
    """One line of a (tensorstore) error, without the spec JSON it may carry."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    for cut in (" [tensorstore_spec=", " [source locations=", " [tensorstore_spec_"):
        msg = msg.split(cut)[0]
    return msg if len(msg) <= 300 else msg[:297] + "..."


# ----------------------------------------------------------------------------- spec / manifest


@dataclass(frozen=True)
class CacheSpec:
    """What is stored per teacher token and how it is encoded.

    Attributes:
      k: number of top-k entries per token (1 <= k <= vocab_size).
      vocab_size: teacher vocabulary size (ids are < vocab_size); decides the id encoding.
      logprob_encoding: ``"q8"`` (one byte, KL-budgeted; see the module docstring), ``"bf16"``
        (bfloat16) or ``"f32"`` (float32, exact; for checks that need full precision).
      q8_kl: the expected ``KL(exact || decoded)`` (nats) of a row's top-k + tail distribution
        that ``q8`` is designed for (an upper bound; measured values are below it).
      scalar_dtype: ``"float32"`` or ``"bf16"`` for the three per-token scalars.
      temperature: the temperature the teacher distribution was computed at.
      chunk_rows: tokens per compressed inner chunk (the unit a read decompresses).
      shard_rows: tokens per shard file (a multiple of chunk_rows).
      clevel: zstd level inside blosc (0-9).
      shuffle: blosc filter: "shuffle", "bitshuffle", "noshuffle" or "auto" (byte shuffle, which
        measured best or equal for every array).
    """

    k: int
    vocab_size: int
    logprob_encoding: str = "q8"
    q8_kl: float = 5e-4
    scalar_dtype: str = "float32"
    temperature: float = 1.0
    chunk_rows: int = 1024
    shard_rows: int = 65536
    clevel: int = 5
    shuffle: str = "auto"

    def __post_init__(self):
        if not 1 <= self.vocab_size <= 2**31:
            raise ValueError(f"vocab_size must be in [1, 2**31], got {self.vocab_size}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={self.vocab_size}], got {self.k}")
        if self.logprob_encoding not in ("q8", "bf16", "f32"):
            raise ValueError(f"logprob_encoding must be 'q8', 'bf16' or 'f32', got {self.logprob_encoding!r}")
        if self.scalar_dtype not in ("float32", "bf16"):
            raise ValueError(f"scalar_dtype must be 'float32' or 'bf16', got {self.scalar_dtype!r}")
        if not 0 < self.q8_kl < 1:
            raise ValueError(f"q8_kl must be in (0, 1) nats, got {self.q8_kl}")
        if not 0 <= self.clevel <= 9:
            raise ValueError(f"clevel must be in [0, 9], got {self.clevel}")
        if self.chunk_rows < 1 or self.shard_rows % self.chunk_rows:
            raise ValueError("shard_rows must be a positive multiple of chunk_rows")

    @property
    def id_encoding(self) -> str:
        """``"u8"``, ``"u16"`` or ``"u16+hi8"`` / ``"u16+hi16"`` (gaps between sorted ids)."""
        if self.vocab_size <= 2**8:
            return "u8"
        if self.vocab_size <= 2**16:
            return "u16"
        return "u16+hi8" if self.vocab_size <= 2**24 else "u16+hi16"

    @property
    def q8_kl_bound(self) -> float:
        """The expected-KL bound (nats) the ``q8`` levels achieve for this k (see ``q8_kl``)."""
        return _q8_quantizer(self.k, self.q8_kl).kl_bound

    def raw_bytes_per_token(self) -> float:
        """Bytes per token before compression."""
        id_b = {"u8": 1, "u16": 2, "u16+hi8": 3, "u16+hi16": 4}[self.id_encoding]
        lp_b = {"q8": 1, "bf16": 2, "f32": 4}[self.logprob_encoding]
        sc = 4 if self.scalar_dtype == "float32" else 2
        return self.k * (id_b + lp_b) + 3 * sc


@dataclass(frozen=True)
class Manifest:
    """Everything that decides whether a cache can serve a run; stored as ``manifest.json``.

    ``teacher`` identifies the teacher (e.g. ``{"name": ..., "config_hash": ..., "weights_hash": ...}``,
    strings given by the caller). ``tokenizer_hash`` is :func:`distill_jax.tokenizer.tokenizer_fingerprint`
    of the teacher tokenizer; ``dataset_fingerprint`` identifies the documents and their order.
    ``window``: the teacher saw each document in windows of this many tokens (``[0, W)``,
    ``[W, 2W)``, ... each with positions from 0), or None when the writer does not say.
    ``num_docs`` and ``process_count`` are filled in by :class:`CacheWriter`.
    """

    spec: CacheSpec
    teacher: Mapping[str, str]
    tokenizer_hash: str
    dataset_fingerprint: str
    num_docs: int = -1
    process_count: int = -1
    tail_convention: str = TAIL_CONVENTION
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    ownership: str = "modulo"  # "modulo" (doc_id % process_count) or "explicit" (owned_doc_ids)
    window: int | None = None

    def to_json(self) -> str:
        spec = self.spec
        d = {
            "format_version": self.format_version,
            "teacher": dict(self.teacher),
            "tokenizer_hash": self.tokenizer_hash,
            "dataset_fingerprint": self.dataset_fingerprint,
            "num_docs": self.num_docs,
            "process_count": self.process_count,
            "tail_convention": self.tail_convention,
            "ownership": self.ownership,
            "window": self.window,
            "spec": dataclasses.asdict(spec),
            "encodings": {  # derived, for humans and other readers
                "topk_order": "ascending id",
                "topk_ids": spec.id_encoding + " gaps",
                "topk_logprobs": spec.logprob_encoding,
                "scalars": spec.scalar_dtype,
                "q8_kl_bound": spec.q8_kl_bound if spec.logprob_encoding == "q8" else None,
                "raw_bytes_per_token": spec.raw_bytes_per_token(),
                "compression": f"blosc-zstd{spec.clevel}-shuffle, sharding_indexed",
            },
            "extra": dict(self.extra),
        }
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str = "") -> "Manifest":
        d = json.loads(text)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            where = f" at {path!r}" if path else ""
            raise CacheError(
                f"the teacher cache{where} has format_version {version}, but this code reads only version "
                f"{FORMAT_VERSION} (version 3 adds per-document checksums); rebuild the cache: delete the "
                f"directory and run the `cache` subcommand again")
        return cls(
            spec=CacheSpec(**d["spec"]), teacher=d["teacher"], tokenizer_hash=d["tokenizer_hash"],
            dataset_fingerprint=d["dataset_fingerprint"], num_docs=d["num_docs"],
            process_count=d["process_count"], tail_convention=d["tail_convention"],
            format_version=d["format_version"], extra=d.get("extra", {}),
            ownership=d.get("ownership", "modulo"), window=d.get("window"))


def read_manifest(path: str) -> Manifest:
    """The :class:`Manifest` of the cache at ``path``; raises :class:`CacheError` if there is none
    or it has another format version."""
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(mpath):
        raise CacheError(f"no teacher cache at {path!r} ({MANIFEST_NAME} missing); build it with the "
                         "`cache` subcommand first")
    with open(mpath) as f:
        return Manifest.from_json(f.read(), path)


# ----------------------------------------------------------------------------- encodings


@dataclass(frozen=True)
class _Q8:
    """The q8 companding of ``x = -logprob >= 0`` into codes 0..254 (255 is -inf).

    ``u(x) = (2 / s0) (1 - exp(-x / 2))`` up to ``x_c`` (where the step ``s0 exp(x / 2)`` reaches
    ``_Q8_MAX_STEP``), then linear with step ``_Q8_MAX_STEP``; code = round(u(x)); a code decodes
    to the middle of its interval of x.
    """

    s0: float
    x_c: float
    u_c: float
    kl_bound: float
    table: np.ndarray  # (256,) float32: code -> decoded log-prob


def _q8_codes_needed(s0: float) -> float:
    x_c = 2 * math.log(_Q8_MAX_STEP / s0)
    return 2 / s0 - 2 / _Q8_MAX_STEP + (_Q8_MIN_RANGE - x_c) / _Q8_MAX_STEP


@functools.lru_cache(maxsize=64)
def _q8_quantizer(k: int, kl: float) -> _Q8:
    s0 = math.sqrt(24 * kl / (_Q8_SLACK * k))
    if s0 >= _Q8_MAX_STEP / 2:
        s0 = _Q8_MAX_STEP / 2
    if _q8_codes_needed(s0) > _Q8_NEG_INF - 1:  # too fine to cover the range with 255 codes
        lo, hi = s0, _Q8_MAX_STEP / 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _q8_codes_needed(mid) > _Q8_NEG_INF - 1 else (lo, mid)
        s0 = hi
    x_c = 2 * math.log(_Q8_MAX_STEP / s0)
    u_c = 2 / s0 - 2 / _Q8_MAX_STEP

    def x_of(u):  # the inverse of u(x)
        u = np.clip(u, 0.0, None)
        return np.where(u <= u_c, -2 * np.log1p(-np.minimum(u, u_c) * s0 / 2), x_c + (u - u_c) * _Q8_MAX_STEP)

    # Each code decodes to the middle (in x) of the x it stands for (least squared error); the
    # last finite code, which also stands for everything beyond, to its own level.
    c = np.arange(_Q8_NEG_INF, dtype=np.float64)
    x = (x_of(c - 0.5) + x_of(c + 0.5)) / 2
    x[-1] = x_of(c[-1])
    table = np.append(-x, -np.inf).astype(np.float32)
    return _Q8(s0=s0, x_c=x_c, u_c=u_c, kl_bound=_Q8_SLACK * k * s0 * s0 / 24, table=table)


def _q8_encode(q: _Q8, lps: np.ndarray) -> np.ndarray:
    x = np.maximum(-lps.astype(np.float32), 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        u = np.where(x <= q.x_c, (2 / q.s0) * -np.expm1(-x / 2), q.u_c + (x - q.x_c) / _Q8_MAX_STEP)
    codes = np.rint(np.minimum(u, _Q8_NEG_INF - 1)).astype(np.uint8)
    codes[np.isneginf(lps)] = _Q8_NEG_INF
    return codes


def encode_rows(spec: CacheSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate, sort (by id, ascending) and encode a document's rows into stored arrays.

    ``arrays``: ``topk_ids`` (T, k) int (distinct within a row, any order), ``topk_logprobs``
    (T, k) float (the same order), ``actual_logprob``, ``tail_logmass``, ``boundary_logmass`` (T,).
    """
    missing = [f for f in INPUT_FIELDS if f not in arrays]
    if missing:
        raise ValueError(f"document arrays lack {missing}; need {list(INPUT_FIELDS)}")
    ids = np.asarray(arrays["topk_ids"])
    lps = np.asarray(arrays["topk_logprobs"], np.float32)
    t = ids.shape[0]
    if ids.ndim != 2 or ids.shape != (t, spec.k) or lps.shape != (t, spec.k):
        raise ValueError(f"topk_ids/topk_logprobs must have shape (T, k={spec.k}), got "
                         f"{ids.shape} and {lps.shape}")
    if t and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise ValueError(f"topk_ids outside [0, vocab_size={spec.vocab_size})")
    if np.isnan(lps).any():
        raise ValueError("topk_logprobs contain NaN")
    ids = ids.astype(np.int64)
    if t and spec.k > 1:
        if not (ids[:, 1:] > ids[:, :-1]).all():
            order = np.argsort(ids, axis=1)
            ids = np.take_along_axis(ids, order, 1)
            lps = np.take_along_axis(lps, order, 1)
            if not (ids[:, 1:] > ids[:, :-1]).all():
                row = int(np.flatnonzero((ids[:, 1:] <= ids[:, :-1]).any(1))[0])
                raise ValueError(f"topk_ids repeat an id in row {row}; the top-k ids of a token must "
                                 "be distinct")
    gaps = ids.copy()
    gaps[:, 1:] -= ids[:, :-1] + 1
    out: dict[str, np.ndarray] = {}
    if spec.id_encoding == "u8":
        out["topk_ids"] = gaps.astype(np.uint8)
    else:
        out["topk_ids"] = (gaps & 0xFFFF).astype(np.uint16)
        if spec.id_encoding != "u16":
            out["topk_ids_hi"] = (gaps >> 16).astype(np.uint8 if spec.id_encoding == "u16+hi8" else np.uint16)
    if spec.logprob_encoding == "q8":
        out["topk_logprobs"] = _q8_encode(_q8_quantizer(spec.k, spec.q8_kl), lps)
    elif spec.logprob_encoding == "bf16":
        out["topk_logprobs"] = lps.astype(_BF16)
    else:
        out["topk_logprobs"] = lps
    sd = np.float32 if spec.scalar_dtype == "float32" else _BF16
    for f in SCALAR_FIELDS:
        v = np.asarray(arrays[f], np.float32)
        if v.shape != (t,):
            raise ValueError(f"{f} must have shape (T={t},), got {v.shape}")
        if np.isnan(v).any():
            raise ValueError(f"{f} contains NaN")
        out[f] = v.astype(sd)
    return out


def decode_ids(spec: CacheSpec, stored: Mapping[str, np.ndarray]) -> np.ndarray:
    """The top-k ids (int32, ascending within a row) from the stored ``topk_ids`` (+ ``_hi``) gaps."""
    g = stored["topk_ids"].astype(np.int32)
    if "topk_ids_hi" in stored and spec.id_encoding not in ("u8", "u16"):
        g |= stored["topk_ids_hi"].astype(np.int32) << 16
    g += 1
    return np.cumsum(g, axis=-1, dtype=np.int32) - 1


def decode_rows(spec: CacheSpec, stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored arrays (leading dims arbitrary) -> ids int32 (ascending within a row), log-probs
    (in the ids' order) and scalars float32."""
    out = {"topk_ids": decode_ids(spec, stored)}
    lp = stored["topk_logprobs"]
    if spec.logprob_encoding == "q8":
        out["topk_logprobs"] = _q8_quantizer(spec.k, spec.q8_kl).table[lp]
    else:
        out["topk_logprobs"] = lp.astype(np.float32)
    for f in SCALAR_FIELDS:
        out[f] = stored[f].astype(np.float32)
    return out


def _stored_fields(spec: CacheSpec) -> dict[str, tuple[str, int | None]]:
    """Stored array name -> (zarr data_type, inner width or None for a 1-D array)."""
    f: dict[str, tuple[str, int | None]] = {
        "topk_ids": ("uint8" if spec.id_encoding == "u8" else "uint16", spec.k)}
    if spec.id_encoding.startswith("u16+"):
        f["topk_ids_hi"] = ("uint8" if spec.id_encoding == "u16+hi8" else "uint16", spec.k)
    f["topk_logprobs"] = ({"q8": "uint8", "bf16": "bfloat16", "f32": "float32"}[spec.logprob_encoding],
                          spec.k)
    for s in SCALAR_FIELDS:
        f[s] = ("float32" if spec.scalar_dtype == "float32" else "bfloat16", None)
    return f


_TYPESIZE = {"uint8": 1, "uint16": 2, "bfloat16": 2, "float32": 4}


def _shuffle(spec: CacheSpec, path: str) -> str:
    # Measured (k=128; SmolLM2 on real text and synthetic V=151,936): byte shuffle is as good as
    # or better than bit shuffle for every array (ids' gap planes, q8 codes, bf16, scalars).
    del path
    return "shuffle" if spec.shuffle == "auto" else spec.shuffle


def _zarr_spec(path: str, spec: CacheSpec, dtype: str, width: int | None, create: bool,
               write: bool = False) -> dict:
    """The tensorstore spec of one stored array. Readers (``write=False``) get an error for a
    missing chunk instead of the fill value; writers store every chunk, even all-zero ones."""
    kv = {"driver": "file", "path": path}
    opts = {"store_data_equal_to_fill_value": True} if write else {"fill_missing_data_reads": False}
    if not create:
        return {"driver": "zarr3", "kvstore": kv, "open": True, **opts}
    tail = [] if width is None else [width]
    return {
        "driver": "zarr3", "kvstore": kv, "open": True, "create": True, **opts,
        "metadata": {
            "shape": [0] + tail, "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [spec.shard_rows] + tail}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [spec.chunk_rows] + tail,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "blosc", "configuration": {
                               "cname": "zstd", "clevel": spec.clevel, "shuffle": _shuffle(spec, path),
                               "typesize": _TYPESIZE[dtype], "blocksize": 0}},
                           {"name": "crc32c"}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                 {"name": "crc32c"}],
                "index_location": "end"}}],
        },
    }


def _open_array(part_dir: str, name: str, spec: CacheSpec, *, create: bool = False,
                write: bool = False) -> ts.TensorStore:
    """Open (or create) stored array ``name`` of a part; tensorstore errors become one short line."""
    dt, w = _stored_fields(spec)[name]
    apath = os.path.join(part_dir, name)
    try:
        return ts.open(_zarr_spec(apath, spec, dt, w, create, write)).result()
    except Exception as e:  # noqa: BLE001 -- tensorstore's errors carry kilobytes of spec JSON
        root = os.path.dirname(os.path.normpath(part_dir))
        raise CacheDamagedError(f"{apath}: cannot open the array ({_short(e)}); {_damaged_fix(root)}") from e


def _rows_crc(spec: CacheSpec, stored: Mapping[str, np.ndarray], lo: int = 0, hi: int | None = None) -> int:
    """crc32 of rows ``[lo, hi)`` of every stored array, in ``_stored_fields`` order: a
    document's checksum when the rows are the document's."""
    crc = 0
    for name in _stored_fields(spec):
        crc = zlib.crc32(np.ascontiguousarray(stored[name][lo:hi]).view(np.uint8), crc)
    return crc


# ----------------------------------------------------------------------------- journal


def _pack_records(doc_ids, starts, lengths, crcs) -> bytes:
    out = bytearray()
    for d, s, n, c in zip(doc_ids, starts, lengths, crcs):
        head = _REC_HEAD.pack(int(d), int(s), int(n), int(c))
        out += head + struct.pack("<II", zlib.crc32(head), _MAGIC)
    return bytes(out)


def _read_journal(path: str) -> tuple[np.ndarray, int, list[str]]:
    """-> (records (n, 4) int64 [doc_id, start, length, data crc32], valid byte length, problems).

    Reads the longest valid prefix. A torn tail (partial or CRC-invalid *last* record) is what a
    killed writer leaves and is not a problem; an invalid record followed by more data is.
    """
    if not os.path.exists(path):
        return np.zeros((0, 4), np.int64), 0, []
    with open(path, "rb") as f:
        data = f.read()
    recs, problems = [], []
    n_full = len(data) // _REC.size
    for i in range(n_full):
        d, s, n, dcrc, crc, magic = _REC.unpack_from(data, i * _REC.size)
        if magic != _MAGIC or crc != zlib.crc32(data[i * _REC.size: i * _REC.size + _REC_HEAD.size]):
            if i < n_full - 1:
                problems.append(f"{path}: journal record {i} of {n_full} is corrupt (bad CRC/magic)")
            break
        recs.append((d, s, n, dcrc))
    arr = np.array(recs, np.int64).reshape(-1, 4)
    return arr, len(arr) * _REC.size, problems


def _part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def _manifest_diff(old: Manifest, new: Manifest) -> str:
    """``key (existing X, new Y), ...`` for the manifest fields that differ (nested as a.b)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(json.loads(old.to_json())), flat(json.loads(new.to_json()))
    short = lambda v: (r := repr(v)) if len(repr(v)) <= 40 else r[:37] + "..."  # noqa: E731
    diffs = [f"{k} (existing {short(a.get(k))}, new {short(b.get(k))})"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith("encodings.")]
    return ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes this process's documents into a cache; resumable and exactly-once.

    Usage::

        with CacheWriter(path, manifest, num_docs=n, process_index=i, process_count=c) as w:
            for doc_id in w.pending_doc_ids():
                w.write_document(doc_id, teacher_outputs(doc_id))
            w.finalize()

    ``arrays`` for a document of T tokens: ``topk_ids`` (T, k) int, ``topk_logprobs`` (T, k) float
    (distinct ids in any order; stored and read back in ascending id order), ``actual_logprob``,
    ``tail_logmass``, ``boundary_logmass`` (T,) float. Documents are buffered and committed once ``flush_tokens``
    tokens are buffered, on :meth:`flush`, :meth:`finalize` or leaving the ``with`` block.
    Buffered, uncommitted documents are lost if the process dies and are written again on restart
    (they stay in :meth:`pending_doc_ids`).

    The writer holds its part's ``LOCK`` from construction to :meth:`close` (or the end of the
    ``with`` block): a second writer of the same part raises
    :class:`~distill_jax.locking.LockedError` naming this one.
    """

    def __init__(self, path: str, manifest: Manifest, *, num_docs: int, process_index: int = 0,
                 process_count: int = 1, flush_tokens: int | None = None,
                 owned_doc_ids: Iterable[int] | None = None):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if owned_doc_ids is not None:
            manifest = dataclasses.replace(manifest, ownership="explicit")
            owned = np.unique(np.asarray(list(owned_doc_ids), np.int64))
            if len(owned) and (owned[0] < 0 or owned[-1] >= num_docs):
                raise ValueError(f"owned_doc_ids outside [0, {num_docs})")
            self._owned: set[int] | None = set(owned.tolist())
            self._owned_sorted = owned.tolist()
        else:
            self._owned = None
        self.path = path
        self.manifest = dataclasses.replace(manifest, num_docs=int(num_docs), process_count=int(process_count))
        self.spec = self.manifest.spec
        self.process_index, self.process_count = process_index, process_count
        self.num_docs = int(num_docs)
        self.flush_tokens = flush_tokens or self.spec.shard_rows
        os.makedirs(path, exist_ok=True)
        mpath = os.path.join(path, MANIFEST_NAME)
        if not os.path.exists(mpath):
            fsutil.write_atomic(mpath, self.manifest.to_json().encode())  # racing writers write identical bytes
        existing = read_manifest(path)
        if existing.to_json() != self.manifest.to_json():
            raise CacheMismatchError(
                f"{path!r} already holds a teacher cache with a different manifest "
                f"({_manifest_diff(existing, self.manifest)}); resume only with the same teacher, tokenizer, "
                f"dataset, spec, num_docs and process_count, or write to a new path")
        part = _part_name(process_index, process_count)
        self.part_dir = os.path.join(path, part)
        os.makedirs(self.part_dir, exist_ok=True)
        self._lock = FileLock(os.path.join(self.part_dir, LOCK_NAME),
                              what=f"teacher cache {part} of {path}").acquire()
        try:
            self._open_part()
        except BaseException:
            self._lock.release()
            raise
        self._buf: list[tuple[int, dict[str, np.ndarray]]] = []
        self._buf_ids: set[int] = set()
        self._buf_tokens = 0

    def _open_part(self) -> None:
        self._journal_path = os.path.join(self.part_dir, JOURNAL_NAME)
        recs, valid_len, problems = _read_journal(self._journal_path)
        if problems:
            raise CacheDamagedError("; ".join(problems) + f" -- the cache part is damaged; delete "
                                    f"{self.part_dir} and run `cache` again to rewrite its documents")
        if os.path.exists(self._journal_path) and os.path.getsize(self._journal_path) != valid_len:
            with open(self._journal_path, "r+b") as f:  # drop a torn tail record
                f.truncate(valid_len)
                os.fsync(f.fileno())
        self._done = set(int(d) for d in recs[:, 0])
        self._end = int(recs[-1, 1] + recs[-1, 2]) if len(recs) else 0
        self._stores = {}
        for name, (dt, w) in _stored_fields(self.spec).items():
            apath = os.path.join(self.part_dir, name)
            exists = os.path.exists(os.path.join(apath, "zarr.json"))  # the part is locked: no race
            store = _open_array(self.part_dir, name, self.spec, create=not exists, write=True)
            if store.dtype.name != dt or tuple(store.domain.exclusive_max[1:]) != (() if w is None else (w,)):
                raise CacheError(f"{apath}: existing array is {store.dtype.name}{tuple(store.domain.exclusive_max)}, "
                                 f"expected {dt}; delete {self.part_dir} and run `cache` again to rewrite it")
            self._stores[name] = store

    # -- bookkeeping
    def owns(self, doc_id: int) -> bool:
        if self._owned is not None:
            return int(doc_id) in self._owned
        return 0 <= doc_id < self.num_docs and doc_id % self.process_count == self.process_index

    def is_done(self, doc_id: int) -> bool:
        """Whether ``doc_id`` is committed (durably in the cache)."""
        return int(doc_id) in self._done

    @property
    def committed_tokens(self) -> int:
        return self._end

    @property
    def committed_documents(self) -> int:
        return len(self._done)

    def pending_doc_ids(self) -> list[int]:
        """This process's documents not yet committed or buffered, ascending."""
        ids = (self._owned_sorted if self._owned is not None
               else range(self.process_index, self.num_docs, self.process_count))
        return [d for d in ids if d not in self._done and d not in self._buf_ids]

    # -- writing
    def write_document(self, doc_id: int, arrays: Mapping[str, np.ndarray]) -> bool:
        """Buffer one whole document; returns False (and does nothing) if it is already written."""
        doc_id = int(doc_id)
        if not self._lock.held:
            raise CacheError(f"{self.part_dir}: the writer is closed")
        if not self.owns(doc_id):
            raise ValueError(f"doc {doc_id} does not belong to process {self.process_index} of "
                             f"{self.process_count} (or is outside [0, {self.num_docs}))")
        if doc_id in self._done or doc_id in self._buf_ids:
            return False
        enc = encode_rows(self.spec, arrays)
        self._buf.append((doc_id, enc))
        self._buf_ids.add(doc_id)
        self._buf_tokens += len(enc["topk_ids"])
        if self._buf_tokens >= self.flush_tokens:
            self.flush()
        return True

    def write_batch(self, doc_ids: Iterable[int], arrays_list: Iterable[Mapping[str, np.ndarray]]) -> int:
        """Write several whole documents; returns how many were new."""
        return sum(self.write_document(d, a) for d, a in zip(doc_ids, arrays_list))

    def flush(self) -> None:
        """Write the buffered documents' rows, wait for them to be durable, then commit them."""
        if not self._buf:
            return
        lengths = [len(e["topk_ids"]) for _, e in self._buf]
        start, new_end = self._end, self._end + sum(lengths)
        try:
            futures = []
            for name, store in self._stores.items():
                if store.domain.exclusive_max[0] < new_end:
                    store = store.resize(exclusive_max=[new_end] + list(store.domain.exclusive_max[1:]),
                                         expand_only=True).result()
                    self._stores[name] = store
                if new_end > start:
                    data = np.concatenate([e[name] for _, e in self._buf])
                    futures.append(store[start:new_end].write(data))
            for fut in futures:
                fut.result()  # durable before the journal says so
        except Exception as e:  # noqa: BLE001 -- tensorstore's errors carry kilobytes of spec JSON
            raise CacheError(f"{self.part_dir}: writing rows {start}..{new_end} failed ({_short(e)})") from e
        starts = start + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ids = [d for d, _ in self._buf]
        crcs = [_rows_crc(self.spec, e) for _, e in self._buf]
        with open(self._journal_path, "ab") as f:
            f.write(_pack_records(ids, starts, lengths, crcs))
            f.flush()
            os.fsync(f.fileno())
        self._done.update(ids)
        self._end = new_end
        self._buf, self._buf_ids, self._buf_tokens = [], set(), 0

    def finalize(self, *, allow_missing: bool = False) -> None:
        """Flush, trim arrays to the committed rows and mark this part complete.

        Raises if some of this process's documents are missing (unless ``allow_missing``).
        """
        self.flush()
        missing = self.pending_doc_ids()
        if missing and not allow_missing:
            raise CacheError(f"process {self.process_index}: {len(missing)} documents not written "
                             f"(first: {missing[:5]}); write them before finalize()")
        try:
            for name, store in self._stores.items():
                if store.domain.exclusive_max[0] != self._end:
                    self._stores[name] = store.resize(
                        exclusive_max=[self._end] + list(store.domain.exclusive_max[1:]),
                        resize_metadata_only=store.domain.exclusive_max[0] > self._end).result()
        except Exception as e:  # noqa: BLE001 -- tensorstore's errors carry kilobytes of spec JSON
            raise CacheError(f"{self.part_dir}: trimming the arrays to {self._end} rows failed ({_short(e)})") from e
        fsutil.write_atomic(os.path.join(self.part_dir, DONE_NAME), json.dumps(
            {"documents": len(self._done), "tokens": self._end, "missing": len(missing)}).encode())

    def close(self) -> None:
        """Commit the buffered documents and release the part's lock (idempotent)."""
        if not self._lock.held:
            return
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()  # buffered documents are complete; commit them even on error


# ----------------------------------------------------------------------------- reader


def _list_parts(path: str) -> list[str]:
    return sorted(p for p in os.listdir(path) if p.startswith("part-") and
                  os.path.isdir(os.path.join(path, p)))


class CacheReader:
    """Reads a cache written by :class:`CacheWriter` (all parts, complete or not).

    ``doc_start``, ``doc_length`` and ``doc_part`` (length ``num_docs``; -1 for a missing
    document) index the flat per-token arrays of each part; ``doc_crc`` is each document's
    checksum. The first read of any row of a document reads the whole document and checks its
    checksum; a mismatch, or a chunk that is missing or fails its own checksum, raises
    :class:`CacheDamagedError` naming the document.
    """

    def __init__(self, path: str):
        self.path = path
        self.manifest = read_manifest(path)
        self.spec = self.manifest.spec
        n = self.manifest.num_docs
        self.doc_part = np.full(n, -1, np.int32)
        self.doc_start = np.full(n, -1, np.int64)
        self.doc_length = np.full(n, -1, np.int64)
        self.doc_crc = np.zeros(n, np.int64)
        self._verified = np.zeros(n, bool)
        self.parts = _list_parts(path)
        self._stores: list[dict[str, ts.TensorStore]] = []
        for pi, part in enumerate(self.parts):
            recs, _, problems = _read_journal(os.path.join(path, part, JOURNAL_NAME))
            if problems:
                raise CacheDamagedError("; ".join(problems) + f"; {_damaged_fix(path)}")
            d = recs[:, 0]
            if len(d) and (d.min() < 0 or d.max() >= n):
                raise CacheDamagedError(f"{part}: doc_id outside [0, {n}); {_damaged_fix(path)}")
            if (self.doc_part[d] >= 0).any() or len(np.unique(d)) != len(d):
                raise CacheDamagedError(f"{part}: document written more than once; {_damaged_fix(path)}")
            self.doc_part[d], self.doc_start[d], self.doc_length[d], self.doc_crc[d] = pi, *recs.T[1:]
            self._stores.append({name: _open_array(os.path.join(path, part), name, self.spec)
                                 for name in _stored_fields(self.spec)})

    @property
    def num_docs(self) -> int:
        return self.manifest.num_docs

    @property
    def complete(self) -> bool:
        """Every document present and every part finalized."""
        return bool((self.doc_part >= 0).all()) and len(self.parts) == self.manifest.process_count and all(
            os.path.exists(os.path.join(self.path, p, DONE_NAME)) for p in self.parts)

    def check(self, *, expected_tokenizer_hash: str | None = None,
              expected_dataset_fingerprint: str | None = None, k: int | None = None,
              vocab_size: int | None = None, temperature: float | None = None,
              expected_teacher: Mapping[str, str] | None = None,
              require_complete: bool = True) -> None:
        """Raise :class:`CacheMismatchError` naming the first mismatch and how to fix it.

        ``expected_teacher``: the run's teacher identity (as the builder records it in
        ``Manifest.teacher``); every key it has but ``name`` (for messages) must hold the same
        value in the manifest, and keys recorded only when not at their default (``quantize``)
        must agree with the default where one side lacks them."""
        m, where = self.manifest, f"teacher cache {self.path!r}"
        fix = "rebuild the cache with the `cache` subcommand for this run's config, or point the run at a matching cache"
        if expected_teacher is not None:
            def get(d, key):
                return str(d.get(key, _IDENTITY_DEFAULTS.get(key)))
            keys = list(expected_teacher) + [k for k in _IDENTITY_DEFAULTS
                                             if k in m.teacher and k not in expected_teacher]
            diff = [key for key in keys
                    if key != "name" and get(m.teacher, key) != get(expected_teacher, key)]
            if diff:
                what = ", ".join(f"{key} {get(m.teacher, key)!r} vs {get(expected_teacher, key)!r}"
                                 for key in diff)
                raise CacheMismatchError(
                    f"{where} was built by teacher {m.teacher.get('name')!r} but this run's teacher is "
                    f"{expected_teacher.get('name')!r} (cache vs run: {what}); {fix}")
        if expected_tokenizer_hash is not None and m.tokenizer_hash != expected_tokenizer_hash:
            raise CacheMismatchError(
                f"{where} was built with tokenizer hash {m.tokenizer_hash} but this run's teacher tokenizer "
                f"hashes to {expected_tokenizer_hash} (token ids would not match); {fix}")
        if expected_dataset_fingerprint is not None and m.dataset_fingerprint != expected_dataset_fingerprint:
            raise CacheMismatchError(
                f"{where} was built for dataset fingerprint {m.dataset_fingerprint} but this run's data has "
                f"fingerprint {expected_dataset_fingerprint} (doc_ids would point at other documents); {fix}")
        if k is not None and m.spec.k != k:
            raise CacheMismatchError(
                f"{where} stores top-k with k={m.spec.k} but the run asks for k={k}; set the loss's k to "
                f"{m.spec.k} or {fix}")
        if vocab_size is not None and m.spec.vocab_size != vocab_size:
            raise CacheMismatchError(
                f"{where} has vocab_size {m.spec.vocab_size} but the teacher has {vocab_size}; {fix}")
        if temperature is not None and m.spec.temperature != temperature:
            raise CacheMismatchError(
                f"{where} was computed at temperature {m.spec.temperature} but the run uses {temperature}; {fix}")
        if require_complete and not self.complete:
            missing = int((self.doc_part < 0).sum())
            raise CacheError(f"{where} is incomplete ({missing} of {m.num_docs} documents missing or parts "
                             f"not finalized); resume the `cache` run on the same path to finish it")

    def _damaged(self, doc_id: int, what: str) -> CacheDamagedError:
        p, s, n = int(self.doc_part[doc_id]), int(self.doc_start[doc_id]), int(self.doc_length[doc_id])
        return CacheDamagedError(f"teacher cache {self.path!r}: document {doc_id} ({self.parts[p]}, rows "
                                 f"{s}..{s + n}): {what}; {_damaged_fix(self.path)}")

    def _read_error(self, part: int, name: str, doc_ids: np.ndarray, err: BaseException) -> CacheDamagedError:
        """The error for a failed read of array ``name`` of ``doc_ids``: the first document whose
        rows of that array cannot be read on their own, or the first of them."""
        store = self._stores[part][name]
        for d in doc_ids:
            s, n = int(self.doc_start[d]), int(self.doc_length[d])
            try:
                store[s:s + n].read().result()
            except Exception as e:  # noqa: BLE001
                return self._damaged(int(d), f"array {name} is unreadable ({_short(e)})")
        return self._damaged(int(doc_ids[0]), f"array {name} is unreadable ({_short(err)})")

    def _read_rows(self, part: int, rows: np.ndarray, doc_ids: np.ndarray, names) -> dict[str, np.ndarray]:
        """Rows ``rows`` (sorted, unique) of the stored arrays ``names`` of ``part``;
        ``doc_ids``: the documents they belong to (for error messages)."""
        stores = self._stores[part]
        if not len(rows):
            return {name: np.zeros((0,) + tuple(stores[name].domain.exclusive_max[1:]), stores[name].dtype.numpy_dtype)
                    for name in names}
        futs = {name: stores[name][rows].read() for name in names}
        out = {}
        for name, f in futs.items():
            try:
                out[name] = f.result()
            except Exception as e:  # noqa: BLE001 -- a missing chunk or a failed chunk checksum
                raise self._read_error(part, name, doc_ids, e) from e
        return out

    def _check_documents(self, doc_ids: np.ndarray, rows: np.ndarray, got: Mapping[str, np.ndarray]) -> None:
        """Check the checksums of ``doc_ids``, whose rows are all among ``rows`` (sorted) in ``got``."""
        for d, i in zip(doc_ids, np.searchsorted(rows, self.doc_start[doc_ids])):
            if _rows_crc(self.spec, got, int(i), int(i + self.doc_length[d])) != self.doc_crc[d]:
                raise self._damaged(int(d), "its data does not match its checksum")
        self._verified[doc_ids] = True

    def read_document(self, doc_id: int) -> dict[str, np.ndarray]:
        """All rows of one document, decoded: ids int32 (T, k) ascending within a row, log-probs
        (T, k) in the ids' order and scalars (T,), float32. Checks the document's checksum."""
        doc_id = int(doc_id)
        if not 0 <= doc_id < self.num_docs:
            raise IndexError(f"doc_id {doc_id} outside [0, {self.num_docs})")
        p = int(self.doc_part[doc_id])
        if p < 0:
            raise CacheError(f"document {doc_id} is not in the cache {self.path!r} (incomplete cache?)")
        s, n = int(self.doc_start[doc_id]), int(self.doc_length[doc_id])
        rows = np.arange(s, s + n)
        got = self._read_rows(p, rows, np.array([doc_id]), _stored_fields(self.spec))
        self._check_documents(np.array([doc_id]), rows, got)
        return decode_rows(self.spec, got)

    def read_tokens(self, doc_ids: np.ndarray, offsets: np.ndarray, *,
                    topk: bool = True) -> dict[str, np.ndarray]:
        """Gather the rows for a packed batch: ``doc_ids``/``offsets`` of any shape S (the batch's
        ``doc_ids``, ``doc_offsets``; ``doc_id < 0`` is padding). Returns decoded arrays of shape
        S + (k,) / S (top-k entries in ascending id order, as :meth:`read_document`), zeros on
        padding, plus ``valid`` (bool, S). ``topk=False`` returns only the per-token scalars
        (``SCALAR_FIELDS``), all cross-tokenizer ALM needs. A document seen for the first time is
        read whole (every array) and its checksum checked."""
        doc_ids = np.asarray(doc_ids, np.int64)
        offsets = np.asarray(offsets, np.int64)
        if doc_ids.shape != offsets.shape:
            raise ValueError(f"doc_ids {doc_ids.shape} and offsets {offsets.shape} differ in shape")
        shape = doc_ids.shape
        d, o = doc_ids.reshape(-1), offsets.reshape(-1)
        valid = d >= 0
        if (d >= self.num_docs).any():
            raise IndexError(f"doc_id {int(d.max())} outside [0, {self.num_docs})")
        dv = np.where(valid, d, 0)
        part = np.where(valid, self.doc_part[dv] if self.num_docs else -1, -1)
        if (valid & (part < 0)).any():
            bad = d[valid & (part < 0)][:5]
            raise CacheError(f"documents {bad.tolist()} are not in the cache {self.path!r}")
        length = self.doc_length[dv] if self.num_docs else np.zeros_like(d)
        if (valid & ((o < 0) | (o >= length))).any():
            i = int(np.flatnonzero(valid & ((o < 0) | (o >= length)))[0])
            raise IndexError(f"offset {int(o[i])} outside document {int(d[i])} of length {int(length[i])} "
                             "(the cache and the batch disagree on tokenization?)")
        rows = (self.doc_start[dv] if self.num_docs else np.zeros_like(d)) + o
        all_fields = _stored_fields(self.spec)
        fields = {name: f for name, f in all_fields.items() if topk or name in SCALAR_FIELDS}
        stored = {name: np.zeros((len(d),) + (() if w is None else (w,)),
                                 _BF16 if dt == "bfloat16" else np.dtype(dt)) for name, (dt, w) in fields.items()}
        for p in np.unique(part[valid]):
            sel = np.flatnonzero(part == p)
            docs = np.unique(d[sel])
            new = docs[~self._verified[docs]]
            need = np.unique(np.concatenate([rows[sel], *(np.arange(self.doc_start[x], self.doc_start[x] +
                                                                    self.doc_length[x]) for x in new)]))
            got = self._read_rows(int(p), need, docs, all_fields if len(new) else fields)
            if len(new):
                self._check_documents(new, need, got)
            at = np.searchsorted(need, rows[sel])
            for name in fields:
                stored[name][sel] = got[name][at]
        out = decode_rows(self.spec, stored) if topk else \
            {f: stored[f].astype(np.float32) for f in SCALAR_FIELDS}
        out = {k: np.where(valid.reshape(-1, *([1] * (v.ndim - 1))), v, 0).astype(v.dtype) for k, v in out.items()}
        out = {k: v.reshape(shape + v.shape[1:]) for k, v in out.items()}
        out["valid"] = valid.reshape(shape)
        return out


# ----------------------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    """Result of :func:`verify`. ``ok`` is True when ``errors`` is empty; ``damaged_documents``
    lists the documents whose data is missing, unreadable or fails its checksum."""

    ok: bool
    errors: list[str]
    documents: int
    missing_documents: int
    tokens: int
    bytes_on_disk: int
    bytes_per_token: float
    k: int
    manifest: Manifest | None = None
    bytes_by_array: dict[str, int] = field(default_factory=dict)
    damaged_documents: list[int] = field(default_factory=list)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _value_problem(spec: CacheSpec, name: str, stored: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with the values of stored array ``name`` (of ``stored``, a run of rows), or None."""
    raw = stored[name]
    may_be_neg_inf = name == "tail_logmass" or (name == "topk_logprobs" and spec.k == spec.vocab_size)
    if name == "topk_ids":
        ids = decode_ids(spec, stored)
        if len(ids) and ids[:, -1].max() >= spec.vocab_size:
            return f"ids >= vocab_size {spec.vocab_size}"
    elif name == "topk_logprobs" and spec.logprob_encoding == "q8":
        if not may_be_neg_inf and (raw == _Q8_NEG_INF).any():
            return f"{int((raw == _Q8_NEG_INF).sum())} -inf log-probs (only allowed when k = vocab_size)"
    elif raw.dtype in (np.float32, _BF16):
        v = raw.astype(np.float32)
        bad = np.isnan(v) | np.isposinf(v) | (np.isneginf(v) if not may_be_neg_inf else False)
        if bad.any():
            return f"{int(bad.sum())} NaN/inf values"
    return None


def _check_part_data(spec: CacheSpec, stores: Mapping[str, ts.TensorStore], recs: np.ndarray,
                     problems: list[str]) -> dict[int, str]:
    """Read every committed document of a part, in runs of about ``shard_rows`` rows; check each
    document's checksum and the values (appending value problems to ``problems``). Returns
    ``{doc_id: what is wrong}`` for the damaged documents."""
    damaged: dict[int, str] = {}
    value_seen: set[str] = set()
    i = 0
    while i < len(recs):
        j, tokens = i, 0
        while j < len(recs) and (j == i or tokens + recs[j, 2] <= spec.shard_rows):
            tokens += int(recs[j, 2])
            j += 1
        group = recs[i:j]
        i = j
        rows = np.concatenate([np.arange(s, s + n) for s, n in group[:, 1:3]])
        got: dict[str, np.ndarray] = {}
        for name, store in stores.items():
            try:
                got[name] = store[rows].read().result() if len(rows) else np.zeros(
                    (0,) + tuple(store.domain.exclusive_max[1:]), store.dtype.numpy_dtype)
            except Exception:  # noqa: BLE001 -- find the documents whose rows fail
                for d, s, n, _ in group.tolist():
                    try:
                        store[s:s + n].read().result()
                    except Exception as e:  # noqa: BLE001
                        damaged.setdefault(int(d), f"array {name} is unreadable ({_short(e)})")
        if len(got) < len(stores):
            continue
        at = 0
        for d, _, n, crc in group.tolist():
            if d not in damaged and _rows_crc(spec, got, at, at + n) != crc:
                damaged[d] = "its data does not match its checksum"
            at += n
        for name in stores:
            problem = _value_problem(spec, name, got)
            if problem and name not in value_seen:
                value_seen.add(name)
                problems.append(f"{name}: {problem} near row {int(group[0, 1])}")
    return damaged


def verify(path: str, *, check_values: bool = True, max_errors: int = 20) -> VerifyReport:
    """Check a cache end to end: manifest, per-part offsets (journal records valid, contiguous and
    monotonic, within the arrays), array shapes/dtypes, every document's data (readable, no chunk
    missing, matching its checksum), ids below vocab_size, NaN/inf in the stored values (``-inf``
    allowed in ``tail_logmass`` and in top-k log-probs only when k = vocab_size), and coverage
    (every document present exactly once, in the part that owns it). ``check_values=False``
    skips reading the data (checksums and values)."""
    errors: list[str] = []
    try:
        m = read_manifest(path)
    except Exception as e:  # noqa: BLE001
        return VerifyReport(False, [f"manifest: {_short(e)}"], 0, 0, 0,
                            _dir_bytes(path) if os.path.isdir(path) else 0, 0.0, 0)
    spec, n = m.spec, m.num_docs
    seen = np.zeros(max(n, 0), np.int64)
    tokens = 0
    damaged_all: list[int] = []
    parts = _list_parts(path)
    expected_parts = {_part_name(i, m.process_count) for i in range(m.process_count)}
    for p in parts:
        if p not in expected_parts:
            errors.append(f"{p}: unexpected part (manifest process_count={m.process_count})")
    for i in range(m.process_count):
        p = _part_name(i, m.process_count)
        pdir = os.path.join(path, p)
        if not os.path.isdir(pdir):
            errors.append(f"{p}: part missing")
            continue
        if not os.path.exists(os.path.join(pdir, DONE_NAME)):
            errors.append(f"{p}: not finalized ({DONE_NAME} missing)")
        jpath = os.path.join(pdir, JOURNAL_NAME)
        recs, valid_len, problems = _read_journal(jpath)
        errors += problems
        if os.path.exists(jpath) and os.path.getsize(jpath) != valid_len and not problems:
            errors.append(f"{p}: torn journal tail ({os.path.getsize(jpath) - valid_len} bytes)")
        d, s, ln = recs[:, 0], recs[:, 1], recs[:, 2]
        if (ln < 0).any():
            errors.append(f"{p}: negative document lengths")
        ends = s + ln
        contiguous = not (len(s) and (s[0] != 0 or (s[1:] != ends[:-1]).any()))
        if not contiguous:
            j = 0 if s[0] != 0 else int(np.flatnonzero(s[1:] != ends[:-1])[0]) + 1
            errors.append(f"{p}: offsets not contiguous/monotonic at record {j} (doc {int(d[j])}: start "
                          f"{int(s[j])}, expected {0 if j == 0 else int(ends[j - 1])})")
        inr = (d >= 0) & (d < n)
        if not inr.all():
            errors.append(f"{p}: doc_ids outside [0, {n}): {d[~inr][:5].tolist()}")
        if m.ownership == "modulo" and (d[inr] % m.process_count != i).any():
            errors.append(f"{p}: holds documents of another process")
        np.add.at(seen, d[inr], 1)
        part_tokens = int(ends.max()) if len(ends) else 0
        tokens += int(ln.clip(0).sum())
        stores: dict[str, ts.TensorStore] = {}
        for name, (dt, w) in _stored_fields(spec).items():
            try:
                st = ts.open(_zarr_spec(os.path.join(pdir, name), spec, dt, w, False)).result()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{p}/{name}: cannot open ({_short(e)})")
                continue
            shp = tuple(st.domain.exclusive_max)
            if str(st.dtype.name) != dt or (w is not None and shp[1:] != (w,)) or (w is None and len(shp) != 1):
                errors.append(f"{p}/{name}: dtype/shape {st.dtype.name}{shp}, expected {dt} (N{'' if w is None else f', {w}'})")
            elif shp[0] < part_tokens:
                errors.append(f"{p}/{name}: {shp[0]} rows but offsets need {part_tokens}")
            else:
                stores[name] = st
        if check_values and len(stores) == len(_stored_fields(spec)) and (ln >= 0).all():
            value_problems: list[str] = []
            damaged = _check_part_data(spec, stores, recs, value_problems)
            errors += [f"{p}/{v}" for v in value_problems]
            if damaged:
                first = min(damaged)
                errors.append(f"{p}: {len(damaged)} damaged documents (first: {sorted(damaged)[:5]}; document "
                              f"{first}: {damaged[first]}); delete {pdir} and run `cache` again to rebuild it")
                damaged_all += sorted(damaged)
    missing = int((seen == 0).sum())
    if missing:
        errors.append(f"coverage: {missing} of {n} documents missing (first: {np.flatnonzero(seen == 0)[:5].tolist()})")
    dup = int((seen > 1).sum())
    if dup:
        errors.append(f"coverage: {dup} documents present more than once (first: {np.flatnonzero(seen > 1)[:5].tolist()})")
    size = _dir_bytes(path)
    by_array: dict[str, int] = {}
    for p in parts:
        for name in _stored_fields(spec):
            by_array[name] = by_array.get(name, 0) + _dir_bytes(os.path.join(path, p, name))
    return VerifyReport(
        ok=not errors, errors=errors[:max_errors] + ([f"... {len(errors) - max_errors} more"] if len(errors) > max_errors else []),
        documents=int((seen > 0).sum()), missing_documents=missing, tokens=tokens, bytes_on_disk=size,
        bytes_per_token=size / tokens if tokens else 0.0, k=spec.k, manifest=m, bytes_by_array=by_array,
        damaged_documents=sorted(damaged_all))
