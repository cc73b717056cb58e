"""Generation vs training speed of on-policy distillation, and the share of a step spent sampling.

Reference pair of train_throughput.py (teacher d512/8 layers, student d256/4 layers, vocab
32,000), batch 4, fp32. Per prompt bucket P (prompts of exactly P tokens) and
``max_new_tokens`` N, three jitted functions are timed:

* rollout: the student samples N tokens after each prompt (KV-cache prefill + N one-token
  decode steps; no EOS id, so every row runs all N steps: the worst case);
  generation tokens/s = batch x N / time;
* train: the off-policy step (live teacher, reverse KL) on rows of P + N tokens (the rollout's
  rows); training tokens/s = batch x (P + N) / time;
* on-policy step: the engine's step with the "student's own samples" signal at lmbda = 1
  (rollout, teacher, loss and update in one jitted call).

The three are called in turn, ``--steps`` rounds after compiling; each one's fastest call is
reported (robust to load spikes on a shared machine; the medians are in the JSON). The share of
wall time generating is rollout / on-policy step; at lmbda = 0.5 (``mix: batch``, half the
steps sample) a run spends rollout / (on-policy + train) of its time generating.

    python benchmarks/on_policy.py [--buckets 64 256] [--max-new-tokens 128] [--steps 4]
                                   [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402
from train_throughput import BATCH, STUDENT, TEACHER  # noqa: E402

from distill_jax import losses, models as M, onpolicy
from distill_jax.losses import terms
from distill_jax.train import optim
from distill_jax.train.step import init_state, make_step


def _timed(fn, *args) -> tuple[float, object]:
    """Seconds of one call of ``fn(*args)`` (until its outputs are ready) and its outputs."""
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t, out


def _committed(tree):
    """``tree`` committed to the default device. Arrays made without a device (``M.init``'s
    params, the optimiser state) are uncommitted, a step's outputs committed: without this the
    second call of a train step compiles again, inside the timed calls."""
    return jax.device_put(tree, jax.devices()[0])


def bench(bucket: int, max_new_tokens: int, steps: int, dtype: str) -> dict:
    tc = M.ModelConfig(**TEACHER, dtype=dtype)
    sc = M.ModelConfig(**STUDENT, dtype=dtype)
    teacher_params = _committed(M.init(tc, 0).params)
    student_params = _committed(M.init(sc, 1).params)
    b, p, n = BATCH, bucket, max_new_tokens
    rng = np.random.RandomState(0)
    prompts = dict(prompt_tokens=rng.randint(1, tc.vocab_size, (b, p)).astype(np.int32),
                   prompt_lengths=np.full((b,), p, np.int32),
                   reference_tokens=rng.randint(1, tc.vocab_size, (b, n)).astype(np.int32),
                   reference_mask=np.ones((b, n), np.float32),
                   reference_lengths=np.full((b,), n, np.int32))
    prompts = _committed(prompts)
    spec = losses.LossSpec(terms={"reverse_kl": 1.0})
    opt = optim.make_optimizer(optim.OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)

    # 1. the rollout alone
    sample = jax.jit(lambda params, pr, key: onpolicy.rollout(
        sc, params, pr["prompt_tokens"], pr["prompt_lengths"], key, max_new_tokens=n,
        temperature=1.0, eos_ids=()))
    key = jax.random.key(0)
    compile_s = {"rollout": _timed(sample, student_params, prompts, key)[0]}
    r = sample(student_params, prompts, key)
    assert int(np.min(np.asarray(r.lengths))) == n, "every row generates max_new_tokens"

    # 2. the off-policy step on the rollout's rows
    rows = onpolicy.pack_rows(prompts["prompt_tokens"], prompts["prompt_lengths"], r.tokens,
                              r.lengths)
    rows = _committed({k: np.asarray(rows[k]) for k in terms.BATCH_KEYS})
    train = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=512),
                    donate_argnums=(0,))
    train_state = _committed(init_state(M.init(sc, 1).params, opt))
    compile_s["train"], (train_state, _) = _timed(train, train_state, teacher_params, rows)

    # 3. the on-policy step (lmbda = 1: every step samples)
    settings = onpolicy.OnPolicySettings(lmbda=1.0, max_new_tokens=n, eos_ids=(),
                                         prompt_buckets=(p,))
    step = jax.jit(make_step(sc, tc, spec, onpolicy.onpolicy_signal(settings), opt,
                             chunk_size=512), donate_argnums=(0,))
    on_state = _committed(init_state(M.init(sc, 1).params, opt))
    compile_s["onpolicy"], (on_state, _) = _timed(step, on_state, teacher_params, prompts)

    # Interleaved rounds, so a load spike on a shared machine hits all three alike; the
    # fastest call of each is reported (and the median).
    times: dict[str, list[float]] = {"rollout": [], "train": [], "onpolicy": []}
    for _ in range(steps):
        dt, _ = _timed(sample, student_params, prompts, key)
        times["rollout"].append(dt)
        dt, (train_state, _) = _timed(train, train_state, teacher_params, rows)
        times["train"].append(dt)
        dt, (on_state, _) = _timed(step, on_state, teacher_params, prompts)
        times["onpolicy"].append(dt)
    gen_s, train_s, on_s = (min(times[k]) for k in ("rollout", "train", "onpolicy"))
    row_tokens = b * (p + n)
    return dict(bucket=p, max_new_tokens=n, batch=b, dtype=dtype,
                rollout_s=gen_s, train_step_s=train_s, onpolicy_step_s=on_s,
                generation_tokens_per_s=b * n / gen_s, train_tokens_per_s=row_tokens / train_s,
                onpolicy_tokens_per_s=row_tokens / on_s,
                generation_share=gen_s / on_s,
                generation_share_lmbda_half=gen_s / (on_s + train_s),
                median_s={k: float(np.median(v)) for k, v in times.items()},
                compile_s=compile_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", type=int, nargs="+", default=[64, 256],
                   help="prompt lengths (each a prompt bucket: one compilation each)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed rounds (one call of each)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if min(args.buckets) < 1 or args.max_new_tokens < 1 or args.steps < 1:
        p.error("--buckets, --max-new-tokens and --steps must be positive")
    rows = [bench(b, args.max_new_tokens, args.steps, args.dtype) for b in args.buckets]
    print(f"{'prompt':>6} {'new':>4} {'gen tok/s':>10} {'train tok/s':>12} {'rollout s':>10} "
          f"{'train s':>8} {'on-policy s':>12} {'gen share':>10} {'(lmbda .5)':>10}",
          file=sys.stderr)
    for r in rows:
        print(f"{r['bucket']:6d} {r['max_new_tokens']:4d} {r['generation_tokens_per_s']:10.0f} "
              f"{r['train_tokens_per_s']:12.0f} {r['rollout_s']:10.3f} {r['train_step_s']:8.3f} "
              f"{r['onpolicy_step_s']:12.3f} {r['generation_share']:10.0%} "
              f"{r['generation_share_lmbda_half']:10.0%}", file=sys.stderr)
    result = {"device": jax.devices()[0].device_kind, "teacher": TEACHER, "student": STUDENT,
              "results": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
