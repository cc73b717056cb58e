"""Data shards independent of the process count, so global batches do not depend on it.

The global batch is the concatenation of ``num_shards`` shard batches (``DataConfig.num_shards``,
default: the process count). Process ``p`` of ``P`` produces shards ``p*S/P ... (p+1)*S/P - 1``
and concatenates their rows. One process with ``num_shards=2`` therefore yields exactly the
global batch that two processes with one shard each assemble, which makes single-host
debugging reproduce a multi-host run step for step.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.pairs import PAIRS, make_pair_iterator
from distill_jax.data.pipeline import make_iterator


class ShardedIterator(grain.DatasetIterator):
    """This process's shard iterators, their batches concatenated along the rows (or put
    together by ``combine``, a function of the list of shard batches)."""

    def __init__(self, iterators: dict[int, Any],
                 combine: Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]
                 | None = None):
        super().__init__()
        self._its = iterators
        self._combine = combine or concatenate_rows

    def __next__(self) -> dict[str, np.ndarray]:
        return self._combine([next(it) for it in self._its.values()])

    def get_state(self) -> dict[str, Any]:
        return {"shards": {str(i): it.get_state() for i, it in self._its.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        shards = state.get("shards")
        if not isinstance(shards, dict) or sorted(shards) != sorted(map(str, self._its)):
            raise ValueError(f"the data state holds shards {sorted(shards or {})}, this process "
                             f"reads shards {sorted(self._its)}: resume with the same data.num_shards "
                             "and process count")
        for i, it in self._its.items():
            it.set_state(shards[str(i)])

    @property
    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for it in self._its.values():
            for k, v in it.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for it in self._its.values():
            it.close()


def concatenate_rows(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Shard batches concatenated along the rows, key by key."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def process_shards(config: DataConfig, process_index: int, process_count: int
                   ) -> tuple[range, int]:
    """``(the shards this process reads, the number of shards)`` of ``config``'s global batch
    (``data.num_shards``, default the process count), checked against the batch size."""
    shards = config.num_shards or process_count
    if shards % process_count:
        raise ValueError(f"data.num_shards={shards} must be a multiple of the {process_count} "
                         "processes")
    if config.batch_size % shards:
        raise ValueError(f"data.batch_size={config.batch_size} must divide into "
                         f"{shards} data shards")
    per = shards // process_count
    return range(process_index * per, (process_index + 1) * per), shards


def make_process_iterator(config: DataConfig, tokenizer, *, process_index: int = 0,
                          process_count: int = 1, teacher_tokenizer=None) -> ShardedIterator:
    """The iterator of this process's rows of every global batch (pair records, ``data.record:
    pairs``, packed as whole pairs: :mod:`distill_jax.data.pairs`; they have no teacher
    tokenization)."""
    local, shards = process_shards(config, process_index, process_count)
    if config.record == PAIRS:
        return ShardedIterator({s: make_pair_iterator(config, tokenizer, process_index=s,
                                                      process_count=shards) for s in local})
    return ShardedIterator({
        s: make_iterator(config, tokenizer, process_index=s, process_count=shards,
                         teacher_tokenizer=teacher_tokenizer)
        for s in local})
