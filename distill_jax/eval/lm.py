"""Language-model evaluation on held-out text: bits per byte (tokenizer-independent) and perplexity.

A document is a tokenization with byte spans and a mask of the tokens that count
(:class:`distill_jax.data.tokenize.Tokens`, what the training pipeline produces: for ``text``
records every token but BOS, for prompt/response and chat records the response or assistant
tokens, everything with ``loss_on_prompt``). A token is *scored* when it counts and has a
token before it to be predicted from (so a document's first token never is).

Windows. Each document is cut into windows of ``seq_len`` predicted tokens: window ``k`` feeds
tokens ``[k*L, (k+1)*L)`` and predicts tokens ``[k*L+1, (k+1)*L]``, so every token after the
first is predicted exactly once; a window sees no context from the windows before it (give
``seq_len`` at least the longest document for exact document likelihoods). Windows without a
scored token are skipped. Windows are packed several to a row (their own segment ids, so they
never attend to each other; positions restart at 0 in each) into ``(batch_size, seq_len)``
batches: one compilation serves a whole evaluation.

Bits per byte divides the summed negative log-likelihood (in bits) of the scored tokens by the
UTF-8 bytes those tokens span (an added BOS or EOS spans none), which makes models with
different tokenizers comparable over the same text. Perplexity is ``exp`` of the mean NLL per
scored token. The lm_head runs ``chunk_size`` tokens at a time, so (batch, length, vocab)
logits never exist whole; all losses are in fp32, summed per batch on the device and across
batches in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses.chunked import chunked_scan
from distill_jax.metrics import progress as progress_lines
from distill_jax.models import Model, hidden_states, logits_from_hidden

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LMEval:
    """Summed NLL (nats) of the scored tokens, their number and the UTF-8 bytes they span.

    ``wall_s`` is the time the evaluation took (compilation included) and ``input_tokens`` the
    real (unpadded) tokens it ran through the model.
    """

    nll: float
    tokens: int
    bytes: int
    wall_s: float = 0.0
    input_tokens: int = 0

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def tokens_per_s(self) -> float:
        """Input tokens run through the model per second of wall time."""
        return self.input_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"bits_per_byte": self.bits_per_byte, "perplexity": self.perplexity,
                "nll_nats": self.nll, "tokens": self.tokens, "bytes": self.bytes,
                "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s}


@dataclasses.dataclass(frozen=True)
class ScoredDoc:
    """One document to score: token ``ids`` (n,), ``scored`` (n,) bool, and each token's byte
    span ``[byte_starts, byte_ends)`` (n,) in the document's UTF-8 text. ``scored[0]`` is
    ignored (nothing predicts the first token)."""

    ids: np.ndarray
    scored: np.ndarray
    byte_starts: np.ndarray
    byte_ends: np.ndarray

    @property
    def byte_widths(self) -> np.ndarray:
        return self.byte_ends - self.byte_starts


def scored_doc(tokens: Any) -> ScoredDoc:
    """A :class:`ScoredDoc` from a :class:`distill_jax.data.tokenize.Tokens` (its ``trained``
    mask says which tokens count)."""
    return ScoredDoc(np.asarray(tokens.ids, np.int32), np.asarray(tokens.trained, bool),
                     np.asarray(tokens.byte_starts, np.int64), np.asarray(tokens.byte_ends, np.int64))


def same_first_byte(a: ScoredDoc, b: ScoredDoc) -> tuple[ScoredDoc, ScoredDoc]:
    """Two tokenizations of one text with scoring starting at the same byte.

    A first token is never predicted, so where two tokenizers' first tokens end at different
    bytes (no BOS, whole text scored) their scored bytes would differ. Scoring starts instead,
    in both, at the first byte where both have a token starting that is at or after both first
    predicted tokens' starts; scored spans further in are unchanged.
    """
    if len(a.ids) < 2 or len(b.ids) < 2:
        return a, b
    lo = max(int(a.byte_starts[1]), int(b.byte_starts[1]))
    common = np.intersect1d(a.byte_starts[1:], b.byte_starts[1:])
    common = common[common >= lo]
    start = int(common[0]) if common.size else np.iinfo(np.int64).max

    def trim(d: ScoredDoc) -> ScoredDoc:
        keep = d.byte_starts >= start
        keep[0] = False
        return dataclasses.replace(d, scored=d.scored & keep)

    return trim(a), trim(b)


def text_docs(tokenizer: Any, texts: Sequence[str]) -> list[ScoredDoc]:
    """Plain texts as documents: tokenized whole (with BOS when the tokenizer adds one, no EOS),
    every token but BOS counting."""
    from distill_jax.data import DataConfig
    from distill_jax.data.tokenize import tokenize_records
    config = DataConfig(record="text", add_eos=False)
    docs = tokenize_records([{"text": t} for t in texts], tokenizer, config)
    for d in docs:
        if isinstance(d, Exception):
            raise d
    return [scored_doc(d.student) for d in docs]


def doc_totals(docs: Sequence[ScoredDoc]) -> tuple[int, int]:
    """(scored tokens, UTF-8 bytes they span) over ``docs``."""
    tokens = n_bytes = 0
    for d in docs:
        s = d.scored[1:]
        tokens += int(s.sum())
        n_bytes += int(d.byte_widths[1:][s].sum())
    return tokens, n_bytes


# ----------------------------------------------------------------------------------- batches
@dataclasses.dataclass(frozen=True)
class Batch:
    """A packed (B, L) batch of windows: input ``tokens``, ``segment_ids`` (0: padding),
    next-token ``targets`` and the float32 ``mask`` of scored targets; ``input_tokens`` is the
    number of real (non-padding) input tokens."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    input_tokens: int


