"""Named architectures of released checkpoints (shapes only; weights come from HF directories).

``preset("qwen2.5-7b")`` returns the :class:`ModelConfig` of that checkpoint. Run configs name a
preset next to a checkpoint path so the architecture can be checked with ``jax.eval_shape``
before anything is loaded, and the loaded ``config.json`` is verified against it.
"""

from __future__ import annotations

import difflib
from typing import Any

from distill_jax.models.config import ConfigError, ModelConfig, RopeScaling

_LLAMA3_ROPE = dict(rope_theta=500000.0)


def _llama3_scaling(factor: float) -> RopeScaling:
    return RopeScaling("llama3", factor, 1.0, 4.0, 8192)


_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_scaling=_llama3_scaling(8.0), max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001, **_LLAMA3_ROPE),
    "llama-3.2-1b": dict(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_scaling=_llama3_scaling(32.0), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, **_LLAMA3_ROPE),
    "llama-3.2-3b": dict(
        family="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_scaling=_llama3_scaling(32.0), max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, **_LLAMA3_ROPE),
    "qwen2.5-7b": dict(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
        rope_theta=1e6, max_position_embeddings=131072, bos_token_id=151643,
        eos_token_id=151643),
    "qwen2.5-1.5b": dict(
        family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True,
        rope_theta=1e6, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True,
        rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643),
    "qwen3-8b": dict(
        family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960, bos_token_id=151643,
        eos_token_id=151645),
    "qwen3-0.6b": dict(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True,
        rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645),
    "gemma2-9b": dict(
        family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, max_position_embeddings=8192, bos_token_id=2, eos_token_id=1,
        pad_token_id=0),
    "gemma2-2b": dict(
        family="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, max_position_embeddings=8192, bos_token_id=2, eos_token_id=1,
        pad_token_id=0),
    "gemma3-1b": dict(
        family="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32768, bos_token_id=2, eos_token_id=1,
        pad_token_id=0),
    "smollm2-135m": dict(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "smollm2-360m": dict(
        family="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560,
        num_layers=32, num_heads=15, num_kv_heads=5, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


def names() -> list[str]:
    """All preset names."""
    return sorted(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a named architecture, with field overrides
    (e.g. ``dtype="bfloat16"``, ``remat="full"``). ``tiny-<family>`` gives a small test model."""
    if name.startswith("tiny-"):
        return ModelConfig.tiny(name[len("tiny-"):], **overrides)  # type: ignore[arg-type]
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names())}"
        raise ConfigError(f"unknown model preset {name!r}{hint}")
    base = dict(_PRESETS[name])
    family = base["family"]
    if family.startswith("gemma"):
        from distill_jax.models.config import family_defaults
        defaults = family_defaults(family, num_layers=base["num_layers"],
                                    sliding_window=base["sliding_window"])
        base = {**defaults, **base}
    base.update(overrides)
    return ModelConfig(**base)


ARCHITECTURE_FIELDS = (
    "family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
    "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "local_rope_theta",
    "tie_word_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm", "gemma_norm",
    "sandwich_norm", "embed_scale", "activation", "query_pre_attn_scalar",
    "attn_logit_softcap", "final_logit_softcap", "sliding_window", "layer_types",
)


def check_matches(cfg: ModelConfig, expected: ModelConfig, what: str) -> None:
    """Raise if ``cfg`` differs from ``expected`` in any field that changes the architecture."""
    diffs = [f"{f}: {getattr(cfg, f)!r} != {getattr(expected, f)!r}" for f in ARCHITECTURE_FIELDS
             if getattr(cfg, f) != getattr(expected, f)]
    if diffs:
        raise ConfigError(f"{what} does not match its preset: " + "; ".join(diffs))
