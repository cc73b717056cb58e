"""Tokens/s of the cross-tokenizer ALM step vs the same-tokenizer KD step, same models and batch.

The reference pair of ``train_throughput.py`` (teacher d=512/8 layers, student d=256/4 layers,
vocab 32,000, batch 4 x 512, fp32, AdamW). The KD step: full-vocabulary forward KL plus
cross-entropy. The ALM step: ``alm`` + ``sft`` with a live teacher on its own rows (here the
same tokens, so every chunk is one token on each side -- the densest alignment, the most
chunks), with and without GradMag; ``alm`` + ``sft`` + ``alm_latents`` (through the projector
the different widths need); and ``sft`` + ``dskd``. All compute the teacher forward inside the step.

    python benchmarks/alm_step.py [--steps 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402
from train_throughput import BATCH, LENGTH, STUDENT, TEACHER  # noqa: E402

from distill_jax import losses, models as M
from distill_jax.losses.xtok import XtokSpec
from distill_jax.train import optim
from distill_jax.losses.terms import LIVE_ALIGNED, LIVE_SAME
from distill_jax.train.step import init_loss_params, init_state, make_step


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 32000, (BATCH, LENGTH)).astype(np.int32)
    pos = np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1))
    ones = np.ones((BATCH, LENGTH), np.int32)
    chunks = np.where(pos < LENGTH - 1, pos, -1).astype(np.int32)
    b = dict(tokens=tokens, targets=np.roll(tokens, -1, 1), positions=pos, segment_ids=ones,
             loss_mask=(pos < LENGTH - 1).astype(np.float32), chunk_ids=chunks)
    b.update(teacher_tokens=tokens, teacher_targets=b["targets"], teacher_positions=pos,
             teacher_segment_ids=ones, teacher_chunk_ids=chunks)
    return b


def _time(step, state, teacher_params, batch, steps: int) -> tuple[float, float]:
    t = time.perf_counter()
    state, metrics = step(state, teacher_params, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, teacher_params, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t) / steps, compile_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tc, sc = M.ModelConfig(**TEACHER), M.ModelConfig(**STUDENT)
    teacher, student = M.init(tc, 0), M.init(sc, 1)
    opt = optim.make_optimizer(optim.OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
    batch = jax.device_put(_batch())
    word = np.zeros(32000, bool)
    word[::7] = True  # a fixed set of "word-start" tokens
    kd_keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
    rows = []
    kd_spec = losses.LossSpec(terms={"forward_kl": 1.0, "cross_entropy": 1.0})
    kd = make_step(sc, tc, kd_spec, LIVE_SAME, opt, chunk_size=512)
    cases = [("kd: forward_kl + cross_entropy", kd, {k: batch[k] for k in kd_keys}, kd_spec)]
    variants = [("alm + sft, balance=none", {"alm": 1.0, "sft": 1.0}, "none"),
                ("alm + sft, balance=gradmag", {"alm": 1.0, "sft": 1.0}, "gradmag"),
                ("alm + sft + alm_latents", {"alm": 1.0, "sft": 1.0, "alm_latents": 1.0}, "none"),
                ("sft + dskd", {"sft": 1.0, "dskd": 1.0}, "none")]
    for name, terms, balance in variants:
        spec = XtokSpec(terms=terms, balance=balance)
        step = make_step(sc, tc, spec, LIVE_ALIGNED, opt, student_word_start=word,
                         teacher_word_start=word, chunk_size=512)
        cases.append((name, step, batch, spec))
    for name, step, b, spec in cases:
        params = jax.tree.map(jnp.copy, student.params)  # the step donates its state
        loss_params = init_loss_params(spec, sc, tc, params)  # alm_latents / DSKD projectors
        dt, compile_s = _time(jax.jit(step, donate_argnums=(0,)),
                              init_state(params, opt, loss_params=loss_params),
                              teacher.params, b, args.steps)
        rows.append(dict(step=name, step_s=dt, tokens_per_s=BATCH * LENGTH / dt,
                         compile_s=compile_s))
    base = rows[0]["tokens_per_s"]
    print(f"{'step':<34} {'step s':>8} {'tokens/s':>10} {'vs kd':>7}", file=sys.stderr)
    for r in rows:
        r["relative_to_kd"] = r["tokens_per_s"] / base
        print(f"{r['step']:<34} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['relative_to_kd']:7.2f}", file=sys.stderr)
    emit({"device": jax.devices()[0].device_kind, "batch": BATCH, "length": LENGTH,
          "teacher": TEACHER, "student": STUDENT, "results": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
