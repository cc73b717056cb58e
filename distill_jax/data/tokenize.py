"""Tokenising records with byte offsets and a per-token training mask, for one or two tokenizers.

A document is one UTF-8 string (``TokenizedDoc.text``): the text, ``prompt + response``, or the
conversation rendered with the student tokenizer's chat template. Every tokenization of it
carries, per token, its byte span ``[byte_start, byte_end)`` in ``text.encode("utf-8")`` and
whether it is *trained*: whether predicting it (from the tokens before it) counts in the loss.

Offsets. Fast tokenizers report character offsets; they are converted to byte offsets. For a
byte-level BPE the spans are exact: the tokens' bytes are concatenated and checked against the
text, so tokens holding part of a multi-byte character get their exact sub-character spans (and
trimmed offsets, ``trim_offsets=True``, are undone); bytes its vocabulary lacks, which it drops,
are left uncovered (its character offsets misplace the tokens around them). For other
tokenizers, runs of tokens whose character spans overlap (byte-fallback pieces of one character)
are split by the tokens' own bytes when those are known, a SentencePiece dummy-prefix ``▁`` (a
space the text does not have) getting no byte; a run that cannot be split so (its pieces spell
the normalised text, or are unknown) gives all but its last token zero width at the run's start
and the last one the run's bytes. So spans never overlap. Combining marks that a normaliser
composed into the character before them (NFC: no token's span covers them) go to the token
before them. Added BOS/EOS tokens are zero-width, at the start and the end of the text. EOS is
not added to a text that already ends with it (trailing whitespace aside), as chat templates
whose end-of-turn token is EOS do.

Masks. ``text``: every token but BOS. ``prompt_response``: prompt and response are tokenized
separately (so no token straddles them) and only the response tokens (and EOS) are trained.
``chat``: the whole conversation is tokenized at once, as at inference; each assistant turn's
span runs from the end of the rendered prefix with the generation prompt
(``apply_chat_template(messages[:i], add_generation_prompt=True)``) to the end of the rendered
turn (``messages[:i+1]``), trailing whitespace excluded, so it holds the reply and its
end-of-turn token. Where the template renders a turn differently once later turns follow
(reasoning dropped from earlier turns, say), the span ends at the first special token after the
turn's start; where it renders prefixes differently, the span starts at the assistant's content
found in the text. A token is
trained when its first byte lies in a trained span; EOS when the text's last non-space byte
does. ``loss_on_prompt`` trains everything but BOS.

Cross-tokenizer: the teacher tokenizes the same text (the student's rendering, for chat) the same
way, with its own BOS/EOS, so both tokenizations share the byte coordinates, and the document
carries their chunk alignment (:func:`distill_jax.xtok.align_tokens`, in mode
``config.alignment``): each token's chunk as a target, on both sides.
"""

from __future__ import annotations

import dataclasses
import operator
import unicodedata
from collections.abc import Sequence

import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.records import BadRecordError, Record, BadRow, validate_row
from distill_jax.tokens import Tokens, TokenizerInfo, tokenizer_info
from distill_jax.xtok.align import Alignment, align_tokens

__all__ = ["Tokens", "TokenizedDoc", "tokenize_record", "tokenize_records"]


@dataclasses.dataclass(frozen=True)
class TokenizedDoc:
    """A document's text and its student (and, cross-tokenizer, teacher) tokenization.

    Attributes:
      text: the document as one string (byte offsets index ``text.encode("utf-8")``).
      student: the student tokenizer's tokens.
      teacher: the teacher tokenizer's tokens of the same text, or None.
      doc_id: global document index (-1 when tokenized outside a pipeline).
      source, index: provenance (file and record index).
      alignment: with a teacher, the chunk alignment of the two tokenizations (chunk ids per
        token as a target, and each chunk's token range); None otherwise.
    """

    text: str
    student: Tokens
    teacher: Tokens | None = None
    doc_id: int = -1
    source: str = ""
    index: int = -1
    alignment: Alignment | None = None

    # The student's arrays, for convenience.
    @property
    def ids(self) -> np.ndarray:
        return self.student.ids

    @property
    def byte_starts(self) -> np.ndarray:
        return self.student.byte_starts

    @property
    def byte_ends(self) -> np.ndarray:
        return self.student.byte_ends

    @property
    def trained(self) -> np.ndarray:
        return self.student.trained


