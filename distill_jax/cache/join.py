"""Join a teacher cache to packed batches by document index (the training side of the cache).

Each packed row carries ``doc_ids`` and ``doc_offsets``; the cache holds, per document token,
the teacher's top-k distribution for predicting the next token. :class:`CachedBatches` wraps the
data iterator (keeping its checkpointable state) and adds ``teacher_topk_ids``,
``teacher_topk_logprobs`` and ``teacher_tail_logmass`` to every batch, so the training step
needs no teacher.

Cross-tokenizer runs (``cross_tokenizer=True``) join by the teacher rows' ``teacher_doc_ids`` and
``teacher_doc_offsets`` instead and add what ALM needs per teacher token:
``teacher_actual_logprob``, ``teacher_boundary_logmass`` and ``teacher_valid`` (1 where the cache
covers the token).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from distill_jax.cache.store import CacheReader


class CachedBatches(grain.DatasetIterator):
    """Batches of ``iterator`` with the cached teacher rows of their tokens."""

    def __init__(self, iterator: Any, reader: CacheReader, *, cross_tokenizer: bool = False):
        super().__init__()
        self._it = iterator
        self.reader = reader
        self.cross_tokenizer = cross_tokenizer

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        if self.cross_tokenizer:
            rows = self.reader.read_tokens(batch["teacher_doc_ids"], batch["teacher_doc_offsets"],
                                           topk=False)
            valid = rows["valid"] & (batch["teacher_segment_ids"] > 0)
            batch["teacher_actual_logprob"] = np.where(valid, rows["actual_logprob"], 0).astype(np.float32)
            batch["teacher_boundary_logmass"] = np.where(valid, rows["boundary_logmass"], 0).astype(np.float32)
            batch["teacher_valid"] = valid.astype(np.float32)
            return batch
        rows = self.reader.read_tokens(batch["doc_ids"], batch["doc_offsets"])
        batch["teacher_topk_ids"] = rows["topk_ids"].astype(np.int32)
        batch["teacher_topk_logprobs"] = rows["topk_logprobs"].astype(np.float32)
        batch["teacher_tail_logmass"] = rows["tail_logmass"].astype(np.float32)
        batch["loss_mask"] = batch["loss_mask"] * rows["valid"]
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)

    @property
    def stats(self) -> dict[str, float]:
        return self._it.stats

    def close(self) -> None:
        self._it.close()
