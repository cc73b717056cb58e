"""Pair records -> packed rows carrying REDI's per-token ``sequence_weight``, on Grain.

``data.record: pairs`` reads pair records (``distill-jax traces select --policy pairs``): the
prompt and the chosen (verified) completion as chat ``messages`` (``data.messages_field``) and
the rejected completion as ``rejected`` (``data.rejected_field``), from any source format the
other kinds read (JSONL, Parquet, Arrow, ``datasets``)::

    {"messages": [..prompt.., {"role": "assistant", "content": CHOSEN}], "rejected": REJECTED}

Tokens (:func:`tokenize_pair`). The prompt is rendered as it was for sampling (the chat
template with the generation prompt when the tokenizer has one: :func:`encode_messages`); each
completion is encoded without special tokens and ended with the EOS token. Each completion
becomes its own sequence, prompt + completion, with its own segment id.

Packing (:class:`PairPacker`). Both sequences of a pair go whole into one row, first-fit in
stream order; a pair that fits no row of the current batch closes it and opens the next. A pair
longer than a row is skipped and counted (``skipped_pairs``), never truncated: REDI's
normaliser counts whole positive completions (:mod:`distill_jax.losses.redi`).

Row arrays (``rows`` x ``seq_len``): ``tokens``, ``targets`` (the next token; 0 at a
sequence's last position), ``positions`` (restarting per sequence), ``segment_ids`` (1, 2, ...
per sequence; 0 is padding), ``loss_mask`` (float32, 1 on the chosen completion's targets: what
``sft`` trains on), ``sequence_weight`` (float32, aligned with ``targets``: ``1/|y+|`` on the
chosen completion's targets, ``-1/|y-|`` on the rejected one's, 0 elsewhere; the ``redi`` term
scales the negative side by ``loss.redi_alpha``) and ``doc_ids`` (the pair record's global
index on both its sequences; -1 on padding). ``|y|`` counts the completion's tokens including
the EOS token.

Pipeline (:func:`make_pair_iterator`). The document order, shuffling, epochs and process shards
are the text pipeline's (:class:`~distill_jax.data.pipeline.DocumentPlan`); reading and
tokenizing run as a Grain map over groups of documents (in worker processes with
``data.workers``); packing runs in the calling process. Since pairs are never split, the
iterator state is the local index of the next batch's first pair plus counters, so a restored
iterator yields exactly the batches of the uninterrupted one.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.pipeline import DocumentGroups, DocumentPlan, upstream_close, upstream_fetch
from distill_jax.data.records import BadRecordError, Record, Records, read_records
from distill_jax.errors import UserError
from distill_jax.losses.redi import SEQUENCE_WEIGHT, pair_weights

__all__ = ["FIELDS", "PairIterator", "PairPacker", "TokenizedPair", "encode_messages",
           "make_pair_iterator", "pack_pairs", "tokenize_pair"]

PAIRS = "pairs"  # the record kind
FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", SEQUENCE_WEIGHT, "doc_ids")
_STATE_KEYS = ("doc_index", "bad_records", "skipped_pairs", "batches", "process_index",
               "process_count")


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: the prompt, the chosen and the rejected completion; ``doc_id`` is
    the record's global index (-1 outside a pipeline)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    doc_id: int = -1

    @property
    def length(self) -> int:
        """Row slots the pair takes: the prompt twice and both completions."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def encode_messages(tokenizer: Any, messages: Sequence[dict], chat_template: bool | None) -> list[int]:
    """Token ids of a conversation ending before the answer: the tokenizer's chat template with
    the generation prompt (``chat_template`` None: when it has one), else the messages' text
    joined by blank lines, with the tokenizer's special tokens."""
    use_chat = (getattr(tokenizer, "chat_template", None) is not None if chat_template is None
                else chat_template)
    if use_chat:
        enc = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(enc, "keys"):  # transformers may return a BatchEncoding
            enc = enc["input_ids"]
        return [int(t) for t in enc]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(t) for t in tokenizer(text)["input_ids"]]


