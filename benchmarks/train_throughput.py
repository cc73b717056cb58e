"""Training tokens/s and MFU of the distillation step on this machine, for the reference pair,
side by side with a PyTorch eager KD step of the same pair, batch and loss.

Teacher: Llama architecture, d=512, 8 layers, 8 heads (4 KV), MLP 1408, vocab 32,000, untied.
Student: the same family at d=256, 4 layers, 4 heads (2 KV), MLP 704.
Batch 4 x 512 tokens, forward KL at T=1 over the full vocabulary, AdamW; fp32 and bf16 compute
(fp32 master weights).

FLOPs per token (what MFU counts): the teacher forward only, the student forward + backward:
``2 x teacher + 6 x student`` matmul parameters (input embeddings excluded, lm_head included),
plus attention, ``4 x layers x heads x head_dim x length`` per token forward for each model
(QK^T and PV over the full length, the PaLM convention: the causal half is not subtracted),
times 3 for the student. MFU is relative to the matmul peak measured here, in the same process,
between the timed rounds. The rounds alternate (distill-jax, PyTorch, distill-jax, ...), and each
figure is the best round's, so a machine shared with other work biases neither side.

The PyTorch step is what TRL's GKD trainer and DistillKit run at heart: transformers'
``LlamaForCausalLM`` for both models (SDPA attention), the teacher under ``no_grad``, full
logits, ``KL(p_T || p_S)`` summed over the vocabulary and averaged over tokens, backward,
``torch.optim.AdamW``. It needs torch and transformers (test dependencies); without them the
comparison is skipped.

    python benchmarks/train_throughput.py [--steps 5] [--rounds 3] [--no-torch] [--out r.json]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit, matmul_peak  # noqa: E402

from distill_jax import losses, models as M
from distill_jax.train import optim
from distill_jax.losses import terms
from distill_jax.train.step import init_state, make_step

TEACHER = dict(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
               num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64)
STUDENT = dict(family="llama", vocab_size=32000, hidden_size=256, intermediate_size=704,
               num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
BATCH, LENGTH = 4, 512


def attention_flops(cfg: dict, length: int) -> int:
    """Forward attention FLOPs per token: QK^T and PV over the full ``length``."""
    return 4 * cfg["num_layers"] * cfg["num_heads"] * cfg["head_dim"] * length


def flops_per_token(tc: M.ModelConfig, sc: M.ModelConfig) -> dict[str, int]:
    """The FLOPs per token MFU counts: teacher forward, student forward + backward."""
    matmul = 2 * tc.matmul_params() + 6 * sc.matmul_params()
    attention = attention_flops(TEACHER, LENGTH) + 3 * attention_flops(STUDENT, LENGTH)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def make_batch() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 32000, (BATCH, LENGTH)).astype(np.int32)
    return dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                positions=np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
                segment_ids=np.ones((BATCH, LENGTH), np.int32),
                loss_mask=np.ones((BATCH, LENGTH), np.float32))


class JaxStep:
    """distill-jax's jitted step on the reference pair, its inputs already on the device."""

    def __init__(self, dtype: str):
        self.tc = M.ModelConfig(**TEACHER, dtype=dtype)
        self.sc = M.ModelConfig(**STUDENT, dtype=dtype)
        teacher, student = M.init(self.tc, 0), M.init(self.sc, 1)
        spec = losses.LossSpec(terms={"forward_kl": 1.0}, temperature=1.0)
        opt = optim.make_optimizer(optim.OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
        self.step = jax.jit(make_step(self.sc, self.tc, spec, terms.LIVE_SAME, opt,
                                      chunk_size=512), donate_argnums=(0,))
        # committed device arrays, so every call (the first included) sees the same input
        # placement and the timed calls never recompile
        self.batch = jax.device_put(make_batch())
        self.teacher = jax.device_put(teacher.params)
        self.state = jax.device_put(init_state(student.params, opt))
        t = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - t

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.teacher, self.batch)
        jax.block_until_ready(metrics)
        self.loss = float(metrics["distill/loss"])
        return (time.perf_counter() - t) / steps


