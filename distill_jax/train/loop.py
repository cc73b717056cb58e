"""The training loop: build everything from the run config, resume, step, log, checkpoint.

The loop does no math: the step is built in :mod:`distill_jax.train.step`, the models in
:mod:`distill_jax.train.build`, the data in :mod:`distill_jax.data`. Metrics of step ``i`` are
fetched to the host after step ``i + 1`` has been dispatched, so the device never waits.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax

from distill_jax import configlib, metrics as mlog, sharding
from distill_jax.checkpoint import Checkpointer
from distill_jax.config import RunConfig, dump_run_config
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train import build, optim
from distill_jax.train.setup import (RunSetup, global_batch, make_evaluator, open_cache,
                                     teacher_tokenizer)
from distill_jax.losses import terms
from distill_jax.train.step import init_loss_params, init_state, jit_train_step

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


def run(cfg: RunConfig, *, max_steps_this_call: int | None = None) -> dict[str, float]:
    """Train (or resume) the run ``cfg`` describes; returns the last logged metrics."""
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _check_resume_config(run_dir, cfg)
    mesh, rules = build.make_mesh(cfg.mesh)
    spec = cfg.loss.spec()

    needs_teacher = terms.needs_teacher(cfg.loss.terms)
    cached = bool(cfg.teacher is not None and cfg.teacher.cache and needs_teacher)
    vocabulary = terms.ALIGNED if cfg.loss.cross_tokenizer else terms.SHARED
    terms.check_signal(cfg.loss.terms, terms.signal_for(vocabulary, cached))  # before loading
    tokenizer = load_tokenizer(cfg.tokenizer_path())
    teacher_tok = teacher_tokenizer(cfg, tokenizer)
    teacher = None
    if cfg.teacher is not None and ((needs_teacher and not cached)
                                    or cfg.student.init in ("teacher_layers", "transfer")):
        teacher = build.load_model(cfg.teacher, mesh, rules)
    student = build.build_student(cfg.student, teacher, mesh, rules, student_tokenizer=tokenizer,
                                  teacher_tokenizer=teacher_tok)
    if not needs_teacher or cached:
        teacher = None  # a cached teacher never runs
    schedule = optim.make_schedule(cfg.optimizer, cfg.steps)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    loss_params = {}
    if teacher is not None:  # params of the loss terms (alm_latents / DSKD projectors)
        loss_params = init_loss_params(spec, student.config, teacher.config, student.params,
                                       cfg.seed)
    state = init_state(student.params, optimizer, cfg.seed, loss_params)

    reader = None
    if cached:
        reader = open_cache(cfg, teacher_tok,
                            None if cfg.loss.cross_tokenizer else student.config.vocab_size)
    setup = RunSetup(cfg, spec, tokenizer, teacher_tok, student.config,
                   teacher.config if teacher else None, cached)
    iterator = setup.data_iterator(cfg.data, reader)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    logger = mlog.MetricsLogger(run_dir, cfg.logging, total_steps=cfg.steps, is_main=is_main)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(None, state, iterator)
        logger.note(f"resumed {run_dir} from step {int(state.step)}")

    batch_sharding = sharding.batch_sharding(mesh, 2, rules)
    teacher_params = teacher.params if teacher is not None else None
    step_fn = jit_train_step(setup.train_step(optimizer, schedule), state, teacher_params,
                             batch_sharding, setup.keys)

    evaluate, eval_teacher_params = None, teacher_params
    if cfg.eval.every > 0:
        if cached and (cfg.teacher.hf_path or cfg.teacher.preset):
            teacher_eval = build.load_model(cfg.teacher, mesh, rules)
            eval_setup = RunSetup(cfg, spec, tokenizer, teacher_tok, student.config,
                                teacher_eval.config, False)
            eval_teacher_params = teacher_eval.params
        else:
            eval_setup = setup
        evaluate = make_evaluator(eval_setup, batch_sharding)
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
            host.update(evaluate(state.params, eval_teacher_params))
        if step % cfg.logging.every == 0 or step == end or eval_due(step):
            logger.log(step, host)
        return host

    for step in range(start, end):
        batch = global_batch(next(iterator), batch_sharding, setup.keys)
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
