"""The run config: a tree of typed, frozen sections loaded from YAML.

``load_run_config(path, overrides)`` reads e.g. ``configs/tiny.yaml`` with ``key.sub=value``
overrides; an unknown key is rejected with the closest valid name. Each section is a small
dataclass owned by the module that uses it (the model never sees this config).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Sequence

from distill_jax import configlib
from distill_jax.checkpoint import CheckpointConfig
from distill_jax.data import DataConfig, SourceConfig
from distill_jax.metrics import LoggingConfig
from distill_jax.train.optim import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``hf_path``: a Hugging Face directory. ``preset``: a named
    architecture (``distill_jax.models.presets``; ``tiny-llama`` etc. for tests) — used alone
    for a from-scratch model, or beside ``hf_path`` to check the checkpoint's architecture.
    ``overrides``: ModelConfig fields changed on top (e.g. ``num_layers: 4``)."""

    hf_path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TeacherConfig(ModelSource):
    """The frozen teacher (no optimiser state, never checkpointed). ``cache``: a teacher cache
    directory; ``train`` then reads the teacher's top-k distributions from it instead of
    running the teacher, and ``cache`` (the command) writes it."""

    cache: str | None = None


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How ``distill-jax cache`` writes the teacher cache: ``k`` top log-probs per token,
    their encoding, the temperature they are taken at, and the teacher batch size (rows;
    default ``data.batch_size``)."""

    k: int = 64
    logprob_encoding: Literal["bf16", "q8", "f32"] = "bf16"
    temperature: float = 1.0
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class StudentConfig(ModelSource):
    """``init``: ``hf`` (load ``hf_path``), ``scratch`` (random, from ``preset``+``overrides``)
    or ``teacher_layers`` (copy the teacher, keeping the layers listed in ``layers``)."""

    init: Literal["hf", "scratch", "teacher_layers"] = "scratch"
    layers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weighted terms (``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_kl``,
    ``skew_reverse_kl``, ``cross_entropy``), their options, and the token chunk size of the
    fused lm_head + loss. ``tail`` says how a cached (top-k) teacher's remaining mass is
    treated: one extra ``bucket`` on both sides, or dropped (``renormalize``)."""

    terms: dict[str, float] = dataclasses.field(default_factory=lambda: {"forward_kl": 1.0})
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_size: int = 512
    tail: Literal["bucket", "renormalize"] = "bucket"  # teacher mass outside a cached top-k

    def spec(self):
        from distill_jax.losses import LossSpec
        return LossSpec(terms=self.terms, temperature=self.temperature,
                        jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (``-1``: the rest of the devices), logical-axis rule overrides, and
    optionally how many devices to use."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_devices: int | None = None  # use only the first N devices (single process; debugging)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out loss every ``every`` steps (0: never) over ``batches`` batches of ``sources``."""

    every: int = 0
    batches: int = 4
    sources: tuple[SourceConfig, ...] = ()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    run_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    tokenizer: str | None = None  # "bytes" or a directory; default: the student's/teacher's hf_path
    teacher: TeacherConfig | None = None
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig | None = None
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.data is None:
            raise ValueError("the config needs a data section (data.sources, data.seq_len, ...)")

    def tokenizer_path(self) -> str:
        for candidate in (self.tokenizer, self.student.hf_path,
                          self.teacher.hf_path if self.teacher else None):
            if candidate:
                return candidate
        raise ValueError("set `tokenizer` (a directory, or 'bytes') or give the student or "
                         "teacher an hf_path to take the tokenizer from")


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config with ``key.sub=value`` overrides into a :class:`RunConfig`."""
    return configlib.load(RunConfig, path, overrides)


def dump_run_config(cfg: RunConfig) -> str:
    return configlib.dump(cfg)
