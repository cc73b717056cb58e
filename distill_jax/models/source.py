"""Models a config section describes: the device mesh, the architecture and the weights
(a Hugging Face checkpoint, or a random init from a preset)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from distill_jax import sharding
from distill_jax.models import presets, quant
from distill_jax.models.config import ModelConfig, from_hf_config
from distill_jax.models.hf import load_hf
from distill_jax.models.model import Model, init

__all__ = ["load_model", "make_mesh", "model_config"]


def make_mesh(mesh_cfg: Any) -> tuple[Mesh, dict[str, Any]]:
    """The (data, fsdp, tensor) mesh and the logical-axis rules a ``MeshConfig`` describes."""
    devices = jax.devices()
    if mesh_cfg.num_devices is not None:
        if jax.process_count() > 1:
            raise ValueError("mesh.num_devices is for single-process runs; leave it unset")
        devices = devices[:mesh_cfg.num_devices]
    mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)
    return mesh, {**sharding.DEFAULT_RULES, **mesh_cfg.rules}


def model_config(src: Any) -> ModelConfig:
    """The ModelConfig a source describes (checkpoint config.json, preset, overrides), with the
    source's dtype, param_dtype and remat. A checkpoint that disagrees with its preset raises."""
    numerics = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat)
    if src.hf_path:
        cfg_file = Path(src.hf_path) / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found (hf_path must be a Hugging Face "
                                    "checkpoint directory)")
        cfg = from_hf_config(json.loads(cfg_file.read_text()), **numerics, **src.overrides)
        if src.preset:
            presets.check_matches(cfg, presets.preset(src.preset, **src.overrides),
                                  f"checkpoint {src.hf_path}")
        return cfg
    if not src.preset:
        raise ValueError("a model needs hf_path (a checkpoint) or preset (an architecture)")
    return presets.preset(src.preset, **{**numerics, **src.overrides})


def load_model(src: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None, *,
               quantize: bool = True) -> Model:
    """Load ``src.hf_path`` sharded on ``mesh``, or random-init from its preset; then, when the
    section has ``quantize: int8`` (a teacher) and ``quantize`` is true, int8 per-channel
    (:func:`distill_jax.models.quant.quantize`)."""
    cfg = model_config(src)
    if src.hf_path:
        model = load_hf(src.hf_path, mesh=mesh, rules=rules, param_dtype=src.param_dtype,
                        dtype=src.dtype, remat=src.remat, **src.overrides)
    else:
        model = init(cfg, src.seed, mesh=mesh, rules=rules)
    mode = getattr(src, "quantize", "none")
    if quantize and mode != "none":
        model = quant.quantize(model, mode, mesh=mesh, rules=rules)
    return model
