"""Convert a GGUF checkpoint (llama.cpp's format) into a Hugging Face model directory.

Only numpy, the ``gguf`` package (reading and dequantising), ``safetensors.numpy``, ``tokenizers``
and transformers' torch-free GGUF tokenizer builders are used; torch is not needed.

Two details of the format matter for the weights:

* GGUF lists a tensor's dimensions fastest-moving first (ggml's ``ne``), the reverse of numpy. The
  ``gguf`` reader already exposes the data in numpy order, so a linear layer comes out as HF's
  ``(out_features, in_features)``; the converter checks this for every tensor.
* llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` within each head, from HF's
  "rotate_half" rotary layout (first half / second half of a head) to GGML's interleaved pairs.
  :func:`unpermute_rotary_rows` undoes it exactly.

Only the Llama architecture (Llama 1/2, SmolLM, Mistral-style GGUFs with ``general.architecture =
llama``) is supported; anything else raises :class:`GGUFConversionError` saying what is unsupported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distill_jax import fsutil

__all__ = ["GGUFConversionError", "gguf_to_hf", "read_metadata", "unpermute_rotary_rows"]

SUPPORTED_ARCHITECTURES = ("llama",)
_DTYPES = {"float32": np.float32, "float16": np.float16}

# GGUF tensor names -> HF names; "{i}" is the layer index.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# "<arch>." metadata keys this converter reads or knows to be harmless; any other is an error.
_KNOWN_ARCH_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",  # accepted only when "none"
    "vocab_size",
}

# llama.cpp pre-tokenizer types that transformers' GGUF tokenizer builder does not know. "smollm"
# (and the StarCoder family) split every digit on its own, then apply GPT-2's byte-level regex,
# exactly like the original Hugging Face tokenizer.json of those models.
_DIGITS_THEN_BYTE_LEVEL = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted; the message says what is unsupported or malformed."""


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
               overwrite: bool = False) -> Path:
    """Convert a Llama-architecture GGUF file into a Hugging Face directory and return ``out_dir``.

    Writes ``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` (dequantised weights in
    ``dtype``, ``"float32"`` or ``"float16"``, with HF tensor names; ``lm_head.weight`` only when the
    file has an untied ``output.weight``), ``tokenizer.json``, ``tokenizer_config.json`` (with the
    chat template when the file has one) and ``special_tokens_map.json``. The result loads with
    ``transformers.LlamaForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` offline.

    Everything is written to a temporary directory beside ``out_dir`` that is then renamed into
    place, so ``out_dir`` appears complete or not at all. ``out_dir`` must be missing or empty, or,
    with ``overwrite=True``, hold a previous export and nothing else (see :mod:`distill_jax.fsutil`).
    """
    import gguf

    if dtype not in _DTYPES:
        raise GGUFConversionError(
            f"dtype={dtype!r} is not supported; use one of {sorted(_DTYPES)} (safetensors.numpy has no bfloat16; "
            "convert to float32 and cast when loading)."
        )
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFConversionError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF "
                                      "magic); give a .gguf model file")
    fsutil.check_output_dir(out_dir, overwrite=overwrite)  # before converting
    reader = gguf.GGUFReader(gguf_path)
    meta = read_metadata(reader)
    config = llama_config(meta, tensor_names={t.name for t in reader.tensors}, dtype=dtype)
    tensors = convert_tensors(reader, config, dtype=_DTYPES[dtype])
    tokenizer, tokenizer_config = build_tokenizer(meta, max_length=config["max_position_embeddings"])

    def write(directory: Path) -> None:
        from safetensors.numpy import save_file

        _write_json(directory / "config.json", config)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(directory / "tokenizer.json"))
        _write_json(directory / "tokenizer_config.json", tokenizer_config)
        special = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and isinstance(v, str)}
        _write_json(directory / "special_tokens_map.json", special)

    return fsutil.write_output_dir(out_dir, write, overwrite=overwrite, info={
        "writer": "convert-gguf", "source": gguf_path.name, "model_type": "llama", "dtype": dtype})


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value metadata of a ``gguf.GGUFReader`` as plain Python values (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_config(meta: dict[str, Any], *, tensor_names: set[str], dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict of a ``LlamaForCausalLM`` described by GGUF metadata ``meta``."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"GGUF architecture {arch!r} is not supported; this converter handles {list(SUPPORTED_ARCHITECTURES)}. "
            "Convert the original checkpoint with its own tools, or add the architecture here."
        )
    _check_arch_keys(meta, arch)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFConversionError(f"GGUF metadata lacks '{arch}.{key}', which a Llama config needs.")
        if isinstance(value, list):
            raise GGUFConversionError(f"'{arch}.{key}' varies per layer ({value[:4]}...); that is not supported.")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim, rotary_dim = int(get("attention.value_length", head_dim)), int(get("rope.dimension_count", head_dim))
    if value_dim != head_dim or rotary_dim != head_dim:
        raise GGUFConversionError(
            "Key, value and rotary dimensions differ in this GGUF (partial rotary or asymmetric heads); "
            "the Llama architecture needs them equal."
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    tied = "output.weight" not in tensor_names
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_value(get("attention.layer_norm_rms_epsilon")),
        # rope_theta rather than rope_parameters: every transformers version reads it (v5 converts it)
        "rope_theta": _float32_value(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def convert_tensors(reader: Any, config: dict[str, Any], *, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Dequantise every tensor of ``reader`` into a dict of HF-named, HF-shaped arrays of ``dtype``."""
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, config["num_hidden_layers"])
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        expected = tuple(int(d) for d in reversed(tensor.shape))  # ggml ne order -> numpy order
        if weight.shape != expected:
            raise GGUFConversionError(f"{tensor.name}: dequantised to shape {weight.shape}, expected {expected}.")
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_rotary_rows(weight, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_rotary_rows(weight, kv_heads)
        out[name] = np.ascontiguousarray(weight.astype(dtype, copy=False))
    _check_complete(out, config)
    return out


def hf_tensor_name(gguf_name: str, num_layers: int) -> str:
    """The HF name of GGUF tensor ``gguf_name`` (e.g. ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        if int(parts[1]) >= num_layers:
            raise GGUFConversionError(f"Tensor {gguf_name} is beyond the {num_layers} layers the metadata declares.")
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    hint = " (Llama 3 rope scaling)" if gguf_name.startswith("rope_freqs") else ""
    raise GGUFConversionError(
        f"GGUF tensor {gguf_name!r}{hint} has no counterpart in a plain Llama model; this file uses features "
        "(biases, rope scaling, experts, ...) the converter does not support."
    )


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection ``(num_heads * head_dim, in)``.

    llama.cpp applies ``w.reshape(n, 2, d // 2, ...).swapaxes(1, 2)`` per head (rotate_half halves ->
    interleaved pairs); this applies the inverse, ``reshape(n, d // 2, 2, ...).swapaxes(1, 2)``.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise GGUFConversionError(f"Cannot split {rows} rows into {num_heads} heads of even size.")
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def build_tokenizer(meta: dict[str, Any], *, max_length: int) -> tuple[Any, dict[str, Any]]:
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` for the tokenizer in GGUF metadata ``meta``.

    The vocabulary, merges and control tokens are turned into a tokenizer by transformers' own GGUF
    builders; the pre-tokenizer is fixed for llama.cpp types transformers does not know, and the
    post-processor adds BOS/EOS exactly as the file's ``add_bos_token``/``add_eos_token`` say.
    """
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFConversionError("The GGUF file has no tokenizer (no 'tokenizer.ggml.tokens'); pass one separately.")
    spec = _tokenizer_spec(meta)
    tokens = spec["tokens"]
    try:
        tokenizer, _ = convert_gguf_tokenizer(meta["general.architecture"], spec)
    except ValueError as err:
        raise GGUFConversionError(f"Cannot build the tokenizer: {err}") from err
    if spec.get("pre_tokenizer_type") in _DIGITS_THEN_BYTE_LEVEL:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    default_bos = spec.get("tokenizer_type") == "llama"  # llama.cpp adds BOS to sentencepiece vocabularies
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    names = {
        key: (tokens[meta[f"tokenizer.ggml.{field}"]] if f"tokenizer.ggml.{field}" in meta else None)
        for key, field in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    tokenizer.post_processor = _post_processor(
        names["bos_token"] if add_bos else None, names["eos_token"] if add_eos else None, tokens
    )
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in names.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _tokenizer_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """GGUF tokenizer metadata under the key names transformers' GGUF tokenizer builders expect."""
    keys = {
        "model": "tokenizer_type",
        "pre": "pre_tokenizer_type",
        "tokens": "tokens",
        "scores": "scores",
        "token_type": "token_type",
        "merges": "merges",
        "precompiled_charsmap": "precompiled_charsmap",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "unknown_token_id": "unk_token_id",
        "padding_token_id": "pad_token_id",
        "add_space_prefix": "add_prefix_space",
    }
    return {name: meta[f"tokenizer.ggml.{key}"] for key, name in keys.items() if f"tokenizer.ggml.{key}" in meta}


def _post_processor(bos: str | None, eos: str | None, tokens: list[str]) -> Any:
    """A post-processor that wraps each sequence in ``bos``/``eos`` (either may be None)."""
    from tokenizers import processors

    pre = [bos] if bos else []
    post = [eos] if eos else []
    single = " ".join([*pre, "$A:0", *post])
    pair = " ".join([*pre, "$A:0", *post, *pre, "$B:1", *post])
    ids = {t: tokens.index(t) for t in {*pre, *post}}
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))


def _check_arch_keys(meta: dict[str, Any], arch: str) -> None:
    """Reject metadata that would change the model in ways a plain Llama config cannot express."""
    unknown = sorted(k for k in meta if k.startswith(f"{arch}.") and k[len(arch) + 1 :] not in _KNOWN_ARCH_KEYS)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        unknown.append(f"{arch}.rope.scaling.type={scaling!r}")
    if unknown:
        raise GGUFConversionError(
            f"GGUF metadata {unknown} is not supported by this Llama converter (it would change the model); "
            "convert the original checkpoint instead."
        )


def _check_complete(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Every tensor a Llama model needs is present, with the vocabulary size the config states."""
    needed = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        needed.update(f"model.layers.{i}.{name}" for name in _LAYER_TENSORS.values())
    missing = sorted(needed - tensors.keys())
    if missing:
        raise GGUFConversionError(f"The GGUF file lacks {len(missing)} tensors a Llama model needs, e.g. {missing[:3]}.")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if rows != config["vocab_size"]:
        raise GGUFConversionError(f"token_embd has {rows} rows but the metadata says vocab_size={config['vocab_size']}.")


def _float32_value(value: float) -> float:
    """The shortest decimal that round-trips a GGUF float32 (so 9.99999974e-06 is written as 1e-05)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
