"""Language-model evaluation on raw text: bits per byte (tokenizer-independent) and perplexity.

Every document is tokenized whole (with BOS when the tokenizer adds one) and cut into windows of
``seq_len`` predicted tokens; window ``i`` predicts tokens ``[i*L+1, (i+1)*L]`` from the tokens
just before them, so every token after the first is scored exactly once. Bits per byte divides
the summed negative log-likelihood (in bits) by the UTF-8 bytes those predicted tokens cover,
which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import Model, forward


@dataclasses.dataclass(frozen=True)
class LMEval:
    """Summed NLL (nats), predicted tokens and the UTF-8 bytes they cover."""

    nll: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def as_dict(self) -> dict[str, float]:
        return {"bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity,
                "nll_nats": self.nll, "tokens": self.tokens, "bytes": self.bytes}


def _windows(ids: Sequence[int], seq_len: int) -> Iterable[tuple[list[int], list[int]]]:
    for start in range(0, len(ids) - 1, seq_len):
        inputs = list(ids[start:start + seq_len])
        targets = list(ids[start + 1:start + seq_len + 1])
        inputs = inputs[:len(targets)]
        if targets:
            yield inputs, targets


@jax.jit
def _nll_sum(model: Model, tokens, targets, mask):
    logits = forward(model, tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask)


def evaluate_text(model: Model, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 512,
                  batch_size: int = 8) -> LMEval:
    """Bits per byte and perplexity of ``model`` on ``texts`` (each text one document)."""
    rows: list[tuple[list[int], list[int]]] = []
    n_bytes = 0
    for text in texts:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) < 2:
            continue
        # Bytes covered by tokens 1..n: everything after the end of token 0's span.
        first_end = offsets[0][1] if offsets[0][1] > offsets[0][0] else 0
        n_bytes += len(text.encode("utf-8")) - len(text[:first_end].encode("utf-8"))
        rows.extend(_windows(ids, seq_len))
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tok = np.zeros((batch_size, seq_len), np.int32)
        tgt = np.zeros((batch_size, seq_len), np.int32)
        mask = np.zeros((batch_size, seq_len), np.float32)
        for r, (inp, out) in enumerate(chunk):
            tok[r, :len(inp)] = inp
            tgt[r, :len(out)] = out
            mask[r, :len(out)] = 1.0
        nll += float(_nll_sum(model, tok, tgt, mask))
        count += int(mask.sum())
    return LMEval(nll=nll, tokens=count, bytes=n_bytes)
