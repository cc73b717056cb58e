"""Functional decoder-only transformers (Llama, Qwen2/3, Gemma2/3 text) and HF checkpoint I/O."""

from distill_jax.models.config import ConfigError, ModelConfig, RopeScaling, from_hf_config, to_hf_config
from distill_jax.models.generate import generate, init_cache
from distill_jax.models.hf import CheckpointError, load_hf, save_hf
from distill_jax.models.model import (
    Model, cast_params, forward, hidden_states, init, lm_head, logical_axes, logits_from_hidden,
    numpy_params, param_shapes, param_shardings,
)

__all__ = [
    "CheckpointError", "load_hf", "save_hf",
    "ConfigError", "Model", "ModelConfig", "RopeScaling", "cast_params", "forward",
    "from_hf_config", "hidden_states", "init", "lm_head", "logical_axes", "logits_from_hidden",
    "numpy_params", "param_shapes", "param_shardings", "to_hf_config",
    "generate", "init_cache",
]
