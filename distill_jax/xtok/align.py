"""Chunk alignment of two tokenizations of the same text, by byte spans.

Chunks are defined over *targets*: token ``j >= 1`` of a tokenization is what position ``j - 1``
predicts; token 0 is context only. Both token sequences carry byte spans ``[start, end)`` into the
text's UTF-8 bytes (:class:`distill_jax.data.Tokens`), so a chunk is found by walking both sides'
targets in order and closing a chunk whenever both sides have consumed exactly the same bytes:
the chunks are the smallest spans covering identical bytes on both sides. With identical
tokenizers every chunk is one token on each side.

Precisely:

* A *boundary* follows every token (token 0 included): the furthest byte consumed so far. It is
  a *byte boundary* when no later token starts before it, unless the token is a zero-width
  ordinary token at that byte. Between byte boundaries lie *runs*: tokens whose spans overlap
  (pieces of one character, where the tokenization could not split them) and zero-width ordinary
  tokens (SentencePiece's dummy-prefix ``▁``); each of their tokens is followed by a
  *sub-boundary*.
* Special tokens (the tokenizer's special and added-special ids, BOS/EOS included) align by role:
  a special target pairs with a special target of the other side with the same span (in order;
  zero-width ones, such as an added EOS, pair by position). Paired zero-width specials give the
  boundaries at their byte an order (before / after each pair), so each pair is its own chunk.
  A zero-width special present on one side only is skipped (chunk -1) without disturbing the rest.
* Byte boundaries present on both sides close chunks, and so do sub-boundaries where both sides
  have the same tokens (ids and spans) so far in the run: identical tokenizations split runs
  into one-token chunks, different ones keep a run in one chunk (a dummy prefix goes with the
  word after it). That is mode ``unconstrained``; in mode ``space`` only those followed by an
  ASCII whitespace byte, at the end of the text, or at the start or end of a special token close
  a chunk, so chunks run from word start to word start.
* A chunk is kept when either none of its tokens is special or it is exactly one special token
  on each side, and any bytes inside it that no token covers (characters outside a vocabulary)
  are the same on both sides. Otherwise (special mixed with ordinary tokens, a special with width
  on one side only, unequal numbers of specials, bytes one side skips) it is skipped on both
  sides. Targets before the first common boundary or after the last one (an unaligned head or
  tail) are skipped too.

Chunk ids increase along the text and are dense ``0..C-1``, except that anything skipped between
two kept chunks (a skipped chunk or a skipped special token) leaves one unused id: ``c + 1``
directly follows chunk ``c`` exactly when ``c + 1`` is present.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from distill_jax.tokens import WHITESPACE_BYTES, Tokens, special_token_ids, token_bytes

__all__ = ["Alignment", "MODES", "Mode", "WHITESPACE_BYTES", "align_tokens", "special_token_ids", "token_bytes"]

Mode = Literal["unconstrained", "space"]
MODES = ("unconstrained", "space")
_IS_WHITESPACE = np.zeros(257, bool)
_IS_WHITESPACE[list(WHITESPACE_BYTES)] = True
_IS_WHITESPACE[256] = True  # the end of the text
# Boundary keys: byte * _BYTE + (paired zero-width specials before it at that byte) * _ZERO_WIDTH,
# plus, for a sub-boundary inside a run, its number in the run.
_BYTE = 1 << 32
_ZERO_WIDTH = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Side:
    """One tokenization reduced to what the walk needs (skipped one-sided specials removed)."""

    index: np.ndarray  # int64 [m]: token index of each kept token (token 0 first)
    key: np.ndarray  # int64 [m]: the boundary after each kept token
    real: np.ndarray  # bool [m]: whether that boundary is a byte boundary (else inside a run)
    gap_from: np.ndarray  # int64 [m]: where uncovered bytes before each token start (== start: none)
    special: np.ndarray  # bool [m]
    ids: np.ndarray  # int64 [m]
    starts: np.ndarray  # int64 [m]
    ends: np.ndarray  # int64 [m]
    dropped: np.ndarray  # int64: indices of skipped one-sided zero-width specials


def _specials(ids: np.ndarray, special_ids: np.ndarray) -> np.ndarray:
    special_ids = np.asarray(special_ids, np.int64)
    small = special_ids.size and int(special_ids.max()) - int(special_ids.min()) < 1 << 20
    special = np.isin(ids, special_ids, kind="table" if small else None)
    if special.size:
        special[0] = False  # token 0 is never a target
    return special


def _pair_specials(tokens: Sequence, special: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per side, which special targets have a partner with the same span on the other side."""
    keys = []
    for t, sp in zip(tokens, special):
        seen: dict[tuple[int, int], int] = {}
        side = []
        for k in np.flatnonzero(sp):
            span = (int(t.byte_starts[k]), int(t.byte_ends[k]))
            seen[span] = seen.get(span, 0) + 1
            side.append((span, seen[span]))
        keys.append(side)
    out = []
    for a, b in ((0, 1), (1, 0)):
        other = set(keys[b])
        paired = np.zeros(len(special[a]), bool)
        paired[np.flatnonzero(special[a])] = [k in other for k in keys[a]]
        out.append(paired)
    return out


