"""What a tokenizer knows about bytes: each token's bytes, its special tokens, which tokens
start a word, its fingerprint; and :class:`Tokens`, one tokenization of a document.

Tokenization (:mod:`distill_jax.data`), alignment and vocabulary transfer (:mod:`distill_jax.xtok`),
the teacher cache and the losses read these facts from here; this module imports nothing of the
package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Tokens", "TokenizerInfo", "WHITESPACE_BYTES", "bytes_to_unicode", "special_token_ids",
           "token_bytes", "tokenizer_fingerprint", "tokenizer_info", "word_start_mask"]

WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"
_WHITESPACE_SET = frozenset(WHITESPACE_BYTES)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One tokenization of a document.

    Attributes:
      ids: int32 ``[n]`` token ids (with BOS/EOS when added).
      byte_starts, byte_ends: int32 ``[n]``, each token's span in the document's UTF-8 bytes.
      trained: bool ``[n]``, whether predicting this token is trained on.
    """

    ids: np.ndarray
    byte_starts: np.ndarray
    byte_ends: np.ndarray
    trained: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


class TokenizerInfo:
    """What tokenization and alignment need to know about a Hugging Face tokenizer (built lazily,
    once per tokenizer object and process; get it with :func:`tokenizer_info`).

    Attributes: ``backend`` (the Rust tokenizer without truncation/padding, or None),
    ``bos_id`` / ``eos_id`` / ``default_bos``, ``special_ids`` (sorted int64 ids of special
    tokens, special added tokens included), ``token_bytes`` (each id's bytes), ``byte_level``
    (whether the vocabulary is byte-level BPE) and ``missing_bytes``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            import tokenizers

            backend = tokenizers.Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.eos_token = tokenizer.eos_token if isinstance(getattr(tokenizer, "eos_token", None), str) else None
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.default_bos = bool(self.bos_id is not None and with_special[:1] == [self.bos_id]
                                and without[:1] != [self.bos_id])
        self._token_bytes: list[bytes | None] | None = None
        self._missing_bytes: frozenset[int] | None = None
        self._byte_level = False
        self.special_strings: tuple[str, ...] = tuple(
            t for t in getattr(tokenizer, "all_special_tokens", []) if isinstance(t, str) and t)
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
        if backend is not None:
            special |= {int(i) for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids = np.array(sorted(special), np.int64)

    def encode(self, text: str):
        """``(ids, offsets)`` of ``text`` without added special tokens; ``offsets()`` gives the
        character offsets (fetched only when needed: converting them costs as much as the rest)."""
        if self.backend is not None:
            enc = self.backend.encode(text, add_special_tokens=False)
            return enc.ids, lambda: enc.offsets
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), lambda: list(out["offset_mapping"])

    def encode_many(self, texts: Sequence[str]) -> list:
        """:meth:`encode` of several texts at once (the Rust tokenizer parallelises the batch)."""
        if self.backend is None or len(texts) < 2:
            return [self.encode(t) for t in texts]
        return [(enc.ids, (lambda enc=enc: enc.offsets))
                for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def token_bytes(self) -> list[bytes | None] | None:
        """Each id's exact bytes where the vocabulary spells them (byte-level BPE, byte fallback)."""
        if self._token_bytes is None and self.backend is not None:
            self._build_token_bytes()
        return self._token_bytes

    @property
    def byte_level(self) -> bool:
        """Whether the vocabulary is byte-level BPE (its symbols stand for bytes)."""
        self.token_bytes  # noqa: B018  (decided while the byte table is built)
        return self._byte_level

    @property
    def missing_bytes(self) -> frozenset[int]:
        """Bytes a byte-level vocabulary cannot spell (the tokenizer drops them); empty otherwise."""
        if self._missing_bytes is None:
            table = self.token_bytes
            single = {p[0] for p in table or () if p is not None and len(p) == 1}
            self._missing_bytes = frozenset(set(range(256)) - single) if self.byte_level else frozenset()
        return self._missing_bytes

    def _build_token_bytes(self) -> None:
        spec = json.loads(self.backend.to_str())
        decoder, pre = spec.get("decoder"), spec.get("pre_tokenizer")
        self._byte_level = _has_type(decoder, "ByteLevel") or _has_type(pre, "ByteLevel")
        metaspace = (_has_type(decoder, "Metaspace") or _has_type(pre, "Metaspace")
                     or "▁" in json.dumps([spec.get("normalizer"), decoder], ensure_ascii=False))
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        vocab = self.backend.get_vocab(with_added_tokens=True)
        table: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
        added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        for piece, i in vocab.items():
            if byte_fallback and (m := _BYTE_FALLBACK.match(piece)):
                table[i] = bytes([int(m.group(1), 16)])
            elif i in added:
                table[i] = added[i].encode("utf-8")
            elif self._byte_level:
                try:
                    table[i] = bytes(_UNICODE_TO_BYTE[c] for c in piece)
                except KeyError:
                    table[i] = None
            elif metaspace:
                table[i] = piece.replace("▁", " ").encode("utf-8")
        self._token_bytes = table


