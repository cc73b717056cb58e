"""The Grain pipeline: document plan -> read + tokenize (optionally in worker processes) -> pack -> batch.

Document order. Each epoch is a seeded global permutation of the mixture's ``N`` positions
(a different one every epoch; identity with ``shuffle=False``). Process ``p`` of ``P`` takes the
positions ``p, p + P, p + 2P, ...`` of each epoch's order, so the processes' shards are disjoint
and together cover every epoch; each reads and tokenizes only its own records. Its local
stream runs through the epochs one after another (``num_epochs=None``: forever).

Stages. A Grain ``MapDataset`` maps groups of consecutive local document indices to their
tokenized documents (reading, validating and tokenizing happen here; with ``workers > 0`` in
Grain worker processes via ``mp_prefetch``, which preserves the order because the map is one to
one). :class:`PackedIterator`, a Grain ``DatasetIterator``, then packs the stream first-fit into
batches in the calling process (:mod:`distill_jax.data.packing`). Packing after the workers
keeps the batches identical for any number of workers.

State. ``get_state()`` is a small JSON-able dict: the stream position of the next batch's first
piece (local document index, student and teacher token offsets within it) plus counters.
``set_state`` reopens the upstream at that document, so a restored iterator yields exactly the
batches the uninterrupted one would, also across epoch boundaries and with a different number of
workers.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.packing import BatchPacker, Piece, cut_point
from distill_jax.data.records import BadRecordError, Records, read_records
from distill_jax.data.tokenize import TokenizedDoc, tokenize_records
from distill_jax.errors import UserError

__all__ = ["DocumentGroups", "DocumentPlan", "PackedDataset", "PackedIterator", "make_dataset", "make_iterator",
           "open_groups", "upstream_close", "upstream_fetch"]

DOCS_PER_ELEMENT = 32  # documents per Grain element: amortises the transfer from worker processes
_STATE_KEYS = ("doc_index", "token_offset", "teacher_offset", "bad_records", "dropped_docs", "batches",
               "process_index", "process_count")


class DocumentPlan:
    """Local document index -> (epoch, mixture position) for one process (shard) of
    ``process_count``: the document order of the module docstring, shared by every reader of
    the run's data (the packed batches here, on-policy prompts)."""

    def __init__(self, num_docs: int, config: DataConfig, process_index: int, process_count: int):
        self.num_docs, self.p, self.count = num_docs, process_index, process_count
        self.shuffle, self.seed = config.shuffle, config.seed
        self.per_epoch = (num_docs - process_index + process_count - 1) // process_count
        if self.per_epoch <= 0:
            raise ValueError(f"the data has {num_docs} records, too few for {process_count} processes")
        self.total = None if config.num_epochs is None else self.per_epoch * config.num_epochs
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}

    def position(self, i: int) -> tuple[int, int]:
        """``(epoch, mixture position)`` of local document index ``i``."""
        epoch, q = divmod(i, self.per_epoch)
        g = q * self.count + self.p
        if not self.shuffle:
            return epoch, g
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            perm = np.random.default_rng([self.seed, 0x736866, epoch]).permutation(self.num_docs)
            perm = self._perms[epoch] = perm.astype(np.int32 if self.num_docs < 2**31 else np.int64)
        return epoch, int(perm[g])