def _side(t, special: np.ndarray, paired: np.ndarray) -> _Side:
    starts = np.asarray(t.byte_starts, np.int64)
    ends = np.asarray(t.byte_ends, np.int64)
    zero = starts == ends
    dropped = special & ~paired & zero
    index = np.flatnonzero(~dropped)
    s, e = starts[index], ends[index]
    m = len(index)
    reach = np.maximum.accumulate(e)  # furthest byte consumed after each kept token
    later = np.minimum.accumulate(s[::-1])[::-1]  # earliest start at or after each kept token
    clean = np.ones(m, bool)
    clean[:-1] = reach[:-1] <= later[1:]
    before = np.concatenate([[s[0]], reach[:-1]])  # the furthest byte consumed before each token
    # Order the boundaries at one byte around the paired zero-width specials sitting there.
    ordered = (paired & zero)[index] & (s == reach)
    count = np.cumsum(ordered)
    run_start = np.flatnonzero(np.concatenate([[True], reach[1:] != reach[:-1]]))
    first = run_start[np.searchsorted(run_start, np.arange(m), side="right") - 1]
    before_run = np.where(first > 0, count[np.maximum(first - 1, 0)], 0)
    primary = reach * _BYTE + (count - before_run) * _ZERO_WIDTH
    # Byte boundaries: clean ones, except right after a zero-width ordinary token sitting at the
    # frontier (a dummy-prefix space). The others are sub-boundaries of a run -- overlapping
    # spans (pieces of one character), zero-width tokens -- numbered from the run's start.
    real = clean & ~((zero & ~special)[index] & (s == before))
    real[0] = clean[0]  # token 0 (a BOS, say) is context, whatever its width
    last = np.maximum.accumulate(np.where(real, np.arange(m), -1))
    base = np.where(last >= 0, primary[np.maximum(last, 0)], s[0] * _BYTE)
    step = np.minimum(np.arange(m) - last, _ZERO_WIDTH - 1)
    key = np.where(real, primary, base + step)
    return _Side(index, key, real, np.minimum(before, s), special[index], np.asarray(t.ids, np.int64)[index],
                 s, e, np.flatnonzero(dropped))


