"""Packing tokenized documents into fixed-length rows: first-fit, with long documents split.

A batch of ``rows`` rows is filled in stream order. Each document (or the rest of one already
partly packed) goes whole into the first row with room for it. A document that fits no row
whole but is longer than a row anyway (``long_docs="split"``) is cut: its head fills the row
with the most room left and its rest continues (in that batch's other rows or in the next
batch); so long documents also fill the gaps shorter ones leave. The first document that fits
nowhere closes the batch and opens the next one. Batches are therefore a pure function of the
document order, and a stream position (document, student token offset, teacher token offset)
is all it takes to resume exactly.

Cross-tokenizer runs pack a parallel teacher row of ``teacher_seq_len`` tokens per student row:
every piece must fit both, and a piece is cut only where both tokenizations have a token
boundary at the same byte, so the teacher row holds the teacher's tokens of exactly the piece's
bytes. (Only if a full row has no such boundary does the cut fall on a student boundary alone,
a teacher token straddling it going with the piece it starts in.)

Such rows also carry the chunk alignment (``chunk_ids``, ``teacher_chunk_ids``): the document's
chunk of each position's target (:mod:`distill_jax.xtok.align`), kept only for chunks whose
targets all lie in the row's piece on both sides (a piece's last position predicts the next
piece's first token, so a chunk at a cut can be incomplete on either side: it is -1 on both),
and renumbered per row: ``0, 1, 2, ...`` in row order, a gap of at least one id wherever the
document's numbering has one or a new segment starts, so chunk ``c + 1`` directly follows chunk
``c`` in the text exactly when id ``c + 1`` is present.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distill_jax.data.tokenize import TokenizedDoc, Tokens

__all__ = ["ALIGNMENT_FIELDS", "BatchPacker", "Piece", "Segment", "STUDENT_FIELDS", "TEACHER_FIELDS", "cut_point",
           "row_segments"]

STUDENT_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "doc_ids", "doc_offsets",
                  "byte_starts", "byte_ends")
TEACHER_FIELDS = tuple(f"teacher_{name}" for name in STUDENT_FIELDS)
ALIGNMENT_FIELDS = ("chunk_ids", "teacher_chunk_ids")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Tokens ``[s0, s1)`` of a document's student tokens and ``[t0, t1)`` of its teacher's."""

    doc: TokenizedDoc
    s0: int
    s1: int
    t0: int = 0
    t1: int = 0


def cut_point(doc: TokenizedDoc, s: int, t: int, max_tokens: int, max_teacher_tokens: int | None = None, *,
              common_only: bool = True) -> tuple[int, int] | None:
    """Where to end a piece that starts at student token ``s`` (teacher token ``t``).

    Returns the furthest ``(s1, t1)`` such that the piece has at most ``max_tokens`` student and
    ``max_teacher_tokens`` teacher tokens, ``(len(student), len(teacher))`` if the whole rest
    fits, or None if no non-empty piece fits. With a teacher the cut must be a byte where both
    tokenizations have a boundary; ``common_only=False`` falls back to a student boundary.
    """
    n = len(doc.student)
    if max_tokens < 1 or s >= n:
        return None
    teacher = doc.teacher
    if teacher is None or max_teacher_tokens is None:
        return (min(n, s + max_tokens), 0)
    nt = len(teacher)
    if n - s <= max_tokens and nt - t <= max_teacher_tokens:
        return (n, nt)
    ks = np.arange(s + 1, min(s + max_tokens, n - 1) + 1)
    if not ks.size:
        return None
    ss, se = doc.student.byte_starts, doc.student.byte_ends
    ts, te = teacher.byte_starts, teacher.byte_ends
    cut = ss[ks]
    kt = np.searchsorted(ts, cut, side="left")
    ok = (kt >= t) & (kt - t <= max_teacher_tokens)
    common = ok & (se[ks - 1] <= cut) & (kt < nt)
    common &= (ts[np.minimum(kt, nt - 1)] == cut) & ((kt == 0) | (te[np.maximum(kt - 1, 0)] <= cut))
    found = np.flatnonzero(common)
    if not found.size and not common_only:
        found = np.flatnonzero(ok)
    if not found.size:
        return None
    return int(ks[found[-1]]), int(kt[found[-1]])


def _fill(out: dict[str, np.ndarray], prefix: str, row: int, pos: int, tokens: Tokens, lo: int, hi: int,
          segment: int, doc_id: int) -> None:
    n = hi - lo
    ids = tokens.ids
    sl = slice(pos, pos + n)
    nxt = np.arange(lo + 1, hi + 1)
    real = nxt < len(ids)
    nxt = np.minimum(nxt, len(ids) - 1)
    out[prefix + "tokens"][row, sl] = ids[lo:hi]
    out[prefix + "targets"][row, sl] = np.where(real, ids[nxt], 0)
    out[prefix + "loss_mask"][row, sl] = real & tokens.trained[nxt]
    out[prefix + "positions"][row, sl] = np.arange(n)
    out[prefix + "segment_ids"][row, sl] = segment
    out[prefix + "doc_ids"][row, sl] = doc_id
    out[prefix + "doc_offsets"][row, sl] = np.arange(lo, hi)
    out[prefix + "byte_starts"][row, sl] = tokens.byte_starts[lo:hi]
    out[prefix + "byte_ends"][row, sl] = tokens.byte_ends[lo:hi]