# ----------------------------------------------------------------------------------------------
# Byte offsets


def _char_to_byte(text: str) -> np.ndarray | None:
    """``table[c]`` = byte offset of character ``c`` (None for ASCII, where they coincide)."""
    if text.isascii():
        return None
    cp = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def _encode(info: TokenizerInfo, text: str, data: bytes, encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids and exact-where-possible byte spans of ``text`` (UTF-8 ``data``) from its ``encoding``."""
    ids_list, offsets = encoding
    ids = np.asarray(ids_list, np.int64)
    if not len(ids):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    tb = info.token_bytes
    if tb is not None and info.byte_level:
        try:
            pieces = operator.itemgetter(*ids_list)(tb)
        except IndexError:
            pieces = (None,)
        pieces = pieces if isinstance(pieces, tuple) else (pieces,)
        if None not in pieces and b"".join(pieces) == data:
            lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
            ends = np.cumsum(lengths)
            return ids, ends - lengths, ends
        if None not in pieces and info.missing_bytes:
            placed = _place_skipping(pieces, data, info.missing_bytes)
            if placed is not None:
                return ids, placed[0], placed[1]
    offs = np.asarray(offsets(), np.int64).reshape(-1, 2)
    table = _char_to_byte(text)
    if table is not None:
        offs = table[np.clip(offs, 0, len(table) - 1)]
    starts, ends = offs[:, 0].copy(), offs[:, 1].copy()
    _split_overlaps(ids_list, starts, ends, tb, data)
    _absorb_combining_marks(starts, ends, data)
    return ids, starts, ends


def _place_skipping(pieces: Sequence[bytes], data: bytes, missing: frozenset[int]):
    """Exact spans of a byte-level tokenization that dropped bytes its vocabulary lacks, or None.

    The tokens' bytes must be ``data`` with only such bytes removed; the dropped bytes are left
    uncovered (the tokenizer's character offsets misplace the tokens around them).
    """
    starts = np.empty(len(pieces), np.int64)
    ends = np.empty(len(pieces), np.int64)
    pos = 0
    for k, piece in enumerate(pieces):
        while not data.startswith(piece, pos):
            if pos >= len(data) or data[pos] not in missing:
                return None
            pos += 1
        starts[k], ends[k] = pos, pos + len(piece)
        pos += len(piece)
    if any(b not in missing for b in data[pos:]):
        return None
    return starts, ends


def _absorb_combining_marks(starts: np.ndarray, ends: np.ndarray, data: bytes) -> None:
    """Give uncovered combining marks (composed into the character before them) to the token before."""
    follow = np.concatenate([starts[1:], [len(data)]])
    reach = np.maximum.accumulate(ends)
    for k in np.flatnonzero((follow > reach) & (ends == reach)):
        lo, hi = int(ends[k]), int(follow[k])
        try:
            chars = data[lo:hi].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if chars and all(unicodedata.category(c).startswith("M") for c in chars):
            ends[k] = hi


def _split_overlaps(ids: Sequence[int], starts: np.ndarray, ends: np.ndarray,
                    tb: list[bytes | None] | None, data: bytes) -> None:
    """Give runs of tokens sharing one character's span their own bytes, where the vocabulary says.

    A leading SentencePiece dummy-prefix space gets no byte; a run the vocabulary cannot split
    gives all but its last token zero width at the run's start.
    """
    overlap = np.flatnonzero(starts[1:] < ends[:-1]) + 1
    if not overlap.size:
        return
    i = 0
    while i < overlap.size:
        first = int(overlap[i]) - 1
        last = int(overlap[i])
        while i + 1 < overlap.size and overlap[i + 1] == last + 1:
            i += 1
            last += 1
        i += 1
        lo, hi = int(starts[first]), int(ends[first:last + 1].max())
        pieces = [tb[t] if tb is not None and t < len(tb) else None for t in ids[first:last + 1]]
        joined = None if None in pieces else b"".join(pieces)
        if joined is not None and joined != data[lo:hi] and joined[:1] == b" " and joined[1:] == data[lo:hi]:
            pieces[0], joined = pieces[0][1:], joined[1:]  # the dummy prefix: a space not in the text
        if joined == data[lo:hi]:
            pos = lo
            for k, piece in enumerate(pieces):
                starts[first + k], ends[first + k] = pos, pos + len(piece)
                pos += len(piece)
        else:
            starts[first:last + 1] = lo
            ends[first:last] = lo
            ends[last] = hi


# ----------------------------------------------------------------------------------------------
# Rendering records to text + trained byte spans


def _render_chat(messages: list[dict], tokenizer, specials: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and the character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("data.record is 'chat' but the tokenizer has no chat_template; set "
                         "tokenizer.chat_template (a Jinja string) or use record: prompt_response")

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        full = render(messages, False)
    except Exception as err:
        raise BadRow(f"the chat template rejects this conversation ({type(err).__name__}: {err})") from None
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        try:
            prefix = render(messages[:i], True) if i else None
        except Exception:
            prefix = None
        start = len(prefix) if prefix is not None and len(prefix) >= cursor and full.startswith(prefix) else None
        found = full.find(content, cursor if start is None else start) if content else -1
        if found >= 0 and start is not None and any(sp in full[start:found] for sp in specials):
            found = -1  # that is a later turn's text: this turn was rendered differently
        if start is None:
            if found < 0:
                raise BadRow(f"assistant message {i} does not appear in the rendered chat template")
            start = found
        content_end = found + len(content) if found >= 0 else start
        try:
            through = render(messages[:i + 1], False)
        except Exception:
            through = None
        if through is not None and len(through) >= start and full.startswith(through):
            end = start + len(full[start:len(through)].rstrip())
        else:
            # The template renders this turn differently when it is the last one (e.g. it drops
            # reasoning from earlier turns): the turn ends at the first special token after it.
            end = content_end
            hits = [(full.find(sp, end), sp) for sp in specials]
            hits = [(k, sp) for k, sp in hits if k >= 0]
            if hits:
                k, sp = min(hits, key=lambda h: (h[0], -len(h[1])))
                end = k + len(sp)
            elif found < 0:
                end = len(full.rstrip())
        end = max(end, content_end)
        spans.append((start, end))
        cursor = end
    return full, spans


def _document(record: dict, config: DataConfig, tokenizer, specials: Sequence[str]):
    """``(text, segments, trained byte spans)``; segments are tokenized separately."""
    if config.record == "text":
        text = record["text"]
        n = len(text.encode("utf-8"))
        return text, [text], [(0, n)]
    if config.record == "prompt_response":
        prompt, response = record["prompt"], record["response"]
        p = len(prompt.encode("utf-8"))
        r = len(response.encode("utf-8"))
        return prompt + response, [prompt, response], [(0 if config.loss_on_prompt else p, p + r)]
    text, char_spans = _render_chat(record["messages"], tokenizer, specials)
    if config.loss_on_prompt:
        return text, [text], [(0, len(text.encode("utf-8")))]
    table = _char_to_byte(text)
    spans = [(int(table[s]), int(table[e])) if table is not None else (s, e) for s, e in char_spans]
    return text, [text], spans


def _tokenize(info: TokenizerInfo, text: str, segments: Sequence[str], spans: Sequence[tuple[int, int]],
              config: DataConfig, encodings: Sequence) -> Tokens:
    data = text.encode("utf-8")
    parts_ids, parts_s, parts_e = [], [], []
    base = 0
    for segment, encoding in zip(segments, encodings):
        seg_bytes = segment.encode("utf-8") if len(segments) > 1 else data
        ids, s, e = _encode(info, segment, seg_bytes, encoding)
        parts_ids.append(ids)
        parts_s.append(s + base)
        parts_e.append(e + base)
        base += len(seg_bytes)
    ids = np.concatenate(parts_ids)
    starts = np.concatenate(parts_s)
    ends = np.concatenate(parts_e)
    trained = np.zeros(len(ids), bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    add_bos = info.default_bos if config.add_bos is None else config.add_bos
    if add_bos and info.bos_id is not None and (not len(ids) or ids[0] != info.bos_id):
        ids = np.concatenate([[info.bos_id], ids])
        starts = np.concatenate([[0], starts])
        ends = np.concatenate([[0], ends])
        trained = np.concatenate([[False], trained])
    ends_with_eos = bool(len(ids)) and (ids[-1] == info.eos_id or (
        info.eos_token is not None and text.rstrip().endswith(info.eos_token)))
    if config.add_eos and info.eos_id is not None and not ends_with_eos:
        n = len(data)
        last = len(text.rstrip().encode("utf-8"))
        eos_trained = (config.record == "text" or config.loss_on_prompt
                       or any(lo < last <= hi for lo, hi in spans))
        ids = np.concatenate([ids, [info.eos_id]])
        starts = np.concatenate([starts, [n]])
        ends = np.concatenate([ends, [n]])
        trained = np.concatenate([trained, [eos_trained]])
    return Tokens(ids.astype(np.int32), starts.astype(np.int32), ends.astype(np.int32), trained)


def tokenize_record(record: Record | dict, tokenizer, config: DataConfig, *,
                    teacher_tokenizer=None) -> TokenizedDoc:
    """Tokenize one record with byte offsets and a training mask (see the module docstring).

    Args:
      record: a :class:`Record` from :func:`read_records`, or a raw row (a dict with the fields
        ``config`` names), validated here.
      tokenizer: the student's Hugging Face fast tokenizer (its chat template renders chats).
      config: the data config (record kind, field names, ``loss_on_prompt``, BOS/EOS).
      teacher_tokenizer: a second tokenizer, for cross-tokenizer runs: the teacher's tokens of
        the same text are returned too.

    Raises:
      BadRecordError: the record is unusable (a missing or mistyped field, a chat the template
        rejects).
    """
    (doc,) = tokenize_records([record], tokenizer, config, teacher_tokenizer=teacher_tokenizer)
    if isinstance(doc, BadRecordError):
        raise doc
    return doc


def tokenize_records(records: Sequence[Record | dict], tokenizer, config: DataConfig, *,
                     teacher_tokenizer=None) -> list[TokenizedDoc | BadRecordError]:
    """:func:`tokenize_record` over several records, encoded as one batch; errors are returned in place."""
    student = tokenizer_info(tokenizer)
    teacher = None if teacher_tokenizer is None else tokenizer_info(teacher_tokenizer)
    prepared: list = []
    for record in records:
        if isinstance(record, Record):
            data, source, index, doc_id = record.data, record.source, record.index, record.doc_id
        else:
            source, index, doc_id = "<record>", -1, -1
        try:
            if not isinstance(record, Record):
                data = validate_row(record, config)
            prepared.append((source, index, doc_id) + _document(data, config, tokenizer, student.special_strings))
        except BadRow as bad:
            prepared.append(BadRecordError(source, index, str(bad)))
    segments = [seg for p in prepared if not isinstance(p, BadRecordError) for seg in p[4]]
    encoded = {"student": iter(student.encode_many(segments))}
    if teacher is not None:
        encoded["teacher"] = iter(teacher.encode_many(segments))
    out: list[TokenizedDoc | BadRecordError] = []
    for p in prepared:
        if isinstance(p, BadRecordError):
            out.append(p)
            continue
        source, index, doc_id, text, segs, spans = p
        own = [next(encoded["student"]) for _ in segs]
        tokens = _tokenize(student, text, segs, spans, config, own)
        teacher_tokens = alignment = None
        if teacher is not None:
            theirs = [next(encoded["teacher"]) for _ in segs]
            teacher_tokens = _tokenize(teacher, text, segs, spans, config, theirs)
            chunks = align_tokens(tokens, teacher_tokens, text.encode("utf-8"), student.special_ids,
                                  teacher.special_ids, config.alignment)
            alignment = Alignment.from_chunks(*chunks)
        out.append(TokenizedDoc(text, tokens, teacher_tokens, doc_id, source, index, alignment))
    return out