class TorchStep:
    """A PyTorch eager KD step of the same pair, batch and loss (fp32)."""

    def __init__(self):
        import torch
        import transformers

        def config(c):
            return transformers.LlamaConfig(
                vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
                num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
                head_dim=c["head_dim"], max_position_embeddings=LENGTH,
                tie_word_embeddings=False, attn_implementation="sdpa")

        self.torch = torch
        torch.manual_seed(0)
        self.teacher = transformers.LlamaForCausalLM(config(TEACHER)).eval()
        self.student = transformers.LlamaForCausalLM(config(STUDENT)).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-4)
        self.tokens = torch.from_numpy(make_batch()["tokens"]).long()
        self.run(1)

    def run(self, steps: int) -> float:
        torch = self.torch
        t = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                t_logits = self.teacher(self.tokens).logits
            s_logits = self.student(self.tokens).logits
            t_logp = torch.log_softmax(t_logits, -1)
            s_logp = torch.log_softmax(s_logits, -1)
            loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.loss = float(loss)
        return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager step")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch_step = None
    if not args.no_torch:
        try:
            torch_step = TorchStep()
        except ImportError as e:
            print(f"PyTorch comparison skipped: {e}", file=sys.stderr)
    steps = {d: JaxStep(d) for d in args.dtypes}
    best = {d: float("inf") for d in args.dtypes}
    best_torch = float("inf")
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        for d in args.dtypes:
            best[d] = min(best[d], steps[d].run(args.steps))
            peaks[d] = max(peaks.get(d, 0.0), matmul_peak(jnp.dtype(d)))
            if torch_step is not None:
                best_torch = min(best_torch, torch_step.run(args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{d} {BATCH * LENGTH / best[d]:.0f}" for d in args.dtypes)
            + ("" if torch_step is None else f", torch {BATCH * LENGTH / best_torch:.0f}")
            + " tokens/s (best so far)", file=sys.stderr)
    fpt = flops_per_token(steps[args.dtypes[0]].tc, steps[args.dtypes[0]].sc)
    torch_tps = None if torch_step is None else BATCH * LENGTH / best_torch
    rows = []
    for d in args.dtypes:
        tps = BATCH * LENGTH / best[d]
        rows.append(dict(dtype=d, step_s=best[d], tokens_per_s=tps, compile_s=steps[d].compile_s,
                         flops_per_token=fpt, achieved_flops=tps * fpt["total"],
                         peak_flops=peaks[d], mfu=tps * fpt["total"] / peaks[d],
                         vs_torch=None if torch_tps is None else tps / torch_tps,
                         loss=steps[d].loss))
    print(f"{'compute':>9} {'step s':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} "
          f"{'MFU':>6} {'x torch':>8}", file=sys.stderr)
    for r in rows:
        vs = "" if r["vs_torch"] is None else f"{r['vs_torch']:8.2f}"
        print(f"{r['dtype']:>9} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} "
              f"{r['achieved_flops'] / 1e9:9.1f} {r['peak_flops'] / 1e9:13.1f} {r['mfu']:6.1%} "
              f"{vs}", file=sys.stderr)
    if torch_tps is not None:
        print(f"{'torch':>9} {best_torch:8.3f} {torch_tps:10.0f} "
              f"{torch_tps * fpt['total'] / 1e9:9.1f}   (PyTorch eager, fp32, same FLOP count)",
              file=sys.stderr)
    print(f"FLOPs per token: {fpt['total'] / 1e6:.1f} M ({fpt['matmul'] / 1e6:.1f} M matmul, "
          f"{fpt['attention'] / 1e6:.1f} M attention)", file=sys.stderr)
    result = {"device": jax.devices()[0].device_kind, "batch": BATCH, "length": LENGTH,
              "teacher": TEACHER, "student": STUDENT, "steps": args.steps,
              "rounds": args.rounds, "results": rows,
              "torch": None if torch_tps is None else {
                  "step_s": best_torch, "tokens_per_s": torch_tps, "loss": torch_step.loss}}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
