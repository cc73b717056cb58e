"""Teacher and student construction from their config sections, placed on a mesh."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from distill_jax import models as M, sharding
from distill_jax.models import presets


def make_mesh(mesh_cfg: Any) -> tuple[Mesh, dict[str, Any]]:
    """The (data, fsdp, tensor) mesh and the logical-axis rules a ``MeshConfig`` describes."""
    devices = jax.devices()
    if mesh_cfg.num_devices is not None:
        if jax.process_count() > 1:
            raise ValueError("mesh.num_devices is for single-process runs; leave it unset")
        devices = devices[:mesh_cfg.num_devices]
    mesh = sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices)
    return mesh, {**sharding.DEFAULT_RULES, **mesh_cfg.rules}


def model_config(src: Any) -> M.ModelConfig:
    """The ModelConfig a source describes (checkpoint config.json, preset, overrides), with the
    source's dtype, param_dtype and remat. A checkpoint that disagrees with its preset raises."""
    numerics = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat)
    if src.hf_path:
        cfg_file = Path(src.hf_path) / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found (hf_path must be a Hugging Face "
                                    "checkpoint directory)")
        cfg = M.from_hf_config(json.loads(cfg_file.read_text()), **numerics, **src.overrides)
        if src.preset:
            presets.check_matches(cfg, presets.preset(src.preset, **src.overrides),
                                  f"checkpoint {src.hf_path}")
        return cfg
    if not src.preset:
        raise ValueError("a model needs hf_path (a checkpoint) or preset (an architecture)")
    return presets.preset(src.preset, **{**numerics, **src.overrides})


def load_model(src: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> M.Model:
    """Load ``src.hf_path`` sharded on ``mesh``, or random-init from its preset."""
    cfg = model_config(src)
    if src.hf_path:
        return M.load_hf(src.hf_path, mesh=mesh, rules=rules, param_dtype=src.param_dtype,
                         dtype=src.dtype, remat=src.remat, **src.overrides)
    return M.init(cfg, src.seed, mesh=mesh, rules=rules)


def keep_layers(teacher: M.Model, layers: tuple[int, ...], mesh: Mesh,
                rules: Mapping[str, Any] | None = None, **config_changes: Any) -> M.Model:
    """A copy of ``teacher`` keeping only ``layers`` (indices into its stack, in order)."""
    cfg = teacher.config
    if not layers:
        raise ValueError("student.layers must list the teacher layers to keep, e.g. [0, 2, 4]")
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"student.layers {bad} out of range for a {cfg.num_layers}-layer teacher")
    new_cfg = cfg.replace(num_layers=len(layers),
                          layer_types=tuple(cfg.layer_types[i] for i in layers), **config_changes)
    idx = jnp.asarray(layers)
    params = dict(teacher.params)
    params["layers"] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), teacher.params["layers"])
    shardings = M.param_shardings(new_cfg, mesh, rules)
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(new_cfg.param_dtype), p),
                     out_shardings=shardings)(params)
    return M.Model(new_cfg, params)


def build_student(src: Any, teacher: M.Model | None, mesh: Mesh,
                  rules: Mapping[str, Any] | None = None) -> M.Model:
    """The student as its ``init`` says: ``hf``, ``scratch`` or ``teacher_layers``."""
    if src.init == "hf":
        if not src.hf_path:
            raise ValueError("student.init=hf needs student.hf_path")
        return load_model(src, mesh, rules)
    if src.init == "scratch":
        if src.hf_path:
            raise ValueError("student.init=scratch takes preset/overrides, not hf_path "
                             "(use init: hf to load a checkpoint)")
        return load_model(src, mesh, rules)
    if teacher is None:
        raise ValueError("student.init=teacher_layers needs a teacher section")
    return keep_layers(teacher, src.layers, mesh, rules, dtype=src.dtype,
                       param_dtype=src.param_dtype, remat=src.remat, **src.overrides)
