"""The training loop: build everything from the run config, resume, step, log, checkpoint.

The loop does no math: the step is built in :mod:`distill_jax.train.step`, the models in
:mod:`distill_jax.train.build`, the data in :mod:`distill_jax.data`. Metrics of step ``i`` are
fetched to the host after step ``i + 1`` has been dispatched, so the device never waits.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from distill_jax import configlib, data, metrics as mlog, sharding
from distill_jax.checkpoint import Checkpointer
from distill_jax.config import RunConfig, dump_run_config
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train import build, optim
from distill_jax.train.step import (batch_keys, init_state, jit_train_step, make_eval_step,
                                    make_train_step, summarize)

CONFIG_FILE = "config.yaml"
# Sections that may change between a run and its resumption (everything else must match).
_RESUMABLE = {"steps", "checkpoint", "logging", "eval"}


def _check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / CONFIG_FILE
    new = configlib.to_dict(cfg)
    if path.exists():
        import yaml
        old = yaml.safe_load(path.read_text()) or {}
        changed = sorted(k for k in set(old) | set(new)
                         if k not in _RESUMABLE and old.get(k) != new.get(k))
        if changed:
            raise ValueError(
                f"{run_dir} holds a run with a different config (sections {changed} differ); "
                "resume with the same config, or choose another run_dir")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_run_config(cfg))
    tmp.replace(path)


def _global_batch(local: dict[str, np.ndarray], batch_sharding: Any,
                  keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
            for k in keys}


def open_cache(cfg: RunConfig, tokenizer, vocab_size: int):
    """The run's teacher cache reader, checked against this run's tokenizer, data and loss."""
    from distill_jax.cache import CacheReader
    from distill_jax.cache.build import dataset_fingerprint
    from distill_jax.tokenizer import tokenizer_fingerprint
    reader = CacheReader(cfg.teacher.cache)
    reader.check(expected_tokenizer_hash=tokenizer_fingerprint(tokenizer),
                 expected_dataset_fingerprint=dataset_fingerprint(cfg.data),
                 vocab_size=vocab_size, temperature=cfg.loss.temperature)
    return reader


def with_cache(iterator, reader):
    if reader is None:
        return iterator
    from distill_jax.cache.join import CachedBatches
    return CachedBatches(iterator, reader)


def make_evaluator(cfg: RunConfig, student_cfg, teacher_cfg, spec, tokenizer, batch_sharding):
    """``evaluate(params, teacher_params) -> metrics``: the loss terms on the first
    ``eval.batches`` batches of ``eval.sources`` (unshuffled, the same batches every time)."""
    if not cfg.eval.sources:
        raise ValueError("eval.every > 0 needs eval.sources (held-out data files)")
    eval_data = dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle=False,
                                    num_epochs=None, workers=0)
    if cfg.teacher is not None and cfg.teacher.cache:
        raise ValueError("eval.every with a cached teacher is not supported yet: the cache covers "
                         "the training data only; set eval.every=0")
    step = jax.jit(make_eval_step(student_cfg, teacher_cfg, spec, chunk_size=cfg.loss.chunk_size))

    def evaluate(params, teacher_params) -> dict[str, float]:
        iterator = data.make_process_iterator(eval_data, tokenizer,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
        total = None
        for _ in range(cfg.eval.batches):
            sums = step(params, teacher_params,
                        _global_batch(next(iterator), batch_sharding, batch_keys(False)))
            total = sums if total is None else jax.tree.map(jax.numpy.add, total, sums)
        iterator.close()
        return {f"eval/{k.split('/')[-1]}": float(v) for k, v in summarize(total, spec).items()
                if not k.endswith("_sum")}

    return evaluate


def run(cfg: RunConfig, *, max_steps_this_call: int | None = None) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics."""
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_resume_config(run_dir, cfg)
    mesh, rules = build.make_mesh(cfg.mesh)
    spec = cfg.loss.spec()

    cached = bool(cfg.teacher is not None and cfg.teacher.cache and spec.needs_teacher)
    teacher = None
    if cfg.teacher is not None and ((spec.needs_teacher and not cached)
                                    or cfg.student.init == "teacher_layers"):
        teacher = build.load_model(cfg.teacher, mesh, rules)
    student = build.build_student(cfg.student, teacher, mesh, rules)
    if not spec.needs_teacher or cached:
        teacher = None  # a cached teacher never runs
    schedule = optim.make_schedule(cfg.optimizer, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    state = init_state(student.params, optimizer, cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer_path())
    reader = open_cache(cfg, tokenizer, student.config.vocab_size) if cached else None
    iterator = with_cache(data.make_process_iterator(
        cfg.data, tokenizer, process_index=jax.process_index(),
        process_count=jax.process_count()), reader)
    keys = batch_keys(cached)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    logger = mlog.MetricsLogger(run_dir, cfg.logging, total_steps=cfg.steps, is_main=is_main)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(None, state, iterator)
        logger.note(f"resumed {run_dir} from step {int(state.step)}")

    batch_sharding = sharding.batch_sharding(mesh, 2, rules)
    teacher_params = teacher.params if teacher is not None else None
    step_fn = jit_train_step(
        make_train_step(student.config, teacher.config if teacher else None, spec, optimizer,
                        schedule, grad_accum=cfg.optimizer.grad_accum,
                        chunk_size=cfg.loss.chunk_size, cache_tail=cfg.loss.tail if cached else None),
        state, teacher_params, batch_sharding, keys)

    evaluate = None
    if cfg.eval.every > 0:
        evaluate = make_evaluator(cfg, student.config, teacher.config if teacher else None, spec,
                                  tokenizer, batch_sharding)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops = mlog.flops_per_token(student.config.matmul_params(),
                                 teacher.config.matmul_params() if teacher else 0)
    peak = mlog.peak_flops(jax.devices()[0].device_kind, cfg.logging.peak_flops_per_device)
    start = int(state.step)
    end = cfg.steps if max_steps_this_call is None else min(cfg.steps, start + max_steps_this_call)
    logger.note(f"training {run_dir}: steps {start}..{end} of {cfg.steps}, "
                f"{student.config.num_params() / 1e6:.2f}M-param student, "
                f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}")
    pending = None
    last: dict[str, float] = {}
    t_prev = time.perf_counter()

    def eval_due(step: int) -> bool:
        return evaluate is not None and (step % cfg.eval.every == 0 or step == end)

    def flush(item):
        step, device_metrics, dt = item
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        host[mlog.STEP_TIME] = dt
        host[mlog.TOKENS_PER_SEC] = tokens_per_step / dt
        if peak:
            host[mlog.MFU] = tokens_per_step * flops / dt / (peak * jax.device_count())
        host.update({k: float(v) for k, v in iterator.stats.items()})
        if eval_due(step):
            host.update(evaluate(state.params, teacher_params))
        if step % cfg.logging.every == 0 or step == end or eval_due(step):
            logger.log(step, host)
        return host

    for step in range(start, end):
        batch = _global_batch(next(iterator), batch_sharding, keys)
        state, step_metrics = step_fn(state, teacher_params, batch)
        if pending is not None:
            last = flush(pending)
        now = time.perf_counter()
        pending = (step + 1, step_metrics, now - t_prev)
        t_prev = now
        ckpt.save(step + 1, state, iterator)
        if eval_due(step + 1):  # evaluate the state of this step now, not one step late
            last = flush(pending)
            pending = None
            t_prev = time.perf_counter()
    if pending is not None:
        jax.block_until_ready(state)
        last = flush(pending)
    if end > start:
        ckpt.save(end, state, iterator, force=end not in ckpt.all_steps())
    ckpt.close()
    logger.close()
    return last
