"""The run's data as a resumable stream of prompt batches (the input of the on-policy signal).

The records are read in the data pipeline's document order (:class:`distill_jax.data.DocumentPlan`:
the seeded global shuffle of every epoch, shard ``s`` of ``S`` taking positions ``s, s + S,
...``), each becomes a :class:`~distill_jax.onpolicy.prompts.Prompt`
(:func:`~distill_jax.onpolicy.prompts.prompt_from_record`) and ``batch_size / S`` of them a
prompt batch (:func:`~distill_jax.onpolicy.prompts.prompt_batch`, ``PROMPT_KEYS``). Bad records
follow ``data.on_bad_record``; a prompt longer than the largest prompt bucket follows
``data.long_docs`` (``drop``: skipped and counted; ``split``: an error naming the fix, as a
prompt cannot be split). A final incomplete batch is not emitted.

State. ``get_state()`` is a small JSON-able dict (the next batch's first local document index and
counters), saved with the checkpoint like the packed iterator's; ``set_state`` resumes exactly.
A process reads its shards of every global batch (``data.num_shards``, as the pipeline); the
shards' batches are put together left-padded to the widest prompt bucket among them
(:func:`combine_prompt_batches`). With several shards every shard's rows are padded to the
largest bucket, so the processes' arrays have one shape without any communication, and the global
batch depends on ``data.num_shards`` only, not on how many processes read the shards (one
process reading both of two shards has the two processes' batches, concatenated).
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from distill_jax.data import (BadRecordError, DataConfig, DocumentPlan, ShardedIterator,
                              process_shards, read_records)
from distill_jax.data.records import Records
from distill_jax.errors import UserError
from distill_jax.onpolicy.prompts import DEFAULT_BUCKETS, prompt_batch, prompt_from_record

__all__ = ["PromptIterator", "combine_prompt_batches", "make_prompt_iterator"]

_STATE_KEYS = ("doc_index", "bad_records", "dropped_docs", "batches", "process_index",
               "process_count")


class PromptIterator(grain.DatasetIterator):
    """Prompt batches of one data shard (``process_index`` of ``process_count`` shards);
    ``get_state``/``set_state`` resume exactly."""

    def __init__(self, config: DataConfig, tokenizer, *, max_new_tokens: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, process_index: int = 0,
                 process_count: int = 1, records: Records | None = None):
        super().__init__()
        if config.batch_size % process_count:
            raise ValueError(f"data.batch_size={config.batch_size} does not divide over "
                             f"{process_count} shards")
        self.config, self.tokenizer = config, tokenizer
        self.max_new_tokens, self.buckets = int(max_new_tokens), tuple(sorted(buckets))
        self.records = read_records(config) if records is None else records
        self.plan = DocumentPlan(len(self.records), config, process_index, process_count)
        self.rows = config.batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self._set(0, 0, 0, 0)

    def _set(self, doc_index: int, bad: int, dropped: int, batches: int) -> None:
        self._cursor = doc_index
        self.bad_record_count, self.dropped_doc_count, self.batch_count = bad, dropped, batches

    def get_state(self) -> dict[str, Any]:
        """Where the next batch starts, and the counters (ints; JSON-able)."""
        return {"doc_index": self._cursor, "bad_records": self.bad_record_count,
                "dropped_docs": self.dropped_doc_count, "batches": self.batch_count,
                "process_index": self.process_index, "process_count": self.process_count}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``get_state`` of an iterator over the same data)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not a prompt iterator state (missing {missing}): {state!r}; was the "
                             "checkpoint written by an off-policy run? Resume it without onpolicy")
        if (state["process_index"], state["process_count"]) != (self.process_index,
                                                                self.process_count):
            raise ValueError(f"the state was saved by shard {state['process_index']} of "
                             f"{state['process_count']}, this is shard {self.process_index} of "
                             f"{self.process_count}; resume with the same data.num_shards")
        self._set(state["doc_index"], state["bad_records"], state["dropped_docs"],
                  state["batches"])

    def _next_prompt(self):
        """The next usable prompt, or None at the end of the stream."""
        c, fruitless = self.config, 0
        while self.plan.total is None or self._cursor < self.plan.total:
            epoch, j = self.plan.position(self._cursor)
            self._cursor += 1
            record = self.records.get(j, epoch)
            try:
                if isinstance(record, BadRecordError):
                    raise record
                prompt = prompt_from_record(record, self.tokenizer, c)
            except BadRecordError:
                if c.on_bad_record == "raise":
                    raise
                self.bad_record_count += 1
                prompt = None
            if prompt is not None and len(prompt.ids) > self.buckets[-1]:
                if c.long_docs != "drop":
                    raise UserError(
                        f"record {j}'s prompt has {len(prompt.ids)} tokens, more than the largest "
                        f"prompt bucket ({self.buckets[-1]}); add a larger bucket to "
                        "onpolicy.prompt_buckets, or set data.long_docs=drop to skip such prompts")
                self.dropped_doc_count += 1
                prompt = None
            if prompt is not None and len(prompt.ids):
                return prompt
            fruitless += 1
            if fruitless >= self.plan.per_epoch:
                raise UserError(f"no usable prompt in {', '.join(self.records.files)} (a whole "
                                "pass bad, empty or longer than the largest prompt bucket); "
                                "check the data with `distill-jax data check`")
        return None

    def __next__(self) -> dict[str, np.ndarray]:
        start = self.get_state()
        prompts = []
        while len(prompts) < self.rows:
            p = self._next_prompt()
            if p is None:
                self.set_state(start)  # an incomplete batch is not emitted
                raise StopIteration
            prompts.append(p)
        self.batch_count += 1
        return prompt_batch(prompts, max_new_tokens=self.max_new_tokens, buckets=self.buckets)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for training metrics: bad records, dropped prompts, batches."""
        return {"data/bad_records": self.bad_record_count,
                "data/dropped_docs": self.dropped_doc_count, "data/batches": self.batch_count}

    def close(self) -> None:
        """Nothing to stop (records are read in this process)."""


def combine_prompt_batches(batches: list[dict[str, np.ndarray]], width: int | None = None
                           ) -> dict[str, np.ndarray]:
    """Prompt batches of several shards as one: rows concatenated, the right-aligned prompts
    left-padded with 0 to the widest (or to ``width``)."""
    width = max(b["prompt_tokens"].shape[1] for b in batches) if width is None else width
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]
           if k != "prompt_tokens"}
    out["prompt_tokens"] = np.concatenate([
        np.pad(b["prompt_tokens"], ((0, 0), (width - b["prompt_tokens"].shape[1], 0)))
        for b in batches])
    return out


def make_prompt_iterator(config: DataConfig, tokenizer, *, max_new_tokens: int,
                         buckets: Sequence[int] = DEFAULT_BUCKETS, process_index: int = 0,
                         process_count: int = 1) -> ShardedIterator:
    """This process's rows of every global prompt batch: its data shards
    (:func:`distill_jax.data.process_shards`), combined by :func:`combine_prompt_batches` (to
    the largest bucket when there are several shards, so every process's arrays agree and the
    global batch is the same for any number of processes)."""
    local, shards = process_shards(config, process_index, process_count)
    records = read_records(config)
    width = max(buckets) if shards > 1 else None
    return ShardedIterator(
        {s: PromptIterator(config, tokenizer, max_new_tokens=max_new_tokens, buckets=buckets,
                           process_index=s, process_count=shards, records=records)
         for s in local},
        combine=lambda bs: combine_prompt_batches(bs, width))
