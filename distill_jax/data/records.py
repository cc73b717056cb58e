"""Reading records: JSONL, Parquet, Arrow IPC, ``datasets`` saved to disk or ``load_dataset``; mixtures.

Every reader is lazy and random-access: opening a source only counts its records (JSONL: one pass
over newline positions; Parquet: the footer; Arrow and ``datasets``: memory maps), and a record
is parsed and validated when it is asked for. So each process, and each tokenizer worker, reads
and decodes only the records of its own shard. Readers pickle without their open handles and
reopen lazily (Grain ships them to worker processes).

A record is addressed three ways:

* ``(file, index)``: its provenance, the record's position in its file (JSONL: among the non-empty
  lines; the line number is in error messages too);
* ``doc_id``: its position in the concatenation of all sources' files, in config order, a stable
  global document index (a per-document teacher cache is keyed by it);
* its position in the mixture of one epoch (:class:`Records`).

Mixture. With sources of ``L_s`` records and weights ``w_s``, an epoch has ``N = sum(L_s)``
records of which ``c_s`` (``N * w_s / sum(w)``, largest-remainder rounding) come from source
``s``: a source whose share equals its size contributes each of its records exactly once per
epoch; a smaller share takes a different subset every epoch, cycling through the source in a
seeded order; a larger share repeats records. The sources are interleaved by a seeded random
assignment of epoch positions (deterministic), and the pipeline shuffles globally on top.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from distill_jax.data.config import DataConfig, SourceConfig

__all__ = ["BadRecordError", "Record", "Records", "read_records"]

_JSONL_EXT = (".jsonl", ".json", ".ndjson")
_PARQUET_EXT = (".parquet", ".pq")
_ARROW_EXT = (".arrow", ".feather", ".ipc")
_GLOB_CHARS = "*?["
_NEWLINE_CHUNK = 1 << 26  # bytes scanned per numpy pass when indexing JSONL lines


class BadRecordError(ValueError):
    """A record that cannot be used: unreadable, not valid UTF-8 or JSON, a missing or mistyped field.

    Attributes:
      source: the file (or ``builder:path`` for ``load_dataset``) the record came from.
      index: the record's index in that file.
      reason: what is wrong with it.
    """

    def __init__(self, source: str, index: int, reason: str):
        self.source, self.index, self.reason = source, index, reason
        super().__init__(
            f"{source}: record {index}: {reason}. Fix or remove the record, or set "
            "data.on_bad_record=skip to skip such records (they are counted)."
        )

    def __reduce__(self):  # picklable across Grain worker processes
        return (BadRecordError, (self.source, self.index, self.reason))


class BadRow(Exception):
    """Why a raw row is unusable (the reader turns it into :class:`BadRecordError` with its
    address)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated record and where it came from.

    Attributes:
      data: the fields the configured record kind needs: ``{"text"}``, ``{"prompt", "response"}``
        or ``{"messages": [{"role", "content", ...}, ...]}``, all strings valid as UTF-8.
      source: the file it was read from.
      index: its index in that file.
      doc_id: its global document index (position in the concatenation of all sources).
    """

    data: dict[str, Any]
    source: str
    index: int
    doc_id: int


# ----------------------------------------------------------------------------------------------
# Validation


def _as_str(value: Any, what: str) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRow(f"field {what!r} is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if not isinstance(value, str):
        raise BadRow(f"field {what!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(f"field {what!r} is not valid UTF-8 (lone surrogate at character {err.start})") from None
    return value


def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise BadRow(f"missing field {name!r} (has {sorted(row)[:8]})")
    value = row[name]
    if value is None:
        raise BadRow(f"field {name!r} is null")
    return value


def validate_row(row: Any, config: DataConfig) -> dict[str, Any]:
    """The fields ``config.record`` needs, checked; raises :class:`BadRow`."""
    if not isinstance(row, dict):
        raise BadRow(f"is a JSON {type(row).__name__}, not an object")
    kind = config.record
    if kind == "text":
        return {"text": _as_str(_field(row, config.text_field), config.text_field)}
    if kind == "prompt_response" or (kind == "chat" and row.get(config.messages_field) is None
                                     and config.prompt_field in row and config.response_field in row):
        prompt = _as_str(_field(row, config.prompt_field), config.prompt_field)
        response = _as_str(_field(row, config.response_field), config.response_field)
        if kind == "prompt_response":
            return {"prompt": prompt, "response": response}
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    messages = _field(row, config.messages_field)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRow(f"field {config.messages_field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRow(f"{config.messages_field}[{i}] must be an object with 'role' and 'content'")
        m = {k: v for k, v in m.items() if v is not None}
        m["role"] = _as_str(_field(m, "role"), f"{config.messages_field}[{i}].role")
        m["content"] = _as_str(_field(m, "content"), f"{config.messages_field}[{i}].content")
        out.append(m)
    if kind == "pairs":
        if out[-1]["role"] != "assistant" or len(out) < 2:
            raise BadRow(f"a pair record's {config.messages_field!r} must end with the chosen "
                         "assistant reply after the prompt")
        return {"messages": out,
                "rejected": _as_str(_field(row, config.rejected_field), config.rejected_field)}
    return {"messages": out}


def _needed_fields(config: DataConfig) -> list[str]:
    if config.record == "text":
        return [config.text_field]
    if config.record == "prompt_response":
        return [config.prompt_field, config.response_field]
    if config.record == "pairs":
        return [config.messages_field, config.rejected_field]
    return [config.messages_field, config.prompt_field, config.response_field]


# ----------------------------------------------------------------------------------------------
# File readers: __len__, row(i) -> dict (raises BadRow), where(i) -> str


class _Reader:
    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> Any:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return f"{self.name}"


class _JsonlReader(_Reader):
    """JSON Lines: one object per non-empty line; lines indexed once with numpy, read via mmap."""

    def __init__(self, path: str):
        self.name = path
        self._mm = None
        size = os.path.getsize(path)
        starts, ends = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        if size:
            mm = self._map()
            buf = np.frombuffer(mm, np.uint8)
            newlines = [np.flatnonzero(buf[o:o + _NEWLINE_CHUNK] == 10) + o for o in range(0, size, _NEWLINE_CHUNK)]
            nl = np.concatenate(newlines).astype(np.int64)
            starts = np.concatenate([[0], nl + 1])
            ends = np.concatenate([nl, [size]])
            lengths = ends - starts
            # A line holding only "\r" (CRLF files) counts as empty.
            cr_only = np.zeros_like(lengths, bool)
            ones = np.flatnonzero(lengths == 1)
            cr_only[ones] = buf[starts[ones]] == 13
            keep = (lengths > 0) & ~cr_only
            self._line = np.flatnonzero(keep).astype(np.int64)
            self._starts, self._ends = starts[keep], ends[keep]
            del buf
        else:
            self._line = self._starts = self._ends = np.zeros(0, np.int64)

    def _map(self):
        if self._mm is None:
            with open(self.name, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}

    def __len__(self) -> int:
        return len(self._starts)

    def where(self, i: int) -> str:
        return f"{self.name} (line {int(self._line[i]) + 1})"

    def row(self, i: int) -> Any:
        raw = self._map()[int(self._starts[i]):int(self._ends[i])]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRow(f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)") from None
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            raise BadRow(f"not valid JSON ({err.msg} at column {err.colno})") from None


class _TableReader(_Reader):
    """Rows of a pyarrow Table (only the needed columns), opened lazily in each process."""

    def __init__(self, name: str, columns: Sequence[str]):
        self.name = name
        self._wanted = list(columns)
        self._table = None
        self._chunk_starts: dict[str, np.ndarray] = {}

    def _open(self):
        raise NotImplementedError

    def __getstate__(self):
        return {**self.__dict__, "_table": None, "_chunk_starts": {}}

    def _columns(self):
        if self._table is None:
            table = self._open()
            present = [c for c in self._wanted if c in table.column_names]
            self._table = table.select(present)
            for c in present:
                lengths = [len(ch) for ch in self._table.column(c).chunks]
                self._chunk_starts[c] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return self._table

    def __len__(self) -> int:
        return self._num_rows

    def row(self, i: int) -> Any:
        table = self._columns()
        out = {}
        for c in table.column_names:
            starts = self._chunk_starts[c]
            k = int(np.searchsorted(starts, i, side="right")) - 1
            out[c] = table.column(c).chunk(k)[i - int(starts[k])].as_py()
        return out


class _ArrowReader(_TableReader):
    """An Arrow IPC file (``ARROW1`` magic) or stream, memory-mapped (zero copy)."""

    def __init__(self, path: str, columns: Sequence[str]):
        super().__init__(path, columns)
        self._num_rows = self._columns().num_rows

    def _open(self):
        import pyarrow as pa

        source = pa.memory_map(self.name, "r")
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        try:
            return (pa.ipc.open_file(source) if is_file else pa.ipc.open_stream(source)).read_all()
        except pa.ArrowInvalid as err:
            raise ValueError(f"{self.name} is not an Arrow IPC file or stream ({err}); "
                             "set the source's format to match the file") from err


class _ParquetReader(_TableReader):
    """A Parquet file. Its needed columns are decoded whole (once per process) on first access."""

    def __init__(self, path: str, columns: Sequence[str]):
        import pyarrow.parquet as pq

        super().__init__(path, columns)
        self._num_rows = pq.ParquetFile(path).metadata.num_rows

    def _open(self):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.name)
        present = [c for c in self._wanted if c in pf.schema_arrow.names]
        return pf.read(columns=present)


class _HFReader(_Reader):
    """A ``datasets.Dataset`` (memory-mapped Arrow; pickles by file reference)."""

    def __init__(self, name: str, dataset, columns: Sequence[str]):
        self.name = name
        present = [c for c in columns if c in dataset.column_names]
        self._ds = dataset.select_columns(present) if present else dataset.select_columns([])
        self._num_rows = len(dataset)

    def __len__(self) -> int:
        return self._num_rows

    def row(self, i: int) -> Any:
        return self._ds[int(i)]


# ----------------------------------------------------------------------------------------------
# Sources


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or os.path.isfile(os.path.join(path, "state.json"))
    )


def _format_of(path: str) -> str:
    if _is_saved_dataset(path):
        return "saved"
    low = path.lower()
    for fmt, exts in (("jsonl", _JSONL_EXT), ("parquet", _PARQUET_EXT), ("arrow", _ARROW_EXT)):
        if low.endswith(exts):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r} from its name; set the source's format "
                     "(jsonl, parquet, arrow, saved or load_dataset)")


def _data_files(directory: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in files if not f.startswith(".")
                and f.lower().endswith(_JSONL_EXT + _PARQUET_EXT + _ARROW_EXT)]
    return sorted(out)


def expand_source(source: SourceConfig) -> list[str]:
    """The files (or saved-dataset directories) a source names, sorted."""
    path = os.path.expanduser(source.path)
    if any(ch in path for ch in _GLOB_CHARS):
        matches = sorted(globlib.glob(path, recursive=True))
        paths = [m for m in matches if os.path.isfile(m) or _is_saved_dataset(m)]
    elif _is_saved_dataset(path) or os.path.isfile(path):
        paths = [path]
    elif os.path.isdir(path):
        paths = _data_files(path)
    else:
        raise FileNotFoundError(f"data source {source.path!r} does not exist; give a file, a directory or a glob")
    if not paths:
        raise FileNotFoundError(f"data source {source.path!r} matches no data files "
                                f"(looked for {', '.join(_JSONL_EXT + _PARQUET_EXT + _ARROW_EXT)})")
    return paths


def _open_saved(path: str, split: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} holds splits {sorted(ds)}, not {split!r}; set the source's split")
        ds = ds[split]
    return ds.flatten_indices() if getattr(ds, "_indices", None) is not None else ds


def _open_source(source: SourceConfig, columns: list[str]) -> list[_Reader]:
    paths = expand_source(source)
    if source.format == "load_dataset":
        import datasets

        ds = datasets.load_dataset(source.load_dataset_builder, data_files=paths, split=source.split)
        name = f"{source.load_dataset_builder}:{source.path}"
        return [_HFReader(name, ds, columns)]
    readers: list[_Reader] = []
    for path in paths:
        fmt = _format_of(path) if source.format == "auto" else source.format
        if fmt == "jsonl":
            readers.append(_JsonlReader(path))
        elif fmt == "parquet":
            readers.append(_ParquetReader(path, columns))
        elif fmt == "arrow":
            readers.append(_ArrowReader(path, columns))
        elif fmt == "saved":
            readers.append(_HFReader(path, _open_saved(path, source.split), columns))
        else:  # pragma: no cover - Literal checked by the config loader
            raise ValueError(f"unknown format {fmt!r}")
    return readers


# ----------------------------------------------------------------------------------------------
# Records: one epoch of the mixture


def _largest_remainder(total: int, weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


class Records(Sequence[Record]):
    """The records of one epoch of the configured mixture, lazily read; see the module docstring.

    ``records[j]`` is the ``j``-th record of epoch 0 (mixture order, before the pipeline's
    shuffle) and raises :class:`BadRecordError` if it is bad; :meth:`get` addresses any epoch and
    returns the error instead of raising. Iterating yields the good records of epoch 0 and, when
    ``config.on_bad_record == "skip"``, skips bad ones and counts them in ``bad_record_count``.

    Attributes:
      num_docs: the number of distinct documents (``doc_id`` ranges over ``[0, num_docs)``).
      source_sizes: records per source (after ``max_records``).
      source_counts: records per source in one epoch of the mixture.
      bad_record_count: bad records skipped by iteration so far.
    """

    def __init__(self, config: DataConfig):
        if not config.sources:
            raise ValueError("data.sources is empty; give at least one {path: ...} source")
        self.config = config
        columns = _needed_fields(config)
        self._files: list[list[_Reader]] = []
        self._file_starts: list[np.ndarray] = []
        sizes = []
        for source in config.sources:
            readers = _open_source(source, columns)
            lengths = np.array([len(r) for r in readers], np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)])
            total = int(starts[-1])
            if config.max_records is not None:
                total = min(total, config.max_records)
            self._files.append(readers)
            self._file_starts.append(starts)
            sizes.append(total)
        self.source_sizes = np.array(sizes, np.int64)
        if not self.source_sizes.sum():
            raise ValueError(f"data sources {[s.path for s in config.sources]} hold no records")
        for s, size in enumerate(sizes):
            if size == 0:
                raise ValueError(f"data source {config.sources[s].path!r} holds no records; remove it")
        self._doc_base = np.concatenate([[0], np.cumsum(self.source_sizes)]).astype(np.int64)
        self.num_docs = int(self._doc_base[-1])
        n = self.num_docs
        if len(sizes) == 1:
            self.source_counts = self.source_sizes.copy()
            self._source_of = self._rank = None
        else:
            self.source_counts = _largest_remainder(n, [s.weight for s in config.sources])
            assignment = np.repeat(np.arange(len(sizes), dtype=np.int32), self.source_counts)
            np.random.default_rng([config.seed, 0x6D6978]).shuffle(assignment)
            order = np.argsort(assignment, kind="stable")
            group_start = np.concatenate([[0], np.cumsum(self.source_counts)[:-1]])
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n) - group_start[assignment[order]]
            self._source_of, self._rank = assignment, rank
        self.bad_record_count = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_perm_cache", None)  # rebuilt lazily in each process
        return state

    def __len__(self) -> int:
        return self.num_docs

    @property
    def files(self) -> list[str]:
        """The data files (or datasets) read, in ``doc_id`` order."""
        return [reader.name for readers in self._files for reader in readers]

    def locate(self, j: int, epoch: int = 0) -> int:
        """The ``doc_id`` at position ``j`` of the mixture in ``epoch``."""
        if not 0 <= j < self.num_docs:
            raise IndexError(f"position {j} outside [0, {self.num_docs})")
        if self._source_of is None:
            return j
        s, r = int(self._source_of[j]), int(self._rank[j])
        size, count = int(self.source_sizes[s]), int(self.source_counts[s])
        if count == size:
            i = r  # each record exactly once per epoch; the pipeline's shuffle orders them
        else:
            k = epoch * count + r
            cycle, i = divmod(k, size)
            if self.config.shuffle:
                i = int(self._permutation(s, cycle)[i])
        return int(self._doc_base[s]) + i

    def _permutation(self, source: int, cycle: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_perm_cache", {})
        key = (source, cycle)
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            rng = np.random.default_rng([self.config.seed, 0x737263, source, cycle])
            cache[key] = rng.permutation(int(self.source_sizes[source]))
        return cache[key]

    def address(self, doc_id: int) -> tuple[_Reader, int, int]:
        """``(reader, index in file, source)`` of a document."""
        s = int(np.searchsorted(self._doc_base, doc_id, side="right")) - 1
        i = doc_id - int(self._doc_base[s])
        starts = self._file_starts[s]
        f = int(np.searchsorted(starts, i, side="right")) - 1
        return self._files[s][f], i - int(starts[f]), s

    def document(self, doc_id: int) -> Record | BadRecordError:
        """The record with global index ``doc_id``, or the :class:`BadRecordError` describing it."""
        reader, index, _ = self.address(doc_id)
        try:
            data = validate_row(reader.row(index), self.config)
        except BadRow as bad:
            return BadRecordError(reader.where(index), index, str(bad))
        except Exception as err:  # a damaged file: report it like a bad record, with its address
            return BadRecordError(reader.where(index), index, f"unreadable ({type(err).__name__}: {err})")
        return Record(data, reader.name, index, doc_id)

    def get(self, j: int, epoch: int = 0) -> Record | BadRecordError:
        """The record at mixture position ``j`` of ``epoch`` (or its error, returned, not raised)."""
        return self.document(self.locate(j, epoch))

    def __getitem__(self, j):  # type: ignore[override]
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        out = self.get(j)
        if isinstance(out, BadRecordError):
            raise out
        return out

    def __iter__(self) -> Iterator[Record]:
        for j in range(len(self)):
            out = self.get(j)
            if isinstance(out, BadRecordError):
                if self.config.on_bad_record == "raise":
                    raise out
                self.bad_record_count += 1
                continue
            yield out


def read_records(config: DataConfig) -> Records:
    """Open the configured sources and return one epoch of their mixture as a lazy sequence.

    Formats: JSONL, Parquet, Arrow IPC (file or stream), ``datasets.save_to_disk`` directories
    and ``datasets.load_dataset(builder, data_files=...)`` over local files; each source's path
    may be a file, a directory or a glob. Records are validated for ``config.record`` when read:
    a bad one raises :class:`BadRecordError` naming its file and index (``Records.get`` returns
    the error instead; iteration skips and counts bad ones when ``on_bad_record == "skip"``).
    """
    return Records(config)