_INFOS: "weakref.WeakKeyDictionary[Any, TokenizerInfo]" = weakref.WeakKeyDictionary()


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """The :class:`TokenizerInfo` of a Hugging Face tokenizer, cached per tokenizer object (its
    byte table is built once, on first use)."""
    try:
        info = _INFOS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no caching
        return TokenizerInfo(tokenizer)
    if info is None:
        info = _INFOS[tokenizer] = TokenizerInfo(tokenizer)
    return info


def special_token_ids(tokenizer) -> np.ndarray:
    """Sorted int64 ids of a Hugging Face tokenizer's special tokens (special added tokens included)."""
    return tokenizer_info(tokenizer).special_ids


def token_bytes(tokenizer, ids: Sequence[int] | np.ndarray) -> list[bytes]:
    """The bytes each token id stands for, from the vocabulary.

    Byte-level BPE symbols map back to their bytes, SentencePiece's ``▁`` is a space (so the
    dummy prefix shows as a leading space on the first word), ``<0xNN>`` byte-fallback pieces are
    that byte, and added tokens are their text. Raises ``ValueError`` for an id whose bytes the
    vocabulary does not spell (a tokenizer that is neither byte-level nor SentencePiece-like).
    """
    table = tokenizer_info(tokenizer).token_bytes
    if table is None:
        raise ValueError(f"{type(tokenizer).__name__} has no Rust backend: its tokens' bytes are unknown; "
                         "use a fast (tokenizer.json) tokenizer")
    out = []
    for i in np.asarray(ids, np.int64).tolist():
        piece = table[i] if 0 <= i < len(table) else None
        if piece is None:
            raise ValueError(f"token id {i} has no byte spelling in this vocabulary (not byte-level, "
                             "SentencePiece or an added token)")
        out.append(piece)
    return out


def word_start_mask(tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """Bool ``(vocab_size,)``: tokens that start a new word -- their text begins with whitespace
    (byte-level BPE ``Ġ``/``Ċ``/``ĉ``..., SentencePiece ``▁``, a ``<0x20>``-style byte-fallback
    whitespace byte, or a literal whitespace character) -- or are special/added-special tokens.
    ``vocab_size`` (default: the tokenizer's) pads with False (ids the tokenizer does not have)."""
    vocab = tokenizer.get_vocab()
    n = vocab_size or (max(vocab.values()) + 1)
    mask = np.zeros(n, bool)
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    for tok, i in vocab.items():
        if i >= n or not tok:
            continue
        c = tok[0]
        if c == "\u2581" or c.isspace() or byte_of.get(c, -1) in _WHITESPACE_SET:
            mask[i] = True
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                mask[i] = int(tok[3:5], 16) in _WHITESPACE_SET
            except ValueError:
                pass
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        special |= {t for t, a in tokenizer.added_tokens_decoder.items() if a.special}
    except AttributeError:
        pass
    for i in special:
        if 0 <= i < n:
            mask[i] = True
    return mask


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and special tokens (what decides the token ids)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
