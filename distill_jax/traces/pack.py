"""Pair records -> packed rows carrying REDI's per-token ``sequence_weight``, from a file.

The packing itself (its layout and weights) is the data pipeline's, :mod:`distill_jax.data.pairs`
(``data.record: pairs`` trains from a config); this module packs a whole JSONL file at once, for
inspection and tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill_jax.data.pairs import FIELDS, TokenizedPair, pack_pairs, tokenize_pair
from distill_jax.traces.store import read_jsonl


def pack_pair_file(path: str, tokenizer: Any, *, rows: int, seq_len: int,
                   chat_template: bool | None = None) -> tuple[list[dict[str, np.ndarray]], int]:
    """:func:`~distill_jax.data.pairs.pack_pairs` over the pair records of a JSONL file
    (``traces select --policy pairs`` output), in file order; a bad record raises naming its
    line."""
    pairs = []
    for n, record in enumerate(read_jsonl(path), 1):
        try:
            pairs.append(tokenize_pair(tokenizer, record, chat_template=chat_template))
        except ValueError as e:
            raise ValueError(f"{path}: record {n}: {e}") from None
    return pack_pairs(pairs, rows=rows, seq_len=seq_len)


__all__ = ["FIELDS", "TokenizedPair", "pack_pair_file", "pack_pairs", "tokenize_pair"]
