"""Optimiser: AdamW with warmup then cosine/linear decay, clipping and a weight-decay mask;
the guard against non-finite steps."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from distill_jax.config import OptimizerConfig
from distill_jax.losses import LOSS
from distill_jax.train.step import GRAD_NORM, PARAM_NORM

NONFINITE = "train/nonfinite"  # 1 for a step whose loss, gradient or new params are not finite
_WATCHED = (LOSS, GRAD_NORM, PARAM_NORM)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then the configured decay until ``cfg.schedule_steps``
    (default ``total_steps``)."""
    total_steps = cfg.schedule_steps or total_steps
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


class NonFiniteError(ValueError):
    """A training step produced a NaN or infinite loss, gradient or parameter."""


def guard_nonfinite(step: Callable, skip: bool) -> Callable:
    """Wrap a train step ``(state, teacher_params, batch) -> (state, metrics)``: its metrics
    gain ``NONFINITE``, and with ``skip`` a non-finite step keeps the old params and optimiser
    state (the step counter and RNG still advance, as the data does)."""
    def guarded(state, teacher_params, batch):
        new, metrics = step(state, teacher_params, batch)
        ok = jnp.all(jnp.stack([jnp.isfinite(metrics[k]) for k in _WATCHED if k in metrics]))
        metrics = {**metrics, NONFINITE: 1.0 - ok.astype(jnp.float32)}
        if skip:
            keep = lambda a, b: jnp.where(ok, a, b)
            new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                              opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
        return new, metrics
    return guarded


def nonfinite_message(step: int, metrics: Mapping[str, float]) -> str:
    """One line naming the step and its non-finite numbers."""
    values = ", ".join(f"{k} = {metrics[k]}" for k in _WATCHED if k in metrics)
    return f"step {step} is not finite ({values})"
