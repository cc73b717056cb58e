"""Export a trained student from a run directory as a Hugging Face directory.

``export_run(run_dir, out_dir, step=None)`` reads the run's resolved ``config.yaml``, rebuilds
the student's architecture (``assemble.student_config``: no teacher weights are read), takes
the params of the chosen (default: latest) checkpoint and writes config.json + safetensors + tokenizer files
atomically with :func:`distill_jax.models.save_hf`. ``out_dir`` must be missing or empty, or,
with ``overwrite=True``, hold a previous export and nothing else; the run itself, the current
directory and their parents are never replaced (see :mod:`distill_jax.fsutil`).

A LoRA run's checkpoints hold its adapters only: the student's base is rebuilt as the run's
``student.init`` made it, checked against the fingerprint its checkpoint records, and either
merged with the adapters into a plain Hugging Face directory (``lora="merged"``) or left
aside while the adapters are written as a PEFT adapter directory (``lora="adapter"``).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from distill_jax import checkpoint, fsutil, models as M
from distill_jax.config import MeshConfig, RunConfig, load_run_config
from distill_jax.models import lora
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train import build
from distill_jax.train.assemble import init_student, student_config
from distill_jax.train.step import MODEL

CONFIG_FILE = "config.yaml"


def load_student(run_dir: str | Path, step: int | None = None) -> tuple[M.Model, RunConfig]:
    """The student of a run at ``step`` (default: the latest checkpoint), on one device (a LoRA
    student: its base, rebuilt and checked against the checkpoint, with the trained
    adapters)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: not a distill-jax run directory")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    mcfg = student_config(cfg)
    state = checkpoint.load_state_dict(run_dir / "checkpoints", step)
    trained = state["params"][MODEL]  # the model only (not the loss terms' params)
    if mcfg.lora is not None:
        return _lora_student(cfg, mcfg, run_dir, step, trained), cfg
    expected = M.param_shapes(mcfg)
    got = jax.tree.map(lambda x: x.shape, trained)
    if jax.tree.map(lambda s: s.shape, expected) != got:
        raise ValueError(f"checkpoint params in {run_dir} do not match the student architecture "
                         "in its config.yaml")
    params = jax.tree.map(lambda x: jnp.asarray(x, mcfg.param_dtype), trained)
    return M.Model(mcfg, params), cfg


def _lora_student(cfg: RunConfig, mcfg: M.ModelConfig, run_dir: Path, step: int | None,
                  adapters) -> M.Model:
    """A LoRA run's base (rebuilt as ``student.init`` makes it, on one device) joined with the
    checkpoint's ``adapters``; refuses a base other than the one they were trained on."""
    expected = lora.split(M.param_shapes(mcfg))[1]
    if jax.tree.map(lambda s: s.shape, expected) != jax.tree.map(lambda x: x.shape, adapters):
        raise ValueError(f"checkpoint adapters in {run_dir} do not match the student.lora and "
                         "architecture in its config.yaml")
    mesh, rules = build.make_mesh(MeshConfig(data=1, num_devices=1))
    base = lora.split(init_student(cfg, mesh, rules).params)[0]
    steps_dir = run_dir / "checkpoints"
    checkpoint.check_base(steps_dir, checkpoint.latest_step(steps_dir) if step is None else step,
                          checkpoint.params_fingerprint(base))
    device = jax.tree.leaves(base)[0].sharding
    adapters = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x, jnp.float32), device),
                            adapters)
    return M.Model(mcfg, lora.join(base, adapters))


LORA_EXPORTS = ("merged", "adapter")


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
               dtype: str = "float32", overwrite: bool = False, lora_as: str = "merged") -> Path:
    """Write the run's student as a Hugging Face directory that transformers loads.

    ``overwrite=True`` replaces ``out_dir`` only if it holds a previous export and nothing else.
    A LoRA student: ``lora_as="merged"`` folds the adapters into the weights (a plain
    directory), ``"adapter"`` writes a PEFT adapter directory for its base model.
    """
    if lora_as not in LORA_EXPORTS:
        raise ValueError(f"unknown LoRA export {lora_as!r}; choose merged or adapter")
    fsutil.check_output_dir(out_dir, overwrite=overwrite, protect=[run_dir])  # before loading
    model, cfg = load_student(run_dir, step)
    if lora_as == "adapter":
        if model.config.lora is None:
            raise ValueError(f"{run_dir} trained a whole student, not LoRA adapters: export it "
                             "without --lora adapter")
        base = cfg.student.hf_path if cfg.student.init == "hf" else None
        return lora.save_peft(model, out_dir, dtype=dtype, overwrite=overwrite,
                              protect=(run_dir,), base_model_name_or_path=(
                                  str(Path(base).absolute()) if base else None))
    model = lora.merge(model)
    tok = cfg.tokenizer_path()
    tokenizer = tok if Path(tok).is_dir() else load_tokenizer(tok)
    return M.save_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