def _window(chunks: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Chunk ids of the targets of positions ``[lo, hi)`` (tokens ``lo + 1 .. hi``); -1 past the end."""
    w = np.full(hi - lo, -1, np.int32)
    real = chunks[lo + 1:hi + 1]
    w[:len(real)] = real
    return w


def _fill_chunks(out: dict[str, np.ndarray], row: int, pieces: list[Piece]) -> None:
    """Row-local chunk ids of the pieces of row ``row`` (see the module docstring)."""
    pos = pos_t = 0
    last = None  # row id of the last kept chunk in this row
    for p in pieces:
        a = p.doc.alignment
        if a is None:
            raise ValueError(f"document {p.doc.doc_id} has a teacher tokenization but no chunk alignment; "
                             "tokenize it with tokenize_records(..., teacher_tokenizer=...)")
        ws, wt = _window(a.student_chunks, p.s0, p.s1), _window(a.teacher_chunks, p.t0, p.t1)
        kept = []
        for w in (ws, wt):
            b = a.bounds[np.maximum(w, 0)]
            kept.append((w >= 0) & (b[:, 0] > p.s0) & (b[:, 1] <= p.s1) & (b[:, 2] > p.t0) & (b[:, 3] <= p.t1))
        doc_ids = np.unique(ws[kept[0]])
        if doc_ids.size:
            step = np.ones(len(doc_ids), np.int64)
            step[1:] += np.diff(doc_ids) > 1
            step[0] = 0 if last is None else 2
            row_ids = (0 if last is None else last) + np.cumsum(step)
            last = int(row_ids[-1])
            for w, k, prefix, at in ((ws, kept[0], "", pos), (wt, kept[1], "teacher_", pos_t)):
                ids = np.where(k, row_ids[np.minimum(np.searchsorted(doc_ids, w), len(doc_ids) - 1)], -1)
                out[prefix + "chunk_ids"][row, at:at + len(w)] = ids
        pos += p.s1 - p.s0
        pos_t += p.t1 - p.t0


def _empty(prefix: str, rows: int, length: int) -> dict[str, np.ndarray]:
    out = {prefix + name: np.zeros((rows, length), np.int32) for name in STUDENT_FIELDS}
    out[prefix + "loss_mask"] = np.zeros((rows, length), np.float32)
    out[prefix + "doc_ids"].fill(-1)
    return out


class BatchPacker:
    """Pieces placed into a ``(rows, seq_len)`` batch (and a ``(rows, teacher_seq_len)`` one)."""

    def __init__(self, rows: int, seq_len: int, teacher_seq_len: int | None = None):
        self.rows, self.seq_len, self.teacher_seq_len = rows, seq_len, teacher_seq_len
        self._pieces: list[list[Piece]] = [[] for _ in range(rows)]
        self._used = np.zeros(rows, np.int64)
        self._used_t = np.zeros(rows, np.int64)

    @property
    def empty(self) -> bool:
        return not any(self._pieces)

    def room(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Free student (and teacher) tokens per row."""
        teacher = None if self.teacher_seq_len is None else self.teacher_seq_len - self._used_t
        return self.seq_len - self._used, teacher

    def first_fit(self, tokens: int, teacher_tokens: int = 0) -> int:
        """The first row with room for a piece of that size, or -1."""
        room, room_t = self.room()
        fits = room >= tokens
        if room_t is not None:
            fits &= room_t >= teacher_tokens
        rows = np.flatnonzero(fits)
        return int(rows[0]) if rows.size else -1

    def place(self, row: int, piece: Piece) -> None:
        self._pieces[row].append(piece)
        self._used[row] += piece.s1 - piece.s0
        self._used_t[row] += piece.t1 - piece.t0
        assert self._used[row] <= self.seq_len and (self.teacher_seq_len is None
                                                    or self._used_t[row] <= self.teacher_seq_len)

    def emit(self) -> dict[str, np.ndarray]:
        """The batch (see the ``distill_jax.data`` batch contract); the packer starts empty again."""
        out = _empty("", self.rows, self.seq_len)
        if self.teacher_seq_len is not None:
            out.update(_empty("teacher_", self.rows, self.teacher_seq_len))
            out["chunk_ids"] = np.full((self.rows, self.seq_len), -1, np.int32)
            out["teacher_chunk_ids"] = np.full((self.rows, self.teacher_seq_len), -1, np.int32)
        for r, pieces in enumerate(self._pieces):
            pos = pos_t = 0
            for segment, p in enumerate(pieces, start=1):
                _fill(out, "", r, pos, p.doc.student, p.s0, p.s1, segment, p.doc.doc_id)
                pos += p.s1 - p.s0
                if self.teacher_seq_len is not None:
                    _fill(out, "teacher_", r, pos_t, p.doc.teacher, p.t0, p.t1, segment, p.doc.doc_id)
                    pos_t += p.t1 - p.t0
            if self.teacher_seq_len is not None:
                _fill_chunks(out, r, pieces)
        self.__init__(self.rows, self.seq_len, self.teacher_seq_len)
        return out


@dataclasses.dataclass(frozen=True)
class Segment:
    """One packed piece of a row: its document, its bytes and where its tokens sit."""

    segment_id: int
    doc_id: int
    byte_start: int
    byte_end: int
    token_start: int
    token_end: int
    teacher_token_start: int = 0
    teacher_token_end: int = 0


def row_segments(batch: dict[str, np.ndarray], row: int) -> list[Segment]:
    """The documents (and byte ranges) that row ``row`` of a packed batch holds, in order."""
    seg = batch["segment_ids"][row]
    out = []
    has_teacher = "teacher_segment_ids" in batch
    for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        t_lo = t_hi = 0
        if has_teacher:
            tidx = np.flatnonzero(batch["teacher_segment_ids"][row] == s)
            if tidx.size:
                t_lo, t_hi = int(tidx[0]), int(tidx[-1]) + 1
        out.append(Segment(int(s), int(batch["doc_ids"][row, lo]), int(batch["byte_starts"][row, lo:hi].min()),
                           int(batch["byte_ends"][row, lo:hi].max()), lo, hi, t_lo, t_hi))
    return out
