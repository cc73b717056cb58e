"""Pair records -> packed rows carrying REDI's per-token ``sequence_weight``.

A pair record (``distill-jax traces select --policy pairs``) holds the prompt and the chosen
(verified) completion as chat ``messages`` and the rejected completion as ``rejected``. Each
completion becomes its own packed sequence, prompt + completion (+ the EOS token), with its own
segment id; both sequences of a pair go whole into one row (first-fit, in record order; a pair
that fits no row of the current batch closes it). A pair longer than a row is skipped and
counted, never truncated: REDI's normaliser counts whole positive completions
(:mod:`distill_jax.losses.redi`).

Row arrays (``rows`` x ``seq_len``): ``tokens``, ``targets`` (the next token; 0 at a
sequence's last position), ``positions`` (restarting per sequence), ``segment_ids`` (1, 2, ...
per sequence; 0 is padding), ``loss_mask`` (the chosen completion's targets: what ``sft``
would train on) and ``sequence_weight`` (float32, aligned with ``targets``: ``1/|y+|`` on the
chosen completion's targets, ``-alpha/|y-|`` on the rejected one's, 0 elsewhere). ``|y|`` counts
the completion's tokens including the EOS token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from distill_jax.losses.redi import DEFAULT_ALPHA, SEQUENCE_WEIGHT, check_alpha, pair_weights
from distill_jax.traces.run import encode_messages

FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", SEQUENCE_WEIGHT)


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: the prompt, the chosen and the rejected completion."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    @property
    def length(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def tokenize_pair(tokenizer: Any, record: Mapping[str, Any], *,
                  chat_template: bool | None = None) -> TokenizedPair:
    """The token ids of a pair record: the prompt messages rendered as for sampling
    (:func:`distill_jax.traces.run.encode_messages`), each completion encoded without special
    tokens and ended with the tokenizer's EOS token (when it has one)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2 \
            or messages[-1].get("role") != "assistant" or not isinstance(record.get("rejected"), str):
        raise ValueError("a pair record needs 'messages' ending with the chosen assistant "
                         "message and a 'rejected' completion (write them with `distill-jax "
                         "traces select --policy pairs`)")
    eos = getattr(tokenizer, "eos_token_id", None)
    tail = [] if eos is None else [int(eos)]

    def completion(text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]) \
            + tuple(tail)

    prompt = encode_messages(tokenizer, messages[:-1], chat_template)
    return TokenizedPair(tuple(prompt), completion(messages[-1]["content"]),
                         completion(record["rejected"]))


def _empty(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    out = {k: np.zeros((rows, seq_len), np.int32) for k in FIELDS}
    out["loss_mask"] = np.zeros((rows, seq_len), bool)
    out[SEQUENCE_WEIGHT] = np.zeros((rows, seq_len), np.float32)
    return out


def _put(batch: dict[str, np.ndarray], row: int, start: int, segment: int,
         prompt: Sequence[int], completion: Sequence[int], weight: float, chosen: bool) -> int:
    seq = list(prompt) + list(completion)
    n, end = len(seq), start + len(seq)
    batch["tokens"][row, start:end] = seq
    batch["targets"][row, start:end - 1] = seq[1:]
    batch["positions"][row, start:end] = np.arange(n)
    batch["segment_ids"][row, start:end] = segment
    # position t predicts seq[t + 1]: the completion is predicted from the prompt's last token
    lo, hi = start + len(prompt) - 1, end - 1
    batch[SEQUENCE_WEIGHT][row, lo:hi] = weight
    if chosen:
        batch["loss_mask"][row, lo:hi] = True
    return end


def pack_pairs(pairs: Iterable[TokenizedPair], *, rows: int, seq_len: int,
               alpha: float = DEFAULT_ALPHA) -> tuple[list[dict[str, np.ndarray]], int]:
    """Packed batches of ``rows`` x ``seq_len`` (see the module) and the number of pairs
    skipped for not fitting a row. The last batch may have empty rows."""
    check_alpha(alpha)
    if rows < 1 or seq_len < 2:
        raise ValueError(f"rows must be >= 1 and seq_len >= 2, got {rows} and {seq_len}")
    batches: list[dict[str, np.ndarray]] = []
    batch, fill, segs, skipped = None, [], [], 0
    for pair in pairs:
        if pair.length > seq_len:
            skipped += 1
            continue
        row = next((r for r in range(rows) if batch is not None
                    and fill[r] + pair.length <= seq_len), None)
        if row is None:
            if batch is not None:
                batches.append(batch)
            batch, fill, segs = _empty(rows, seq_len), [0] * rows, [0] * rows
            row = 0
        w_pos, w_neg = pair_weights(len(pair.chosen), len(pair.rejected), alpha)
        for completion, weight, chosen in ((pair.chosen, w_pos, True),
                                           (pair.rejected, w_neg, False)):
            segs[row] += 1
            fill[row] = _put(batch, row, fill[row], segs[row], pair.prompt, completion, weight,
                             chosen)
    if batch is not None:
        batches.append(batch)
    return batches, skipped


def pack_pair_file(path: str, tokenizer: Any, *, rows: int, seq_len: int,
                   alpha: float = DEFAULT_ALPHA, chat_template: bool | None = None
                   ) -> tuple[list[dict[str, np.ndarray]], int]:
    """:func:`pack_pairs` over the pair records of a JSONL file (``traces select --policy
    pairs`` output); a bad record raises naming its line."""
    from distill_jax.traces.store import read_jsonl
    pairs = []
    for n, record in enumerate(read_jsonl(path), 1):
        try:
            pairs.append(tokenize_pair(tokenizer, record, chat_template=chat_template))
        except ValueError as e:
            raise ValueError(f"{path}: record {n}: {e}") from None
    return pack_pairs(pairs, rows=rows, seq_len=seq_len, alpha=alpha)


__all__ = ["FIELDS", "TokenizedPair", "pack_pair_file", "pack_pairs", "tokenize_pair"]
