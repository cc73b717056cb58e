"""Training tokens/s and MFU of the distillation step on this machine, for the reference pair.

Teacher: Llama architecture, d=512, 8 layers, 8 heads (4 KV), MLP 1408, vocab 32,000, untied.
Student: the same family at d=256, 4 layers, 4 heads (2 KV), MLP 704.
Batch 4 x 512 tokens, forward KL at T=1 over the full vocabulary, AdamW; fp32 and bf16 compute
(fp32 master weights). FLOPs per token = 2 x teacher + 6 x student matmul parameters (input
embeddings excluded, lm_head included). MFU is relative to the matmul peak measured here.

    python benchmarks/train_throughput.py [--steps 10] [--out results.json]
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

from distill_jax import losses, models as M
from distill_jax.train import optim
from distill_jax.losses import terms
from distill_jax.train.step import init_state, make_step

TEACHER = dict(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
               num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
STUDENT = dict(family="llama", vocab_size=32000, hidden_size=256, intermediate_size=704,
               num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
BATCH, LENGTH = 4, 512


def matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul (fp32 accumulation) on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        out = f(a, a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def bench(dtype: str, steps: int) -> dict:
    tc = M.ModelConfig(**TEACHER, dtype=dtype)
    sc = M.ModelConfig(**STUDENT, dtype=dtype)
    teacher, student = M.init(tc, 0), M.init(sc, 1)
    spec = losses.LossSpec(terms={"forward_kl": 1.0}, temperature=1.0)
    ocfg = optim.OptimizerConfig(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(ocfg, 1000)
    step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=512), donate_argnums=(0,))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 32000, (BATCH, LENGTH)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                 positions=np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
                 segment_ids=np.ones((BATCH, LENGTH), np.int32),
                 loss_mask=np.ones((BATCH, LENGTH), np.float32))
    batch = jax.device_put(batch)
    state = init_state(student.params, opt)
    t = time.perf_counter()
    state, metrics = step(state, teacher.params, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, teacher.params, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t) / steps
    tokens_per_s = BATCH * LENGTH / dt
    flops_per_token = 2 * tc.matmul_params() + 6 * sc.matmul_params()
    return dict(dtype=dtype, step_s=dt, tokens_per_s=tokens_per_s, compile_s=compile_s,
                flops_per_token=flops_per_token, achieved_flops=tokens_per_s * flops_per_token,
                loss=float(metrics["distill/loss"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    peaks = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}
    rows = []
    for dtype in ("float32", "bfloat16"):
        r = bench(dtype, args.steps)
        r["peak_flops"] = peaks[dtype]
        r["mfu"] = r["achieved_flops"] / peaks[dtype]
        rows.append(r)
    print(f"{'compute':>9} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} "
          f"{'MFU':>6}", file=sys.stderr)
    for r in rows:
        print(f"{r['dtype']:>9} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['achieved_flops'] / 1e9:9.1f} {r['peak_flops'] / 1e9:13.1f} {r['mfu']:6.1%}",
              file=sys.stderr)
    result = {"device": jax.devices()[0].device_kind, "batch": BATCH, "length": LENGTH,
              "teacher": TEACHER, "student": STUDENT, "results": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