class DocumentGroups(Sequence):
    """Grain source: element ``g`` is the local document indices ``[g * k, (g + 1) * k)``."""

    def __init__(self, total: int | None):
        self.total = total

    def __len__(self) -> int:
        if self.total is None:
            return sys.maxsize
        return -(-self.total // DOCS_PER_ELEMENT)

    def __getitem__(self, g: int) -> range:
        lo = g * DOCS_PER_ELEMENT
        hi = lo + DOCS_PER_ELEMENT
        return range(lo, hi if self.total is None else min(hi, self.total))


class _ReadTokenize:
    """Grain map: a group of local document indices -> their ``TokenizedDoc``s (or skipped errors)."""

    def __init__(self, records: Records, plan: DocumentPlan, config: DataConfig, tokenizer, teacher_tokenizer):
        self.records, self.plan, self.config = records, plan, config
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer

    def __call__(self, indices: range) -> list[TokenizedDoc | BadRecordError]:
        records = [self.records.get(j, epoch) for epoch, j in map(self.plan.position, indices)]
        good = [r for r in records if not isinstance(r, BadRecordError)]
        docs = iter(tokenize_records(good, self.tokenizer, self.config, teacher_tokenizer=self.teacher_tokenizer))
        out = [r if isinstance(r, BadRecordError) else next(docs) for r in records]
        if self.config.on_bad_record == "raise":
            for item in out:
                if isinstance(item, BadRecordError):
                    raise item
        return out


def _ensure_absl_flags() -> None:
    """Grain's worker processes read absl flags; parse them (defaults only) if nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1], known_only=True)


def _init_worker(index: int, count: int) -> None:
    """In each Grain worker: one tokenizer thread (the workers are the parallelism)."""
    del index, count
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def open_groups(docs: grain.MapDataset, doc_index: int, workers: int = 0):
    """An iterator over the elements (document groups) of ``docs`` from the one holding local
    document ``doc_index`` on, read in ``workers`` Grain worker processes when > 0 (in order);
    and how many documents of its first element to skip."""
    group, skip = divmod(doc_index, DOCS_PER_ELEMENT)
    ds = docs[group:].to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=4),
                            worker_init_fn=_init_worker)
    return iter(ds), skip


class PackedDataset(grain.IterDataset):
    """Packed batches of one process's shard; iterate it (or :func:`make_iterator`) for batches.

    Attributes:
      config: the data config.
      records: the mixture (:class:`~distill_jax.data.records.Records`).
      docs: the Grain ``MapDataset`` of tokenized document groups (before packing).
      rows: rows per batch in this process (``batch_size // process_count``).
      docs_per_epoch: documents per epoch in this process's shard.
    """

    def __init__(self, config: DataConfig, records: Records, docs: grain.MapDataset, plan: DocumentPlan, *,
                 with_teacher: bool, process_index: int, process_count: int):
        super().__init__(docs)
        self.config, self.records, self.docs, self._plan = config, records, docs, plan
        self.rows = config.batch_size // process_count
        self.with_teacher = with_teacher
        self.process_index, self.process_count = process_index, process_count
        self.docs_per_epoch = plan.per_epoch

    def __iter__(self) -> "PackedIterator":
        return PackedIterator(self)

    def __str__(self) -> str:
        return (f"PackedDataset(rows={self.rows}, seq_len={self.config.seq_len}, "
                f"process={self.process_index}/{self.process_count})")


def upstream_close(it: Any) -> None:
    """Close an iterator's upstream reader (``it._upstream``) and drop its buffered items.
    Shared by the pipeline's iterators, which keep ``_ds`` (``docs``, ``config.workers``),
    ``_cursor`` (the next item's index), ``_upstream``, ``_skip`` and ``_buffer`` (a deque)."""
    if it._upstream is not None:
        it._upstream.close()
    it._upstream = None
    it._buffer.clear()


def upstream_fetch(it: Any) -> tuple[int, Any] | None:
    """The next ``(index, item)`` of an iterator's upstream (a tokenized item or its
    ``BadRecordError``), opening it at ``it._cursor`` when closed; None at the end."""
    if it._upstream is None:
        it._upstream, it._skip = open_groups(it._ds.docs, it._cursor, it._ds.config.workers)
    while not it._buffer:
        try:
            items = next(it._upstream)
        except StopIteration:
            return None
        it._buffer.extend(items[it._skip:])
        it._skip = 0
    index = it._cursor
    it._cursor += 1
    return index, it._buffer.popleft()


class PackedIterator(grain.DatasetIterator):
    """Yields packed numpy batches; ``get_state``/``set_state`` resume exactly.

    Attributes:
      bad_record_count: bad records skipped so far (``on_bad_record="skip"``); a metric.
      dropped_doc_count: documents dropped for being longer than a row (``long_docs="drop"``).
      batch_count: batches yielded so far.
    """

    def __init__(self, dataset: PackedDataset):
        super().__init__()
        self._ds = dataset
        self._upstream = None
        self._buffer: collections.deque = collections.deque()
        self._reset(0, 0, 0, 0, 0, 0)

    # -- state --------------------------------------------------------------------------------

    def _reset(self, doc_index: int, offset: int, teacher_offset: int, bad: int, dropped: int, batches: int) -> None:
        self._close_upstream()
        c = self._ds.config
        self._packer = BatchPacker(self._ds.rows, c.seq_len, c.teacher_len if self._ds.with_teacher else None)
        self._cursor = doc_index  # local index of the next document to fetch
        self._start_offsets = (offset, teacher_offset)  # where the document at doc_index resumes
        self._pending: tuple[int, TokenizedDoc, int, int] | None = None  # (doc index, doc, s, t)
        self.bad_record_count, self.dropped_doc_count, self.batch_count = bad, dropped, batches
        self._fruitless = self._fruitless_bad = 0  # documents in a row with nothing to train on
        self._first_bad: BadRecordError | None = None
        self._next_state = self._state_dict(doc_index, offset, teacher_offset)

    def _state_dict(self, doc_index: int, offset: int = 0, teacher_offset: int = 0) -> dict[str, Any]:
        return {"doc_index": int(doc_index), "token_offset": int(offset), "teacher_offset": int(teacher_offset),
                "bad_records": self.bad_record_count,
                "dropped_docs": self.dropped_doc_count, "batches": self.batch_count,
                "process_index": self._ds.process_index, "process_count": self._ds.process_count}

    def get_state(self) -> dict[str, Any]:
        """Where the next batch starts, and the counters; a dict of ints (JSON-able)."""
        return dict(self._next_state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``get_state`` of an iterator over the same data and config)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not a data iterator state (missing {missing}): {state!r}")
        if (state["process_index"], state["process_count"]) != (self._ds.process_index, self._ds.process_count):
            raise ValueError(
                f"the state was saved by process {state['process_index']} of {state['process_count']}, this is "
                f"process {self._ds.process_index} of {self._ds.process_count}; resume with the same process layout")
        self._reset(state["doc_index"], state["token_offset"], state["teacher_offset"], state["bad_records"],
                    state["dropped_docs"], state["batches"])

    # -- upstream -----------------------------------------------------------------------------

    _close_upstream = upstream_close
    _fetch = upstream_fetch

    def _next_pending(self) -> bool:
        """Load the next usable document into ``_pending``; False at the end of the stream."""
        c = self._ds.config
        teacher_len = c.teacher_len if self._ds.with_teacher else None
        while True:
            fetched = self._fetch()
            if fetched is None:
                return False
            index, doc = fetched
            (s, t), self._start_offsets = self._start_offsets, (0, 0)
            if isinstance(doc, BadRecordError):
                self.bad_record_count += 1
                self._watch(doc)
                continue
            too_long = len(doc.student) > c.seq_len or (teacher_len is not None and len(doc.teacher) > teacher_len)
            if too_long and c.long_docs == "drop":
                self.dropped_doc_count += 1
                self._watch(None)
                continue
            self._watch(doc)
            if not len(doc.student):
                continue
            self._pending = (index, doc, s, t)
            return True

    def _watch(self, doc: TokenizedDoc | BadRecordError | None) -> None:
        """Count documents in a row with nothing to train on (bad, dropped: None, or without a
        trained token); raise once they make a whole pass over this shard, instead of looping
        forever on data that yields no batch."""
        if isinstance(doc, TokenizedDoc) and doc.student.trained[1:].any():
            self._fruitless, self._fruitless_bad, self._first_bad = 0, 0, None
            return
        self._fruitless += 1
        if isinstance(doc, BadRecordError):
            self._fruitless_bad += 1
            self._first_bad = self._first_bad or doc
        n = self._ds.docs_per_epoch
        if self._fruitless < n:
            return
        files = ", ".join(self._ds.records.files)
        if self._fruitless_bad >= n:
            first = self._first_bad
            raise UserError(f"no valid record in {files}: {n} of {n} skipped (data.on_bad_record=skip); "
                            f"first error: {first.source}: record {first.index}: {first.reason}")
        raise UserError(f"no document in {files} has a token to train on ({n} of {n} records bad, "
                        "empty, prompt-only with data.loss_on_prompt=false, or longer than a row with "
                        "data.long_docs=drop); check the data with `distill-jax data check`")

    # -- iteration ----------------------------------------------------------------------------

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        c = self._ds.config
        packer = self._packer
        teacher_len = c.teacher_len if self._ds.with_teacher else None
        while True:
            if self._pending is None and not self._next_pending():
                break
            index, doc, s, t = self._pending
            n, nt = len(doc.student), (len(doc.teacher) if teacher_len is not None else 0)
            row = packer.first_fit(n - s, nt - t)
            if row >= 0:  # the whole (rest of the) document fits a row
                packer.place(row, Piece(doc, s, n, t, nt))
                self._pending = None
                continue
            if n - s <= c.seq_len and (teacher_len is None or nt - t <= teacher_len):
                break  # it fits an empty row: it opens the next batch
            # Longer than a row: its head fills the row with the most room (see packing).
            placed = False
            room, room_t = packer.room()
            for r in np.argsort(-room, kind="stable"):
                full_row = room[r] == c.seq_len
                end = cut_point(doc, s, t, int(room[r]), None if room_t is None else int(room_t[r]),
                                common_only=not full_row)
                if end is not None:
                    packer.place(int(r), Piece(doc, s, end[0], t, end[1]))
                    self._pending = (index, doc, end[0], end[1])
                    placed = True
                    break
            if not placed:
                if packer.empty:
                    raise ValueError(f"document {doc.doc_id} ({doc.source}, record {doc.index}) cannot be cut to "
                                     f"fit {c.seq_len} student / {teacher_len} teacher tokens; raise "
                                     "data.teacher_seq_len")
                break
        if packer.empty:
            self._next_state = self._state_dict(self._cursor)
            raise StopIteration
        batch = packer.emit()
        self.batch_count += 1
        if self._pending is not None:
            self._next_state = self._state_dict(*self._pending[:1], *self._pending[2:])
        else:
            self._next_state = self._state_dict(self._cursor)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Counters for training metrics: bad records, dropped documents, batches."""
        return {"data/bad_records": self.bad_record_count, "data/dropped_docs": self.dropped_doc_count,
                "data/batches": self.batch_count}

    def close(self) -> None:
        """Stop worker processes (if any)."""
        self._close_upstream()
        super().close()

    def __del__(self):
        try:
            self._close_upstream()
        except Exception:  # interpreter shutdown
            pass


def make_dataset(config: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 teacher_tokenizer=None, records: Records | None = None) -> PackedDataset:
    """The packed-batch dataset of process ``process_index`` of ``process_count``.

    Args:
      config: the data config; ``batch_size`` is global and must divide by ``process_count``.
      tokenizer: the student's Hugging Face fast tokenizer.
      process_index, process_count: this process's shard (``jax.process_index()``/``count()``).
      teacher_tokenizer: the teacher's tokenizer when it differs from the student's: the batches
        then carry the teacher's tokens of the same documents in ``teacher_*`` fields.
      records: already-opened records (default: ``read_records(config)``).

    Returns:
      A Grain ``IterDataset`` of batches, each a dict of numpy arrays of shape
      ``(batch_size // process_count, seq_len)`` (see the ``distill_jax.data`` batch contract).
    """
    if config.record == "pairs":
        raise ValueError("pair records (data.record=pairs) pack as whole pairs: use "
                         "distill_jax.data.pairs.make_pair_iterator (make_process_iterator picks it)")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.batch_size} does not divide over {process_count} processes; "
                         f"use a multiple of {process_count}")
    records = read_records(config) if records is None else records
    plan = DocumentPlan(len(records), config, process_index, process_count)
    docs = grain.MapDataset.source(DocumentGroups(plan.total)).map(
        _ReadTokenize(records, plan, config, tokenizer, teacher_tokenizer))
    return PackedDataset(config, records, docs, plan, with_teacher=teacher_tokenizer is not None,
                         process_index=process_index, process_count=process_count)


def make_iterator(config: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                  teacher_tokenizer=None, state: dict[str, Any] | None = None,
                  records: Records | None = None) -> PackedIterator:
    """A Grain ``DatasetIterator`` over :func:`make_dataset`'s batches, restored to ``state`` if given."""
    it = iter(make_dataset(config, tokenizer, process_index=process_index, process_count=process_count,
                           teacher_tokenizer=teacher_tokenizer, records=records))
    if state is not None:
        it.set_state(state)
    return it