def tokenize_pair(tokenizer: Any, record: Mapping[str, Any], *,
                  chat_template: bool | None = None, doc_id: int = -1) -> TokenizedPair:
    """The token ids of a pair record (``messages`` ending with the chosen reply, and
    ``rejected``): the prompt messages rendered as for sampling (:func:`encode_messages`), each
    completion encoded without special tokens and ended with the tokenizer's EOS token (when it
    has one). Raises ValueError naming what is wrong with the record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 \
            or messages[-1].get("role") != "assistant" or not isinstance(record.get("rejected"), str):
        raise ValueError("a pair record needs 'messages' ending with the chosen assistant "
                         "message and a 'rejected' completion (write them with `distill-jax "
                         "traces select --policy pairs`)")
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = () if eos is None else (int(eos),)

    def completion(text: str) -> tuple[int, ...]:
        ids = tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]) + tail
        if not ids:
            raise ValueError("a completion of the pair encodes to no tokens (and the tokenizer "
                             "has no EOS token to end it)")
        return ids

    prompt = tuple(encode_messages(tokenizer, messages[:-1], chat_template))
    if not prompt:
        raise ValueError("the pair's prompt encodes to no tokens")
    return TokenizedPair(prompt, completion(messages[-1]["content"]),
                         completion(record["rejected"]), doc_id)


class PairPacker:
    """Pairs placed whole into a ``(rows, seq_len)`` batch, first-fit (see the module)."""

    def __init__(self, rows: int, seq_len: int):
        if rows < 1 or seq_len < 2:
            raise ValueError(f"rows must be >= 1 and seq_len >= 2, got {rows} and {seq_len}")
        self.rows, self.seq_len = rows, seq_len
        self._pairs: list[list[TokenizedPair]] = [[] for _ in range(rows)]
        self._used = [0] * rows

    @property
    def empty(self) -> bool:
        return not any(self._pairs)

    def fits(self, pair: TokenizedPair) -> bool:
        """Whether the pair fits an empty row (else it is skipped)."""
        return pair.length <= self.seq_len

    def first_fit(self, pair: TokenizedPair) -> int:
        """The first row with room for the whole pair, or -1."""
        return next((r for r in range(self.rows) if self._used[r] + pair.length <= self.seq_len), -1)

    def place(self, row: int, pair: TokenizedPair) -> None:
        assert self._used[row] + pair.length <= self.seq_len
        self._pairs[row].append(pair)
        self._used[row] += pair.length

    def emit(self) -> dict[str, np.ndarray]:
        """The batch (see the module); the packer starts empty again."""
        out = {k: np.zeros((self.rows, self.seq_len), np.int32) for k in FIELDS}
        out["loss_mask"] = np.zeros((self.rows, self.seq_len), np.float32)
        out[SEQUENCE_WEIGHT] = np.zeros((self.rows, self.seq_len), np.float32)
        out["doc_ids"].fill(-1)
        for r, pairs in enumerate(self._pairs):
            start, segment = 0, 0
            for pair in pairs:
                w_pos, w_neg = pair_weights(len(pair.chosen), len(pair.rejected))
                for completion, weight, chosen in ((pair.chosen, w_pos, True),
                                                   (pair.rejected, w_neg, False)):
                    segment += 1
                    start = _put(out, r, start, segment, pair, completion, weight, chosen)
        self.__init__(self.rows, self.seq_len)
        return out


def _put(batch: dict[str, np.ndarray], row: int, start: int, segment: int, pair: TokenizedPair,
         completion: Sequence[int], weight: float, chosen: bool) -> int:
    seq = list(pair.prompt) + list(completion)
    n, end = len(seq), start + len(seq)
    batch["tokens"][row, start:end] = seq
    batch["targets"][row, start:end - 1] = seq[1:]
    batch["positions"][row, start:end] = np.arange(n)
    batch["segment_ids"][row, start:end] = segment
    batch["doc_ids"][row, start:end] = pair.doc_id
    # position t predicts seq[t + 1]: the completion is predicted from the prompt's last token
    lo, hi = start + len(pair.prompt) - 1, end - 1
    batch[SEQUENCE_WEIGHT][row, lo:hi] = weight
    if chosen:
        batch["loss_mask"][row, lo:hi] = 1.0
    return end


def pack_pairs(pairs: Iterable[TokenizedPair], *, rows: int, seq_len: int
               ) -> tuple[list[dict[str, np.ndarray]], int]:
    """Packed batches of ``rows`` x ``seq_len`` (see the module) of a list of pairs, and the
    number of pairs skipped for not fitting a row. The last batch may have empty rows. (The
    training pipeline packs the same way, batch by batch: :func:`make_pair_iterator`.)"""
    packer = PairPacker(rows, seq_len)
    batches: list[dict[str, np.ndarray]] = []
    skipped = 0
    for pair in pairs:
        if not packer.fits(pair):
            skipped += 1
            continue
        row = packer.first_fit(pair)
        if row < 0:
            batches.append(packer.emit())
            row = 0
        packer.place(row, pair)
    if not packer.empty:
        batches.append(packer.emit())
    return batches, skipped


# ----------------------------------------------------------------------------------------------
# The Grain pipeline


class _ReadPairs:
    """Grain map: a group of local document indices -> their ``TokenizedPair``s (or errors)."""

    def __init__(self, records: Records, plan: DocumentPlan, config: DataConfig, tokenizer):
        self.records, self.plan, self.config, self.tokenizer = records, plan, config, tokenizer

    def one(self, record: Record | BadRecordError) -> TokenizedPair | BadRecordError:
        if isinstance(record, BadRecordError):
            return record
        try:
            return tokenize_pair(self.tokenizer, record.data, doc_id=record.doc_id)
        except ValueError as err:
            return BadRecordError(record.source, record.index, str(err))

    def __call__(self, indices: range) -> list[TokenizedPair | BadRecordError]:
        out = [self.one(self.records.get(j, epoch)) for epoch, j in map(self.plan.position, indices)]
        if self.config.on_bad_record == "raise":
            for item in out:
                if isinstance(item, BadRecordError):
                    raise item
        return out


class PairDataset(grain.IterDataset):
    """Packed pair batches of one process's shard (iterate it, or :func:`make_pair_iterator`).

    Attributes:
      config: the data config (``record: pairs``).
      records: the mixture.
      docs: the Grain ``MapDataset`` of tokenized pair groups (before packing).
      rows: rows per batch in this process (``batch_size // process_count``).
    """

    def __init__(self, config: DataConfig, records: Records, docs: grain.MapDataset,
                 plan: DocumentPlan, *, process_index: int, process_count: int):
        super().__init__(docs)
        self.config, self.records, self.docs, self.plan = config, records, docs, plan
        self.rows = config.batch_size // process_count
        self.process_index, self.process_count = process_index, process_count

    def __iter__(self) -> "PairIterator":
        return PairIterator(self)


class PairIterator(grain.DatasetIterator):
    """Yields packed pair batches; ``get_state``/``set_state`` resume exactly.

    Attributes:
      bad_record_count: bad records skipped so far (``data.on_bad_record=skip``).
      skipped_pair_count: pairs skipped for being longer than a row.
      batch_count: batches yielded so far.
    """

    def __init__(self, dataset: PairDataset):
        super().__init__()
        self._ds = dataset
        self._upstream = None
        self._buffer: collections.deque = collections.deque()
        self._reset(0, 0, 0, 0)

    def _reset(self, doc_index: int, bad: int, skipped: int, batches: int) -> None:
        self._close_upstream()
        self._packer = PairPacker(self._ds.rows, self._ds.config.seq_len)
        self._cursor = doc_index  # local index of the next pair to fetch
        self._pending: tuple[int, TokenizedPair] | None = None
        self.bad_record_count, self.skipped_pair_count, self.batch_count = bad, skipped, batches
        self._fruitless = 0  # records in a row that gave no pair to train on
        self._first_bad: BadRecordError | None = None
        self._next_state = self._state_dict(doc_index)

    def _state_dict(self, doc_index: int) -> dict[str, Any]:
        return {"doc_index": int(doc_index), "bad_records": self.bad_record_count,
                "skipped_pairs": self.skipped_pair_count, "batches": self.batch_count,
                "process_index": self._ds.process_index, "process_count": self._ds.process_count}

    def get_state(self) -> dict[str, Any]:
        """Where the next batch starts, and the counters; a dict of ints (JSON-able)."""
        return dict(self._next_state)

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``get_state`` of an iterator over the same data and config)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not a pair data iterator state (missing {missing}): {state!r}; "
                             "resume with the data.record the run started with")
        if (state["process_index"], state["process_count"]) != (self._ds.process_index,
                                                                 self._ds.process_count):
            raise ValueError(
                f"the state was saved by process {state['process_index']} of "
                f"{state['process_count']}, this is process {self._ds.process_index} of "
                f"{self._ds.process_count}; resume with the same process layout")
        self._reset(state["doc_index"], state["bad_records"], state["skipped_pairs"],
                    state["batches"])

    _close_upstream = upstream_close
    _fetch = upstream_fetch

    def _next_pending(self) -> bool:
        """Load the next usable pair into ``_pending``; False at the end of the stream."""
        while True:
            fetched = self._fetch()
            if fetched is None:
                return False
            index, pair = fetched
            if isinstance(pair, BadRecordError):
                self.bad_record_count += 1
                self._barren(pair)
            elif not self._packer.fits(pair):
                self.skipped_pair_count += 1
                self._barren(None)
            else:
                self._fruitless, self._first_bad = 0, None
                self._pending = (index, pair)
                return True

    def _barren(self, bad: BadRecordError | None) -> None:
        """Raise once a whole pass over this shard gave no pair, instead of looping forever."""
        self._fruitless += 1
        self._first_bad = self._first_bad or bad
        n = self._ds.plan.per_epoch
        if self._fruitless < n:
            return
        files = ", ".join(self._ds.records.files)
        why = []
        if self._first_bad is not None:
            first = self._first_bad
            why.append(f"bad records (data.on_bad_record=skip; first: {first.source}: record "
                       f"{first.index}: {first.reason})")
        if self._first_bad is None or self.skipped_pair_count:
            why.append(f"pairs longer than data.seq_len={self._ds.config.seq_len} (raise it)")
        raise UserError(f"no usable pair in {files}: {n} of {n} records are "
                        f"{' or '.join(why)}")

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        packer = self._packer
        while True:
            if self._pending is None and not self._next_pending():
                break
            row = packer.first_fit(self._pending[1])
            if row < 0:
                break  # it fits an empty row: it opens the next batch
            packer.place(row, self._pending[1])
            self._pending = None
        if packer.empty:
            self._next_state = self._state_dict(self._cursor)
            raise StopIteration
        batch = packer.emit()
        self.batch_count += 1
        self._next_state = self._state_dict(self._pending[0] if self._pending else self._cursor)
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Counters for training metrics: bad records, skipped pairs, batches."""
        return {"data/bad_records": self.bad_record_count,
                "data/skipped_pairs": self.skipped_pair_count, "data/batches": self.batch_count}

    def close(self) -> None:
        """Stop worker processes (if any)."""
        self._close_upstream()
        super().close()

    def __del__(self):
        try:
            self._close_upstream()
        except Exception:  # interpreter shutdown
            pass


def make_pair_dataset(config: DataConfig, tokenizer, *, process_index: int = 0,
                      process_count: int = 1, records: Records | None = None) -> PairDataset:
    """The packed pair batches of process ``process_index`` of ``process_count`` (each of
    shape ``(batch_size // process_count, seq_len)``; see the module)."""
    if config.record != PAIRS:
        raise ValueError(f"make_pair_dataset reads pair records, but data.record is "
                         f"{config.record!r}; set data.record=pairs")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if config.batch_size % process_count:
        raise ValueError(f"data.batch_size={config.batch_size} does not divide over "
                         f"{process_count} processes; use a multiple of {process_count}")
    records = read_records(config) if records is None else records
    plan = DocumentPlan(len(records), config, process_index, process_count)
    docs = grain.MapDataset.source(DocumentGroups(plan.total)).map(
        _ReadPairs(records, plan, config, tokenizer))
    return PairDataset(config, records, docs, plan, process_index=process_index,
                       process_count=process_count)


def make_pair_iterator(config: DataConfig, tokenizer, *, process_index: int = 0,
                       process_count: int = 1, state: dict[str, Any] | None = None,
                       records: Records | None = None) -> PairIterator:
    """A Grain ``DatasetIterator`` over :func:`make_pair_dataset`'s batches, restored to
    ``state`` if given."""
    it = iter(make_pair_dataset(config, tokenizer, process_index=process_index,
                                process_count=process_count, records=records))
    if state is not None:
        it.set_state(state)
    return it
