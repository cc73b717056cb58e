"""Optimiser: AdamW with warmup then cosine/linear decay, clipping and a weight-decay mask."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. ``lr`` is the peak learning rate reached after ``warmup_steps``; it then
    decays to ``lr * min_lr_ratio`` at the last step (``schedule``: cosine, linear or constant).
    ``grad_accum`` splits each batch into that many micro-batches inside the step."""

    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"optimizer.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then the configured decay until ``total_steps``."""
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: matrices and embeddings, not norms or biases."""
    def keep(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW with the schedule and the decay mask."""
    parts = []
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