def _sorted_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct values in both of two sorted arrays (sorted)."""
    if not a.size or not b.size:
        return a[:0]
    a = a[np.concatenate([[True], a[1:] != a[:-1]])]
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[at] == a]


def _matching_sub_boundaries(sides: Sequence[_Side]) -> np.ndarray:
    """Sub-boundaries present on both sides after identical tokens (same ids and spans) in the run."""
    a, b = sides
    both = _sorted_intersection(a.key[~a.real], b.key[~b.real])
    accepted: set[int] = set()
    for key in both.tolist():
        ka, kb = np.searchsorted(a.key, key), np.searchsorted(b.key, key)
        same = (a.ids[ka] == b.ids[kb] and a.starts[ka] == b.starts[kb] and a.ends[ka] == b.ends[kb])
        if same and (key % _ZERO_WIDTH == 1 or key - 1 in accepted):
            accepted.add(key)
    return np.array(sorted(accepted), np.int64)


def align_tokens(student: Tokens, teacher: Tokens, text_bytes: bytes, student_special: np.ndarray,
                 teacher_special: np.ndarray, mode: Mode = "unconstrained") -> tuple[np.ndarray, np.ndarray]:
    """Chunk ids of both tokenizations' tokens, as targets (see the module docstring).

    Args:
      student, teacher: two tokenizations of ``text_bytes`` (``ids``, ``byte_starts``,
        ``byte_ends``; zero-width spans for added BOS/EOS).
      text_bytes: the text's UTF-8 bytes (the spans index them).
      student_special, teacher_special: the ids of each tokenizer's special tokens
        (:func:`special_token_ids`).
      mode: ``unconstrained`` (every common boundary closes a chunk) or ``space`` (only those at
        word starts, the end of the text or a special token).

    Returns:
      ``(student_chunks, teacher_chunks)``: int32 arrays as long as each tokenization, the chunk
      of each token as a target, -1 where it is not aligned (always for token 0).
    """
    if mode not in MODES:
        raise ValueError(f"alignment mode must be one of {MODES}, got {mode!r}")
    tokens = (student, teacher)
    out = [np.full(len(t.ids), -1, np.int32) for t in tokens]
    if min(len(t.ids) for t in tokens) < 2:
        return out[0], out[1]
    special = [_specials(np.asarray(t.ids), sp) for t, sp in zip(tokens, (student_special, teacher_special))]
    paired = _pair_specials(tokens, special)
    sides = [_side(t, sp, p) for t, sp, p in zip(tokens, special, paired)]
    common = _sorted_intersection(sides[0].key[sides[0].real], sides[1].key[sides[1].real])
    sub = _matching_sub_boundaries(sides)
    if sub.size:
        common = np.union1d(common, sub)
    if mode == "space" and len(common) > 2:
        common = common[_word_boundaries(common // _BYTE, text_bytes, tokens, special, sides)]
    if len(common) < 2:
        return out[0], out[1]
    num = len(common) - 1  # candidate chunks: (common[c], common[c + 1]]
    cand, counts, gaps = [], [], []
    for side in sides:
        c = np.searchsorted(common, side.key, side="left") - 1
        inside = (c >= 0) & (c < num)
        inside[0] = False  # token 0 is context
        c = np.where(inside, c, num)  # num collects the unaligned head and tail
        cand.append(c)
        counts.append((np.bincount(c, minlength=num + 1)[:num],
                       np.bincount(c, weights=side.special, minlength=num + 1)[:num]))
        gap = {}
        for k in np.flatnonzero(side.gap_from < side.starts):  # bytes no token covers
            gap.setdefault(int(c[k]), []).append((int(side.gap_from[k]), int(side.starts[k])))
        gaps.append(gap)
    (n0, s0), (n1, s1) = counts
    ordinary = (s0 == 0) & (s1 == 0)
    one_special = (s0 == 1) & (s1 == 1) & (n0 == 1) & (n1 == 1)
    valid = (ordinary | one_special) & (n0 > 0) & (n1 > 0)
    for c in set(gaps[0]) | set(gaps[1]):  # the same bytes must be uncovered on both sides
        if c < num and gaps[0].get(c) != gaps[1].get(c):
            valid[c] = False
    # Skipped zero-width specials that sit on a boundary between two chunks: a gap in the ids.
    skipped_at = np.zeros(num + 1, bool)
    for side in sides:
        if side.dropped.size:
            prev = np.searchsorted(side.index, side.dropped) - 1  # the kept token before each
            at = np.searchsorted(common, side.key[prev])
            on = (at < len(common)) & (common[np.minimum(at, len(common) - 1)] == side.key[prev])
            skipped_at[at[on]] = True
    kept = np.flatnonzero(valid)
    if not kept.size:
        return out[0], out[1]
    step = np.ones(len(kept), np.int64)
    step[0] = 0
    step[1:] += (np.diff(kept) > 1) | skipped_at[kept[1:]]
    ids = np.full(num + 1, -1, np.int64)
    ids[kept] = np.cumsum(step)
    for o, side, c in zip(out, sides, cand):
        o[side.index] = ids[c]
    return out[0], out[1]


def _word_boundaries(pos: np.ndarray, text_bytes: bytes, tokens: Sequence, special: Sequence[np.ndarray],
                     sides: Sequence[_Side]) -> np.ndarray:
    """Which common boundaries (byte positions ``pos``) may close a chunk in mode ``space``."""
    data = np.frombuffer(text_bytes, np.uint8)
    following = np.full(len(pos), 256, np.int64)
    inside = pos < len(data)
    following[inside] = data[pos[inside]]
    ok = _IS_WHITESPACE[following]
    ok[0] = True  # where the aligned text starts
    edges = []
    for t, sp, side in zip(tokens, special, sides):
        live = np.zeros(len(sp), bool)
        live[side.index] = True
        live &= sp
        edges += [np.asarray(t.byte_starts)[live], np.asarray(t.byte_ends)[live]]
    edges = np.concatenate(edges)
    if edges.size:
        ok |= np.isin(pos, edges)
    return ok


@dataclasses.dataclass(frozen=True)
class Alignment:
    """A document's chunk alignment: chunk ids per token and each chunk's token range.

    Attributes:
      student_chunks, teacher_chunks: int32 ``[n_student]`` / ``[n_teacher]``, the chunk of each
        token as a target (:func:`align_tokens`), -1 where not aligned.
      bounds: int32 ``[num_ids, 4]``: the first and last student target and the first and last
        teacher target of each chunk id; -1 for ids left unused (gaps).
    """

    student_chunks: np.ndarray
    teacher_chunks: np.ndarray
    bounds: np.ndarray

    @classmethod
    def from_chunks(cls, student_chunks: np.ndarray, teacher_chunks: np.ndarray) -> "Alignment":
        """The alignment with its chunk bounds computed from the chunk ids."""
        num = 1 + max(int(student_chunks.max(initial=-1)), int(teacher_chunks.max(initial=-1)))
        bounds = np.full((num, 4), -1, np.int32)
        for col, chunks in ((0, student_chunks), (2, teacher_chunks)):
            idx = np.flatnonzero(chunks >= 0)
            ids = chunks[idx]
            first = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]])) if ids.size else idx
            last = np.concatenate([first[1:] - 1, [len(ids) - 1]]) if ids.size else idx
            bounds[ids[first], col] = idx[first]
            bounds[ids[first], col + 1] = idx[last]
        return cls(student_chunks, teacher_chunks, bounds)

    @property
    def num_chunks(self) -> int:
        """Chunks kept (ids in use)."""
        return int((self.bounds[:, 0] >= 0).sum())


