"""LoRA students: adapters in the model, training only them, checkpoints, and the two exports
(merged Hugging Face directory, PEFT adapter directory) checked against transformers and peft
(PyTorch, fp32)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distill_jax import models as M
from distill_jax.models import lora
from distill_jax.models.config import ConfigError, LoraSpec

REPO = Path(__file__).resolve().parents[1]


def _adapted(family="llama", spec=LoraSpec(rank=4, alpha=8.0), seed=0, **overrides):
    """A tiny random base and the same with random (non-zero) adapters."""
    cfg = M.ModelConfig.tiny(family, **overrides)
    base = M.Model(cfg, jax.tree.map(jnp.asarray, M.numpy_params(cfg, np.random.default_rng(seed),
                                                                   0.05)))
    model = lora.add_adapters(base, spec, seed)
    rng = np.random.default_rng(seed + 1)
    params = jax.tree_util.tree_map_with_path(  # B is zero at init: give it values
        lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
        if p[-1].key.endswith("_lora_b") else x, model.params)
    return base, model.replace(params=params)


def _tokens(vocab, shape=(2, 12), seed=3):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _torch_logits(hm, tokens):
    with torch.no_grad():
        return hm(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ----------------------------------------------------------------------------- the model
def test_fresh_adapters_leave_the_model_unchanged_and_split_join_round_trip():
    cfg = M.ModelConfig.tiny()
    base = M.init(cfg, 0)
    model = lora.add_adapters(base, LoraSpec(rank=2, alpha=4.0, targets=("q", "down")), 1)
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(M.forward(base, tokens)),
                                  np.asarray(M.forward(model, tokens)))
    b, a = lora.split(model.params)
    assert jax.tree.structure(b) == jax.tree.structure(base.params)
    assert sorted(a["layers"]["attn"]) == ["q_lora_a", "q_lora_b"]
    assert sorted(a["layers"]["mlp"]) == ["down_lora_a", "down_lora_b"]
    assert a["layers"]["attn"]["q_lora_a"].shape == (2, 64, 2)
    assert a["layers"]["mlp"]["down_lora_b"].shape == (2, 2, 64)
    assert jax.tree.structure(lora.join(b, a)) == jax.tree.structure(model.params)
    assert M.logical_axes(model.config)["layers"]["attn"]["q_lora_b"] == (
        "layers", "lora", "heads", "head_dim")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_export_matches_the_adapted_model_in_transformers(tmp_path, family):
    base, model = _adapted(family)
    tokens = _tokens(model.config.vocab_size)
    ours = np.asarray(M.forward(model, tokens))
    plain = np.asarray(M.forward(base, tokens))
    assert np.abs(ours - plain).max() > 1e-2  # the adapters matter
    merged = lora.merge(model)
    assert merged.config.lora is None
    M.save_hf(merged, tmp_path / "merged")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                           dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(hm, tokens), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_adapter_directory_loads_in_peft_and_matches(tmp_path, family):
    peft = pytest.importorskip("peft")
    base, model = _adapted(family, LoraSpec(rank=3, alpha=5.0, targets=("q", "v", "o", "up",
                                                                          "down")))
    tokens = _tokens(model.config.vocab_size)
    M.save_hf(base, tmp_path / "base")
    out = lora.save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 5.0
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                           dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hm, out).eval()
    loaded = {k for k, _ in pm.named_parameters() if "lora_" in k}
    assert len(loaded) == 2 * 5 * model.config.num_layers
    np.testing.assert_allclose(_torch_logits(pm, tokens), np.asarray(M.forward(model, tokens)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec, message", [
    (dict(rank=0), "lora.rank=0: the adapter rank must be a positive integer"),
    (dict(alpha=0.0), "lora.alpha=0.0: the scale alpha/rank must be positive"),
    (dict(alpha=-2.0), "set lora.alpha > 0"),
    (dict(targets=("q_proj",)), "no projection 'q_proj' (did you mean 'q'?)"),
    (dict(targets=("qkv",)), "choose among ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"),
    (dict(dropout=1.0), "lora.dropout=1.0: must lie in [0, 1)"),
])
def test_bad_lora_spec_is_one_line_naming_the_fix(spec, message):
    with pytest.raises(ConfigError) as e:
        LoraSpec(**spec)
    assert message in str(e.value) and "\n" not in str(e.value)
