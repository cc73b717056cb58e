"""The training loop: resume, step, log, checkpoint.

The loop builds nothing and does no math: :func:`distill_jax.train.assemble.assemble` turns the
run config into the mesh, models, signal, step, initial state and data; the step is
:mod:`distill_jax.train.step`'s. Metrics of step ``i`` are
fetched to the host after step ``i + 1`` has been dispatched, so the device never waits, except
at a checkpoint or evaluation step: a checkpoint is written only once its step's loss, gradient
norm and params are known to be finite (a non-finite step stops the run, or is skipped with
``optimizer.skip_nonfinite``). The main process holds a lock on the run directory throughout.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jax

from distill_jax import checkpoint, metrics as mlog, sharding
from distill_jax.checkpoint import Checkpointer
from distill_jax.config import RunConfig, resume_config, write_run_config
from distill_jax.locking import FileLock
from distill_jax.train import optim
from distill_jax.train.assemble import assemble, global_batch
from distill_jax.train.step import jit_train_step

LOCK_FILE = "train.lock"  # held by the run's main process while it trains


def run(cfg: RunConfig, *, max_steps_this_call: int | None = None) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics. A second
    run on the same run_dir is refused (``LockedError``) while the first one lives."""
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(FileLock(run_dir / LOCK_FILE, "run directory lock"))
        return _train(cfg, run_dir, is_main, stack, max_steps_this_call)


def _train(cfg: RunConfig, run_dir: Path, is_main: bool, stack: contextlib.ExitStack,
           max_steps_this_call: int | None) -> dict[str, float]:
    cfg, notes = resume_config(
        run_dir, cfg, checkpoint.latest_step(run_dir / "checkpoints") is not None)
    run_ = assemble(cfg)
    # the mesh is ambient while steps are traced: the model keeps its activations batch-sharded
    stack.enter_context(jax.set_mesh(run_.mesh))
    schedule = optim.make_schedule(cfg.optimizer, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    state = run_.initial_state(optimizer)
    iterator = run_.data_iterator()
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint,
                        base_fingerprint=run_.base_fingerprint)
    logger = mlog.MetricsLogger(run_dir, cfg.logging, total_steps=cfg.steps, is_main=is_main)
    stack.callback(logger.close)
    stack.callback(ckpt.close)  # (closed first) waits for an asynchronous save
    restored, skipped = ckpt.restore_valid(state, iterator)
    for note in skipped:
        logger.note(note)
    if restored is not None:
        state = restored
        logger.note(f"resumed {run_dir} from step {int(state.step)}")
    for note in notes:
        logger.note(note)
    if is_main:  # only now: a run that fails to set up leaves no config behind
        write_run_config(run_dir, cfg)

    batch_sharding = sharding.batch_sharding(run_.mesh, 2, run_.rules)
    teacher_params = run_.teacher_params
    step_fn = jit_train_step(
        optim.guard_nonfinite(run_.train_step(optimizer, schedule), cfg.optimizer.skip_nonfinite),
        state, teacher_params, batch_sharding, run_.batch_keys, run_.batch_ranks)
    evaluate = run_.evaluator(batch_sharding) if cfg.eval.every > 0 else None
    student, teacher = run_.student, run_.teacher
    flops = mlog.flops_per_token(student.config.matmul_params(),
                                 teacher.config.matmul_params() if teacher else 0)
    peak = mlog.peak_flops(jax.devices()[0].device_kind, cfg.logging.peak_flops_per_device)
    start = int(state.step)
    end = cfg.steps if max_steps_this_call is None else min(cfg.steps, start + max_steps_this_call)
    logger.note(f"training {run_dir}: steps {start}..{end} of {cfg.steps}, "
                f"{student.config.num_params() / 1e6:.2f}M-param student, "
                f"{jax.device_count()} device(s), mesh {dict(run_.mesh.shape)}")
    pending = None
    last: dict[str, float] = {}
    t_prev = time.perf_counter()

    def eval_due(step: int) -> bool:
        return evaluate is not None and (step % cfg.eval.every == 0 or step == end)

    def flush(item):
        step, device_metrics, dt, tokens_per_step = item
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if host[optim.NONFINITE] and not cfg.optimizer.skip_nonfinite:
            raise optim.NonFiniteError(
                f"{optim.nonfinite_message(step, host)}: stopped without checkpointing it; lower "
                "optimizer.lr or set optimizer.skip_nonfinite=true to skip such steps")
        if host[optim.NONFINITE]:
            logger.note(f"{optim.nonfinite_message(step, host)}: update skipped")
        host[mlog.STEP_TIME] = dt
        host[mlog.TOKENS_PER_SEC] = tokens_per_step / dt
        if peak:
            host[mlog.MFU] = tokens_per_step * flops / dt / (peak * jax.device_count())
        host.update({k: float(v) for k, v in iterator.stats.items()})
        if eval_due(step):
            host.update(evaluate(state.params))
        if step % cfg.logging.every == 0 or step == end or eval_due(step) or host[optim.NONFINITE]:
            logger.log(step, host)
        return host

    for step in range(start, end):
        local = run_.next_batch(iterator, state, step)
        batch = global_batch(local, batch_sharding, run_.batch_keys)
        state, step_metrics = step_fn(state, teacher_params, batch)
        if pending is not None:
            last = flush(pending)
        now = time.perf_counter()
        pending = (step + 1, step_metrics, now - t_prev, run_.tokens_per_step(local))
        t_prev = now
        # Evaluate the state of this step now, not one step late; and check it is finite
        # before checkpointing it (the device waits only at these steps).
        if eval_due(step + 1) or ckpt.due(step + 1):
            last = flush(pending)
            pending = None
            ckpt.save(step + 1, state, iterator)
            t_prev = time.perf_counter()
    if pending is not None:
        jax.block_until_ready(state)
        last = flush(pending)
    if end > start:
        ckpt.save(end, state, iterator, force=end not in ckpt.all_steps())
    return last
