"""Tokenisation: byte offsets, training masks for text / prompt+response / chat, BOS/EOS, teacher."""

from __future__ import annotations

import numpy as np
import pytest

from distill_jax.data import BadRecordError, DataConfig, tokenize_record
from distill_jax.data.testing import tiny_tokenizer
from distill_jax.tokens import bytes_to_unicode

_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}

TEXT = "Hello wörld 😀 東京! naïve café, привет ☃ℵ\n\n  tabs\there ±1."


@pytest.fixture(scope="module")
def byte_tok():
    return tiny_tokenizer("byte_level")


@pytest.fixture(scope="module")
def meta_tok():
    return tiny_tokenizer("metaspace", bos=True)


def _cfg(**kw) -> DataConfig:
    return DataConfig(seq_len=32, batch_size=2, **kw)


def _byte_level_bytes(tok, ids) -> list[bytes]:
    specials = set(tok.all_special_ids)
    return [b"" if i in specials else bytes(_UNICODE_TO_BYTE[c] for c in tok.convert_ids_to_tokens(int(i)))
            for i in ids]


def test_byte_offsets_byte_level_are_exact(byte_tok):
    doc = tokenize_record({"text": TEXT}, byte_tok, _cfg())
    data = TEXT.encode()
    pieces = _byte_level_bytes(byte_tok, doc.ids)
    assert [data[s:e] for s, e in zip(doc.byte_starts, doc.byte_ends)] == pieces
    # Contiguous and complete: a token holding part of a multi-byte character gets its part.
    assert doc.byte_starts[0] == 0 and doc.byte_ends[-1] == len(data)
    assert np.array_equal(doc.byte_starts[1:], doc.byte_ends[:-1])
    assert any(len(p) and not _decodes(p) for p in pieces), "test text should split a character"
    assert doc.ids[-1] == byte_tok.eos_token_id and doc.byte_starts[-1] == doc.byte_ends[-1] == len(data)


def _decodes(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_byte_offsets_metaspace_byte_fallback(meta_tok):
    doc = tokenize_record({"text": TEXT}, meta_tok, _cfg())
    data = TEXT.encode()
    tokens = meta_tok.convert_ids_to_tokens(doc.ids.tolist())
    assert tokens[0] == "<s>" and doc.byte_ends[0] == 0  # BOS: the tokenizer's default, zero-width
    assert any(t.startswith("<0x") for t in tokens), "test text should need byte fallback"
    for t, s, e in zip(tokens[1:-1], doc.byte_starts[1:-1], doc.byte_ends[1:-1]):
        expected = bytes([int(t[3:5], 16)]) if t.startswith("<0x") else t.replace("▁", " ").encode()
        assert data[s:e] == expected, (t, s, e)


def test_text_mask_and_bos_eos(byte_tok, meta_tok):
    doc = tokenize_record({"text": "one two"}, byte_tok, _cfg())
    assert byte_tok.bos_token_id not in doc.ids  # byte-level default: no BOS
    assert doc.trained.all()
    doc = tokenize_record({"text": "one two"}, byte_tok, _cfg(add_bos=True, add_eos=False))
    assert doc.ids[0] == byte_tok.bos_token_id and not doc.trained[0] and doc.trained[1:].all()
    assert doc.ids[-1] != byte_tok.eos_token_id
    # BOS already in the text (e.g. from a template) is not doubled.
    doc = tokenize_record({"text": "<s>one two"}, meta_tok, _cfg())
    assert list(doc.ids[:2]).count(meta_tok.bos_token_id) == 1


def test_prompt_response_mask(byte_tok):
    cfg = _cfg(record="prompt_response")
    rec = {"prompt": "Q: what is 2+2?\nA:", "response": " 4, naïvely 😀"}
    doc = tokenize_record(rec, byte_tok, cfg)
    assert doc.text == rec["prompt"] + rec["response"]
    assert byte_tok.decode(doc.ids[doc.trained]) == rec["response"] + byte_tok.eos_token
    assert doc.trained[-1]  # EOS is trained
    # No token straddles the prompt/response boundary.
    boundary = len(rec["prompt"].encode())
    assert boundary in set(doc.byte_starts.tolist())
    doc = tokenize_record(rec, byte_tok, _cfg(record="prompt_response", loss_on_prompt=True))
    assert doc.trained.all()


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi 😀"},
    {"role": "assistant", "content": "hello wörld"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "that is all."},
]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_chat_mask_is_exactly_the_assistant_turns(byte_tok, meta_tok):
    cfg = _cfg(record="chat")
    doc = tokenize_record({"messages": CHAT}, byte_tok, cfg, teacher_tokenizer=meta_tok)
    assert doc.text == byte_tok.apply_chat_template(CHAT, tokenize=False)
    turns = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    for tok, tokens in ((byte_tok, doc.student), (meta_tok, doc.teacher)):
        decoded = [tok.decode(tokens.ids[a:b]) for a, b in _runs(tokens.trained)]
        assert decoded == turns + [tok.eos_token]
    # loss_on_prompt: everything but a BOS.
    doc = tokenize_record({"messages": CHAT}, byte_tok, _cfg(record="chat", loss_on_prompt=True))
    assert doc.trained.all()


def test_chat_from_prompt_response_fields(byte_tok):
    doc = tokenize_record({"prompt": "2+2?", "response": "4"}, byte_tok, _cfg(record="chat"))
    assert doc.text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert byte_tok.decode(doc.ids[doc.trained]) == "4<|im_end|><|endoftext|>"


def test_chat_template_that_rewrites_earlier_turns():
    # Like Qwen3: reasoning is dropped from assistant turns that are followed by later turns.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tiny_tokenizer("byte_level", chat_template=template)
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>hmm</think>a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>so</think>a2"}]
    doc = tokenize_record({"messages": chat}, tok, _cfg(record="chat"))
    decoded = [tok.decode(doc.ids[a:b]) for a, b in _runs(doc.trained)]
    assert decoded == ["a1<|im_end|>", "<think>so</think>a2<|im_end|>", "<|endoftext|>"]


def test_teacher_tokenization_shares_byte_coordinates(byte_tok, meta_tok):
    doc = tokenize_record({"text": TEXT}, byte_tok, _cfg(), teacher_tokenizer=meta_tok)
    assert doc.teacher is not None and len(doc.teacher) != len(doc.student)
    n = len(TEXT.encode())
    for tokens in (doc.student, doc.teacher):
        assert tokens.byte_starts.min() == 0 and tokens.byte_ends.max() == n
        assert (tokens.byte_starts <= tokens.byte_ends).all() and (np.diff(tokens.byte_starts) >= 0).all()


def test_bad_raw_record(byte_tok):
    with pytest.raises(BadRecordError, match="missing field 'messages'"):
        tokenize_record({"text": "x"}, byte_tok, _cfg(record="chat"))
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_record({"messages": CHAT}, tiny_tokenizer(chat_template=None), _cfg(record="chat"))


def test_chat_eos_that_is_the_end_of_turn_token_is_not_added_again():
    tok = tiny_tokenizer("byte_level")
    tok.eos_token = "<|im_end|>"  # like SmolLM2 / Qwen instruct tokenizers
    doc = tokenize_record({"messages": CHAT}, tok, _cfg(record="chat"))
    assert list(doc.ids).count(tok.eos_token_id) == len(CHAT)  # one per turn, none appended
    decoded = [tok.decode(doc.ids[a:b]) for a, b in _runs(doc.trained)]
    assert decoded == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
