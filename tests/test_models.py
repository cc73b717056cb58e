"""Parity of every model family with transformers (PyTorch, fp32), both directions, and
invariances that parity alone cannot show (packing, strict config handling)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distill_jax import models as M
from distill_jax.models import hf as hfio

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
_HF_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
}
_BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256)

# (id, family, extra HF config): GQA and head_dim != hidden/heads throughout.
CASES = [
    ("llama", "llama", {}),
    ("llama-mha-tied", "llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    ("llama-bias", "llama", dict(attention_bias=True, mlp_bias=True)),
    ("llama3-rope", "llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    ("llama-linear-rope", "llama", dict(rope_parameters=dict(rope_type="linear", factor=4.0,
                                                             rope_theta=10000.0))),
    ("qwen2", "qwen2", {}),
    ("qwen2-tied", "qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", "qwen3", {}),
    ("gemma2", "gemma2", dict(sliding_window=5, query_pre_attn_scalar=12)),
    ("gemma2-mqa", "gemma2", dict(sliding_window=4, num_key_value_heads=1,
                                  attn_logit_softcapping=20.0, final_logit_softcapping=5.0)),
    ("gemma3", "gemma3_text", dict(sliding_window=5, query_pre_attn_scalar=12,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"])),
    ("gemma3-scaled", "gemma3_text", dict(
        sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
]


def _hf_model(family: str, extra: dict, seed: int = 0):
    hc = _HF_CONFIGS[family](**{**_BASE, **extra})
    torch.manual_seed(seed)
    hm = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hm.parameters():
            p.normal_(0.0, 0.1)
    return hm


def _hf_logits(hm, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hm(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every case saved once as an HF directory by transformers."""
    out = {}
    for name, family, extra in CASES:
        hm = _hf_model(family, extra)
        path = tmp_path_factory.mktemp(name)
        hm.save_pretrained(path)
        out[name] = (hm, path)
    return out


_forward = jax.jit(M.forward)
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 19))  # longer than every sliding window


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_load_matches_transformers(checkpoints, name):
    hm, path = checkpoints[name]
    model = M.load_hf(path)
    ours = np.asarray(_forward(model, jnp.asarray(TOKENS)))
    ref = _hf_logits(hm, TOKENS)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_export_loads_in_transformers(checkpoints, tmp_path, name):
    _, path = checkpoints[name]
    model = M.load_hf(path)
    # Perturb so the export cannot pass by copying the input files.
    model = model.replace(params=jax.tree.map(lambda x: x * 1.01, model.params))
    out = M.save_hf(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = np.asarray(_forward(model, jnp.asarray(TOKENS)))
    assert np.abs(_hf_logits(back, TOKENS) - ours).max() <= TOL
    # And our own loader reads the export back bit for bit.
    again = M.load_hf(out)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", list(_HF_CONFIGS))
def test_random_init_exports(tmp_path, family):
    """A from-scratch model of every family exports to a directory transformers loads."""
    cfg = M.ModelConfig.tiny(family, vocab_size=97)
    model = M.init(cfg, seed=1)
    model = model.replace(params=jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), model.params))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        M.save_hf(model, tmp_path / "m"), dtype=torch.float32).eval()
    ours = np.asarray(_forward(model, jnp.asarray(TOKENS)))
    assert np.abs(_hf_logits(back, TOKENS) - ours).max() <= TOL


@pytest.mark.parametrize("family", list(_HF_CONFIGS))
def test_packed_row_equals_documents_alone(family):
    cfg = M.ModelConfig.tiny(family, vocab_size=97, num_layers=3)
    model = M.init(cfg, seed=3)
    rng = np.random.RandomState(1)
    docs = [rng.randint(1, 97, n) for n in (5, 9, 3)]
    row = np.zeros((1, 20), np.int32)
    seg = np.zeros((1, 20), np.int32)
    start = 0
    for i, doc in enumerate(docs):
        row[0, start:start + len(doc)] = doc
        seg[0, start:start + len(doc)] = i + 1
        start += len(doc)
    packed = np.asarray(_forward(model, jnp.asarray(row), segment_ids=jnp.asarray(seg)))
    start = 0
    for doc in docs:
        alone = np.asarray(_forward(model, jnp.asarray(doc[None])))
        got = packed[0, start:start + len(doc)]
        assert np.abs(got - alone[0]).max() <= 1e-5
        start += len(doc)


