"""Tiny tokenizers and corpora for tests and benchmarks (no model hub needed).

``tiny_tokenizer()`` trains a byte-level BPE (GPT-2 style) or a SentencePiece-like BPE with byte
fallback on a few KB of text in milliseconds and wraps it as a ``transformers`` fast tokenizer
with a ChatML chat template, so the data pipeline can be tested end to end offline.
"""

from __future__ import annotations

import random

__all__ = ["CHATML_TEMPLATE", "english_like_text", "tiny_tokenizer"]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will what out up into more "
    "other then them these its time only about could some after first two may said also new over most "
    "language model teacher student distillation token sentence paper night river garden question answer "
    "naïve café façade déjà vu Straße Ölfeld 東京 日本語 мир привет 😀 🚀 ±"
).split()


def english_like_text(num_words: int, seed: int = 0, *, unicode: bool = True) -> str:
    """Deterministic pseudo-English: sentences of common words (some non-ASCII when ``unicode``)."""
    rng = random.Random(seed)
    words = _WORDS if unicode else [w for w in _WORDS if w.isascii()]
    out, sentence = [], []
    for _ in range(num_words):
        sentence.append(rng.choice(words))
        if len(sentence) >= rng.randint(6, 18):
            out.append(" ".join(sentence).capitalize() + rng.choice(".!?"))
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def tiny_tokenizer(kind: str = "byte_level", *, vocab_size: int = 400, corpus: str | None = None,
                   chat_template: str | None = CHATML_TEMPLATE, bos: bool = False):
    """A small trained tokenizer as a ``transformers`` fast tokenizer.

    Args:
      kind: ``"byte_level"`` (GPT-2/Qwen style byte-level BPE) or ``"metaspace"``
        (SentencePiece/Llama style: ``▁`` for spaces, byte fallback for unknown characters).
      vocab_size: BPE vocabulary size (special tokens included).
      corpus: training text (default: 4,000 words of :func:`english_like_text`).
      chat_template: the Jinja chat template (ChatML by default; None for none).
      bos: whether the tokenizer adds ``<s>`` by default (``add_special_tokens=True``).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus if corpus is not None else english_like_text(4000, seed=123)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<pad>"]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = []
        specials = specials + [f"<0x{b:02X}>" for b in range(256)]
    else:
        raise ValueError(f"kind must be 'byte_level' or 'metaspace', got {kind!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    chunks = [corpus[i:i + 2000] for i in range(0, len(corpus), 2000)]
    tok.train_from_iterator(chunks, trainer)
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>",
                                 pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
