"""Export a trained student from a run directory as a Hugging Face directory.

``export_run(run_dir, out_dir, step=None)`` reads the run's resolved ``config.yaml``, rebuilds
the student's architecture (``assemble.student_config``: no teacher weights are read), takes
the params of the chosen (default: latest) checkpoint and writes config.json + safetensors + tokenizer files
atomically with :func:`distill_jax.models.save_hf`. ``out_dir`` must be missing or empty, or,
with ``overwrite=True``, hold a previous export and nothing else; the run itself, the current
directory and their parents are never replaced (see :mod:`distill_jax.fsutil`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from distill_jax import checkpoint, fsutil, models as M
from distill_jax.config import RunConfig, load_run_config
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train.assemble import student_config
from distill_jax.train.step import MODEL

CONFIG_FILE = "config.yaml"


def load_student(run_dir: str | Path, step: int | None = None) -> tuple[M.Model, RunConfig]:
    """The student of a run at ``step`` (default: the latest checkpoint), on one device."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: not a distill-jax run directory")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    mcfg = student_config(cfg)
    state = checkpoint.load_state_dict(run_dir / "checkpoints", step)
    trained = state["params"][MODEL]  # the model only (not the loss terms' params)
    expected = M.param_shapes(mcfg)
    got = jax.tree.map(lambda x: x.shape, trained)
    if jax.tree.map(lambda s: s.shape, expected) != got:
        raise ValueError(f"checkpoint params in {run_dir} do not match the student architecture "
                         "in its config.yaml")
    params = jax.tree.map(lambda x: jnp.asarray(x, mcfg.param_dtype), trained)
    return M.Model(mcfg, params), cfg


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
               dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the run's student as a Hugging Face directory that transformers loads.

    ``overwrite=True`` replaces ``out_dir`` only if it holds a previous export and nothing else.
    """
    fsutil.check_output_dir(out_dir, overwrite=overwrite, protect=[run_dir])  # before loading
    model, cfg = load_student(run_dir, step)
    tok = cfg.tokenizer_path()
    tokenizer = tok if Path(tok).is_dir() else load_tokenizer(tok)
    return M.save_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