def test_positions_from_segments():
    from distill_jax.models.transformer import positions_from_segments

    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(np.asarray(positions_from_segments(seg)),
                                  [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_config_round_trip_all_families():
    for name, family, extra in CASES:
        hc = json.loads(_HF_CONFIGS[family](**{**_BASE, **extra}).to_json_string())
        cfg = M.from_hf_config(hc)
        assert M.from_hf_config(M.to_hf_config(cfg)) == cfg, name


def test_legacy_rope_fields_accepted():
    hc = json.loads(transformers.LlamaConfig(**_BASE).to_json_string())
    hc.pop("rope_parameters")
    hc["rope_theta"] = 500000.0
    hc["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=8192)
    cfg = M.from_hf_config(hc)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.kind == "llama3"


def test_unknown_config_field_raises():
    hc = json.loads(transformers.LlamaConfig(**_BASE).to_json_string())
    hc["attn_magic_factor"] = 3
    with pytest.raises(M.ConfigError, match="attn_magic_factor"):
        M.from_hf_config(hc)


def test_unsupported_rope_type_raises():
    hc = json.loads(transformers.LlamaConfig(**_BASE).to_json_string())
    hc["rope_parameters"] = dict(rope_type="yarn", factor=4.0, rope_theta=1e4)
    with pytest.raises(M.ConfigError, match="yarn"):
        M.from_hf_config(hc)


def test_unknown_family_raises():
    with pytest.raises(M.ConfigError, match="mixtral"):
        M.from_hf_config({"model_type": "mixtral"})


def test_missing_and_extra_tensors_raise(checkpoints, tmp_path):
    _, path = checkpoints["llama"]
    st = hfio.SafetensorsDir(path)
    tensors = {k: np.asarray(st.array(k)) for k in st.keys()}
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    missing = dict(tensors)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    hfio.write_safetensors(tmp_path / "model.safetensors", missing)
    with pytest.raises(M.CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        M.load_hf(tmp_path)
    extra = dict(tensors, **{"model.layers.0.mlp.gate_proj.scales": np.ones(3, np.float32)})
    hfio.write_safetensors(tmp_path / "model.safetensors", extra)
    with pytest.raises(M.CheckpointError, match="gate_proj.scales"):
        M.load_hf(tmp_path)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(M.CheckpointError, match="config.json"):
        M.load_hf(tmp_path / "nope")


def test_sharded_safetensors_and_bf16(checkpoints, tmp_path):
    _, path = checkpoints["qwen3"]
    model = M.load_hf(path)
    out = M.save_hf(model, tmp_path / "bf16", dtype="bfloat16", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) > 1
    back = M.load_hf(out)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)).astype(np.float32),
                                      np.asarray(b))
    hm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = np.asarray(_forward(back, jnp.asarray(TOKENS)))
    assert np.abs(_hf_logits(hm, TOKENS) - ours).max() <= TOL


def test_save_is_atomic_on_failure(checkpoints, tmp_path, monkeypatch):
    _, path = checkpoints["llama"]
    model = M.load_hf(path)
    out = M.save_hf(model, tmp_path / "m")
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hfio, "write_safetensors", boom)
    with pytest.raises(OSError):
        M.save_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary litter


def test_bf16_compute_close_to_fp32(checkpoints):
    _, path = checkpoints["llama"]
    f32 = M.load_hf(path)
    b16 = M.load_hf(path, dtype="bfloat16")
    a = np.asarray(_forward(f32, jnp.asarray(TOKENS)))
    b = np.asarray(_forward(b16, jnp.asarray(TOKENS)))
    assert b.dtype == np.float32  # logits stay fp32
    assert 0 < np.abs(a - b).max() < 0.05


def test_remat_policies_give_same_gradients():
    cfg = M.ModelConfig.tiny("gemma2", vocab_size=97)
    model = M.init(cfg, seed=0)
    toks = jnp.asarray(TOKENS)

    def loss(params, cfg):
        return M.forward(M.Model(cfg, params), toks).mean()

    ref = jax.grad(loss)(model.params, cfg)
    for policy in ("full", "dots", "dots_no_batch"):
        got = jax.grad(loss)(model.params, cfg.replace(remat=policy))
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-6)