def _windows(doc: ScoredDoc, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    n = len(doc.ids)
    for start in range(0, n - 1, seq_len):
        m = min(seq_len, n - 1 - start)
        mask = doc.scored[start + 1:start + 1 + m]
        if mask.any():
            yield doc.ids[start:start + m], doc.ids[start + 1:start + 1 + m], mask


def pack_batches(docs: Sequence[ScoredDoc], seq_len: int, batch_size: int) -> list[Batch]:
    """The windows of ``docs`` (see the module docstring) packed into (batch_size, seq_len)
    batches: longest window first, then the shortest that still fit into each row."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    windows = sorted((w for d in docs for w in _windows(d, seq_len)), key=lambda w: -len(w[0]))
    rows: list[list[tuple]] = []
    lo, hi = 0, len(windows) - 1
    while lo <= hi:
        row, free = [windows[lo]], seq_len - len(windows[lo][0])
        lo += 1
        while lo <= hi and len(windows[hi][0]) <= free:
            row.append(windows[hi])
            free -= len(windows[hi][0])
            hi -= 1
        rows.append(row)
    batches = []
    for b in range(0, len(rows), batch_size):
        shape = (batch_size, seq_len)
        tok, seg, tgt = (np.zeros(shape, np.int32) for _ in range(3))
        mask = np.zeros(shape, np.float32)
        for r, row in enumerate(rows[b:b + batch_size]):
            at = 0
            for s, (inp, out, m) in enumerate(row, start=1):
                k = len(inp)
                tok[r, at:at + k], tgt[r, at:at + k], mask[r, at:at + k] = inp, out, m
                seg[r, at:at + k] = s
                at += k
        batches.append(Batch(tok, seg, tgt, mask, int((seg > 0).sum())))
    return batches


def _data_shards(sharding: Any) -> int:
    """How many ways ``sharding`` (a NamedSharding) splits an array's first dimension."""
    if sharding is None:
        return 1
    first = sharding.spec[0] if len(sharding.spec) else None
    axes = first if isinstance(first, tuple) else (first,)
    return math.prod(sharding.mesh.shape[a] for a in axes if a is not None)


def batch_rows(batch_size: int, sharding: Any) -> int:
    """``batch_size`` rounded up to a multiple of the data-parallel shards of ``sharding``."""
    n = _data_shards(sharding)
    return -(-batch_size // n) * n


def device_put(x: np.ndarray, sharding: Any) -> Any:
    """``x`` as a global array laid out by ``sharding`` (each process fills its own shards;
    every process must pass the same ``x``); unchanged when ``sharding`` is None."""
    if sharding is None:
        return x
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def run_batches(fn: Callable[..., Any], batches: Sequence[Batch], sharding: Any = None, *,
                progress: bool = False, desc: str = "") -> tuple[np.ndarray, float]:
    """Sum ``fn(tokens, segment_ids, targets, mask)`` (a vector of device sums) over
    ``batches`` in float64; returns the sums and the wall time. Each batch's result is fetched
    after the next batch is dispatched, so the device does not wait for the host. ``progress``
    shows progress on stderr (a bar on a terminal, plain lines otherwise)."""
    t0 = time.perf_counter()
    total = np.zeros((), np.float64)
    pending = None
    for b in progress_lines(batches, desc or "eval", enabled=progress):
        arrays = [device_put(x, sharding) for x in (b.tokens, b.segment_ids, b.targets, b.mask)]
        result = fn(*arrays)
        if pending is not None:
            total = total + np.asarray(jax.device_get(pending), np.float64)
        pending = result
    if pending is not None:
        total = total + np.asarray(jax.device_get(pending), np.float64)
    return total, time.perf_counter() - t0


def chunked_token_sums(fn: Callable[..., Array], xs: Sequence[Array], chunk_size: int) -> Array:
    """Sum over chunks of ``chunk_size`` tokens of ``fn(*chunk)`` (each returning a vector of
    sums); ``xs`` are (N, ...) arrays, zero-padded to whole chunks (padding must carry a zero
    mask). Inside jit: only one chunk's logits exist at a time."""
    _, per_chunk = chunked_scan(lambda carry, c: (carry, fn(*c)), (), list(xs), chunk_size)
    return jnp.sum(per_chunk, axis=0)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _nll_sums(model: Model, tokens_BL, segment_ids_BL, targets_BL, mask_BL, *, chunk_size: int):
    """(summed NLL in nats, scored tokens) of one batch, fp32."""
    h_BLD = hidden_states(model, tokens_BL, segment_ids=segment_ids_BL)
    d = h_BLD.shape[-1]

    def chunk(h_CD, targets_C, mask_C):
        logits_CV = logits_from_hidden(model, h_CD[None])[0]
        logp_CV = jax.nn.log_softmax(logits_CV, axis=-1)
        nll_C = -jnp.take_along_axis(logp_CV, targets_C[:, None], axis=-1)[:, 0]
        return jnp.stack([jnp.sum(nll_C * mask_C), jnp.sum(mask_C)])

    return chunked_token_sums(chunk, [h_BLD.reshape(-1, d), targets_BL.reshape(-1),
                                      mask_BL.reshape(-1).astype(jnp.float32)], chunk_size)


def evaluate_docs(model: Model, docs: Sequence[ScoredDoc], *, seq_len: int = 512,
                  batch_size: int = 8, chunk_size: int = 1024, sharding: Any = None,
                  progress: bool = False) -> LMEval:
    """Bits per byte and perplexity of ``model`` over the scored tokens of ``docs``.

    ``sharding``: a NamedSharding for (batch, length) inputs (e.g.
    ``distill_jax.sharding.batch_sharding(mesh)``), rows spread over the data-parallel axes;
    ``batch_size`` is then rounded up to a multiple of those axes. ``progress`` shows progress
    on stderr.
    """
    tokens, n_bytes = doc_totals(docs)
    batches = pack_batches(docs, seq_len, batch_rows(batch_size, sharding))
    if not batches:
        return LMEval(0.0, 0, 0)
    fn = functools.partial(_nll_sums, model, chunk_size=chunk_size)
    sums, wall = run_batches(fn, batches, sharding, progress=progress, desc="bits per byte")
    if int(round(sums[1])) != tokens:
        raise AssertionError(f"scored {sums[1]} tokens, expected {tokens}")
    return LMEval(nll=float(sums[0]), tokens=tokens, bytes=n_bytes, wall_s=wall,
                  input_tokens=sum(b.input_tokens for b in batches))


def evaluate_text(model: Model, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 512,
                  batch_size: int = 8, chunk_size: int = 1024, progress: bool = False) -> LMEval:
    """Bits per byte and perplexity of ``model`` on ``texts`` (each text one document, tokenized
    whole with BOS when the tokenizer adds one; every token after the first is scored)."""
    return evaluate_docs(model, text_docs(tokenizer, texts), seq_len=seq_len,
                         batch_size=batch_size, chunk_size=chunk_size, progress=progress)
