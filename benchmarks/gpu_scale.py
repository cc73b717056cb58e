"""Distillation throughput and MFU at realistic sizes on an accelerator (GPU or TPU).

Pairs of released architectures with random weights (``distill_jax.models.presets``; no
checkpoint is read): by default a Llama-3.2-3B-shaped teacher and a Llama-3.2-1B-shaped
student (vocabulary 128,256), rows of 2,048 tokens, bf16 compute with fp32 master weights for
the student (the frozen teacher's params in the compute dtype), 8 rows a step, the student's
layers rematerialised (the memory plan: about 40 GiB a device, 49 GiB with the 8B teacher).
Three signals, each optional:

* ``live``: the distillation step with the teacher inside (forward KL at T=1 over the full
  vocabulary, AdamW). FLOPs per token as ``train_throughput.py`` counts them: the teacher's
  forward ``2 x matmul params`` plus the student's forward + backward ``6 x matmul params``
  (input embeddings excluded, lm_head included), plus attention
  ``4 x layers x heads x head_dim x length`` per token forward for each model (the full length,
  the causal half not subtracted), times 3 for the student.
* ``cached``: the same step reading a top-k teacher (k=64, bucket tail) from the batch. The
  top-k arrays are made in memory on the device from the teacher's logits, not read from disk,
  so this is the step alone. FLOPs: the student's only (``6 x matmul params`` + 3 x attention).
* ``onpolicy``: the student's generation tokens/s with the KV-cache generator (prefill of a
  128-token prompt, then 256 one-token decode steps, every row to the end), as
  ``on_policy.py`` measures it: batch x new tokens / time.

MFU is given against two peaks: the bf16 matmul peak measured in this process (an 8192^2
product), and, on known devices, the vendor's nominal dense bf16 peak. Inputs are committed to
the devices before the first call; the first call (compilation) is timed apart. With several
local devices the params and batch are sharded over an fsdp mesh of all of them. The memory
plan (``distill_jax.plan``) of the live step is printed first, and the run refused when it does
not fit. ``--smoke`` swaps the presets for tiny models of the same families at length 128, so
the whole script runs on a CPU in seconds.

    python benchmarks/gpu_scale.py [--student llama-3.2-1b] [--teacher llama-3.2-3b]
        [--length 2048] [--batch 8] [--remat full] [--steps 10]
        [--signals live cached onpolicy] [--profile DIR] [--out r.json]
    python benchmarks/gpu_scale.py --smoke --steps 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, matmul_peak  # noqa: E402

from distill_jax import losses, models as M, onpolicy  # noqa: E402
from distill_jax import plan as PL  # noqa: E402
from distill_jax import sharding as shd  # noqa: E402
from distill_jax.config import load_run_config  # noqa: E402
from distill_jax.losses import terms  # noqa: E402
from distill_jax.losses.sparse import topk_from_logits  # noqa: E402
from distill_jax.models import presets  # noqa: E402
from distill_jax.train import optim  # noqa: E402
from distill_jax.train.step import init_state, jit_train_step, make_step  # noqa: E402

SIGNALS = ("live", "cached", "onpolicy")
TOP_K = 64
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# Nominal dense bf16 peak per device, FLOP/s (source: vendor datasheet, dense bf16, i.e.
# without 2:4 sparsity). Keyed by a lowercase substring of jax's ``device_kind``; the first
# match wins, so the more specific names come first.
NOMINAL_BF16_PEAK = (
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v4", 275e12), ("tpu v6 lite", 918e12), ("tpu v6e", 918e12),
)
# --smoke: tiny models of the presets' families (the student's width, the teacher's depth)
SMOKE_STUDENT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16)
SMOKE_TEACHER = dict(SMOKE_STUDENT, hidden_size=96, intermediate_size=192, num_layers=3)
SMOKE_LENGTH, SMOKE_PROMPT, SMOKE_NEW, SMOKE_MATMUL = 128, 32, 16, 256
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class Refusal(Exception):
    """The setting cannot run here; the message (one line) says what to change."""


def nominal_peak(device_kind: str) -> float | None:
    """The vendor's dense bf16 FLOP/s for ``device_kind`` (jax's name), or None if unknown."""
    kind = device_kind.lower()
    return next((peak for name, peak in NOMINAL_BF16_PEAK if name in kind), None)


def attention_flops(cfg: M.ModelConfig, length: int) -> int:
    """Forward attention FLOPs per token: QK^T and PV over the full ``length``."""
    return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length


def flops_per_token(sc: M.ModelConfig, tc: M.ModelConfig | None, length: int) -> dict[str, int]:
    """FLOPs per token of a step: the student's forward + backward and, with ``tc``, the
    teacher's forward (``train_throughput.py``'s count)."""
    matmul = 6 * sc.matmul_params() + (2 * tc.matmul_params() if tc is not None else 0)
    attention = 3 * attention_flops(sc, length) + (attention_flops(tc, length) if tc else 0)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def model_configs(args) -> tuple[M.ModelConfig, M.ModelConfig]:
    """(student, teacher) configs of the setting: presets, or with ``--smoke`` tiny models of
    the presets' families."""
    dtype = DTYPES[args.dtype]
    s_base, t_base = presets.preset(args.student), presets.preset(args.teacher)
    if s_base.vocab_size != t_base.vocab_size:
        raise Refusal(f"--student {args.student} and --teacher {args.teacher} have different "
                      "vocabularies; pick presets of one tokenizer (e.g. llama-3.2-1b with "
                      "llama-3.2-3b or llama-3.1-8b)")
    if args.smoke:
        s_base = M.ModelConfig.tiny(s_base.family, **SMOKE_STUDENT)
        t_base = M.ModelConfig.tiny(t_base.family, **SMOKE_TEACHER)
    sc = s_base.replace(dtype=dtype, param_dtype="float32", remat=args.remat)
    tc = t_base.replace(dtype=dtype, param_dtype=dtype)  # frozen: no master copy needed
    return sc, tc


def plan_total(args, sc: M.ModelConfig, tc: M.ModelConfig, live: bool) -> PL.Plan:
    """The memory plan of the setting's step (live teacher, or cached) on this machine."""
    def source(cfg):
        fields = {k: getattr(cfg, k) for k in presets.ARCHITECTURE_FIELDS
                  if k not in ("family", "rope_scaling", "layer_types")}
        body = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)
        return f"{{{body}}}"

    family = lambda c: f"tiny-{c.family}"  # noqa: E731 (family defaults, then the fields)
    overrides = [
        f"teacher.preset={family(tc)}", f"teacher.overrides={source(tc)}",
        f"teacher.dtype={tc.dtype}", f"teacher.param_dtype={tc.param_dtype}",
        f"student.preset={family(sc)}", f"student.overrides={source(sc)}",
        f"student.dtype={sc.dtype}", f"student.param_dtype={sc.param_dtype}",
        f"student.remat={sc.remat}", f"data.batch_size={args.batch}",
        f"data.seq_len={args.length}", f"loss.chunk_size={args.chunk_size}",
        "loss.terms={forward_kl: 1.0}", "mesh.data=1", "mesh.fsdp=-1",
        f"cache.k={TOP_K}"] + ([] if live else ["teacher.cache=unused"])
    cfg = load_run_config(str(TINY_CONFIG), overrides)
    return PL.plan_run(cfg, devices=jax.local_device_count(), memory_gib=args.memory,
                       proposals=False)


def make_batch(batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, vocab, (batch, length)).astype(np.int32)
    return dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
                segment_ids=np.ones((batch, length), np.int32),
                loss_mask=np.ones((batch, length), np.float32))


def _timed_steps(call, steps: int, profile: str | None) -> tuple[float, float]:
    """(compile s, mean step s): the first call alone, then ``steps`` calls; with ``profile``
    two more calls under ``jax.profiler.trace``."""
    t = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - t) / steps
    if profile:
        with jax.profiler.trace(profile):
            for _ in range(2):
                out = call()
            jax.block_until_ready(out)
    return compile_s, step_s


class Bench:
    """The setting's models, mesh and batch, committed to the devices."""

    def __init__(self, args, sc: M.ModelConfig, tc: M.ModelConfig):
        self.args, self.sc, self.tc = args, sc, tc
        # fsdp over every local device (a one-device mesh on a single chip)
        self.mesh = shd.make_mesh(data=1, fsdp=-1, devices=jax.local_devices())
        self.rules = shd.DEFAULT_RULES
        self.batch_sh = shd.batch_sharding(self.mesh, 2, self.rules)
        self.spec = losses.LossSpec(terms={"forward_kl": 1.0}, temperature=1.0)
        self.opt = optim.make_optimizer(optim.OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
        self.batch = make_batch(args.batch, args.length, sc.vocab_size)
        self._teacher = self._student = None

    def put(self, tree, sharding):
        return jax.device_put(tree, sharding)

    def student(self):
        """A fresh copy of the student's initial params (a train step donates its state)."""
        if self._student is None:
            self._student = M.init(self.sc, 1, mesh=self.mesh, rules=self.rules).params
        return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False),
                            self._student)

    def teacher(self):
        if self._teacher is None:
            self._teacher = M.init(self.tc, 0, mesh=self.mesh, rules=self.rules).params
        return self._teacher

    def train(self, signal, teacher, batch, flops, what: str) -> dict:
        step = make_step(self.sc, self.tc if teacher is not None else None, self.spec, signal,
                         self.opt, chunk_size=self.args.chunk_size, tail="bucket")
        # every leaf on the mesh: the optimiser's scalar counts come out of init_state on one
        # device, unlike the step's outputs, and would make the second call compile again
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
            else self.put(x, replicated), init_state(self.student(), self.opt))
        keys = tuple(batch)
        ranks = {k: np.ndim(v) for k, v in batch.items()}
        jitted = jit_train_step(step, state, teacher, self.batch_sh, keys, ranks)
        batch = {k: self.put(v, jit_sharding(self.batch_sh, np.ndim(v)))
                 for k, v in batch.items()}
        holder = {"state": state}

        def call():
            holder["state"], metrics = jitted(holder["state"], teacher, batch)
            return metrics

        with jax.set_mesh(self.mesh):
            compile_s, step_s = _timed_steps(call, self.args.steps, self.args.profile_for(what))
        tokens = self.args.batch * self.args.length
        return dict(tokens_per_s=tokens / step_s, step_s=step_s, compile_s=compile_s,
                    flops_per_token=flops)

    def live(self) -> dict:
        flops = flops_per_token(self.sc, self.tc, self.args.length)
        out = self.train(terms.LIVE_SAME, self.teacher(), self.batch, flops, "live")
        out["flops_counted"] = "teacher forward + student forward and backward, attention included"
        return out

    def cached(self) -> dict:
        k = TOP_K
        tc = self.tc

        @jax.jit
        def top(params, tokens):  # one row at a time: never the whole batch's (B, L, V) logits
            return jax.lax.map(lambda t: jax.tree.map(
                lambda x: x[0], topk_from_logits(M.forward(M.Model(tc, params), t[None]), k)),
                tokens)

        with jax.set_mesh(self.mesh):
            ids, logprobs, tail = top(self.teacher(), self.put(self.batch["tokens"],
                                                                self.batch_sh))
        batch = dict(self.batch, teacher_topk_ids=ids.astype(jnp.int32),
                     teacher_topk_logprobs=logprobs.astype(jnp.float32),
                     teacher_tail_logmass=tail.astype(jnp.float32))
        flops = flops_per_token(self.sc, None, self.args.length)
        out = self.train(terms.CACHED_TOPK, None, batch, flops, "cached")
        out["flops_counted"] = "student forward and backward only, attention included"
        out["k"] = k
        return out

    def onpolicy(self) -> dict:
        a = self.args
        b, p, n = a.batch, a.prompt, a.new_tokens
        sc = self.sc
        params = self.student()
        rng = np.random.RandomState(0)
        prompts = self.put(rng.randint(1, sc.vocab_size, (b, p)).astype(np.int32), self.batch_sh)
        lengths = self.put(np.full((b,), p, np.int32), jit_sharding(self.batch_sh, 1))
        key = self.put(jax.random.key(0), jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec()))
        sample = jax.jit(lambda params, pr, ln, key: onpolicy.rollout(
            sc, params, pr, ln, key, max_new_tokens=n, temperature=1.0, eos_ids=()))
        with jax.set_mesh(self.mesh):
            compile_s, step_s = _timed_steps(lambda: sample(params, prompts, lengths, key),
                                             a.steps, a.profile_for("onpolicy"))
        return dict(tokens_per_s=b * n / step_s, step_s=step_s, compile_s=compile_s,
                    prompt=p, new_tokens=n,
                    flops_counted="none (generation is memory-bound; tokens/s only)")


def jit_sharding(batch_sh, ndim: int):
    """The (rows, ...) batch sharding for an array of rank ``ndim``."""
    spec = tuple(batch_sh.spec)[:1] + (None,) * (ndim - 1)
    return jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec(*spec))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="llama-3.2-1b", help="student preset (shape only)")
    p.add_argument("--teacher", default="llama-3.2-3b",
                   help="teacher preset (shape only), e.g. llama-3.1-8b")
    p.add_argument("--length", type=int, default=2048, help="tokens per row (e.g. 4096)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (global)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="compute dtype")
    p.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"],
                   help="the student's remat policy (without it the attention scores of every "
                        "layer are saved: about 80 GiB at batch 4 x 2048 for the 1B student)")
    p.add_argument("--chunk-size", type=int, default=512, help="loss chunk (tokens)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per signal")
    p.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=SIGNALS)
    p.add_argument("--memory", type=float, default=None,
                   help="device memory in GiB for the plan (default: what the device reports)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models of the presets' families at length 128: runs on a CPU")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="trace 2 extra steps per signal with jax.profiler into DIR/<signal>")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.length = SMOKE_LENGTH
    args.prompt, args.new_tokens = (SMOKE_PROMPT, SMOKE_NEW) if args.smoke else (128, 256)
    if min(args.length, args.batch, args.steps, args.chunk_size) < 1:
        p.error("--length, --batch, --steps and --chunk-size must be positive")
    args.profile_for = lambda what: (None if args.profile is None
                                     else str(Path(args.profile) / what))
    return args


def run(args) -> dict:
    """Run the setting's signals; the JSON result."""
    sc, tc = model_configs(args)
    devices = jax.local_devices()
    if args.batch % len(devices):
        raise Refusal(f"--batch {args.batch} does not divide over {len(devices)} devices; "
                      f"give a multiple of {len(devices)}")
    plan = plan_total(args, sc, tc, live="live" in args.signals)
    print(f"memory plan ({'live' if 'live' in args.signals else 'cached'} step): "
          f"{plan.summary()}", file=sys.stderr)
    if not plan.fits:
        raise Refusal(f"the memory plan needs {plan.total / PL.GiB:.1f} GiB per device, more "
                      f"than the {plan.memory / PL.GiB:.1f} GiB there; lower --batch or set "
                      "--remat full (or dots)")
    bench = Bench(args, sc, tc)
    results = {name: getattr(bench, name)() for name in SIGNALS if name in args.signals}
    kind = devices[0].device_kind
    peak = matmul_peak(jnp.bfloat16, n=SMOKE_MATMUL if args.smoke else 8192) * len(devices)
    nominal = nominal_peak(kind)
    nominal = None if nominal is None else nominal * len(devices)
    for r in results.values():
        fpt = r.get("flops_per_token")
        r["achieved_flops"] = None if fpt is None else r["tokens_per_s"] * fpt["total"]
        r["mfu_measured_peak"] = None if fpt is None else r["achieved_flops"] / peak
        r["mfu_nominal_peak"] = (None if fpt is None or nominal is None
                                 else r["achieved_flops"] / nominal)
    return {"device": kind, "devices": len(devices), "jax": jax.__version__,
            "setting": dict(student=args.student, teacher=args.teacher, smoke=args.smoke,
                            length=args.length, batch=args.batch, dtype=args.dtype,
                            remat=args.remat, chunk_size=args.chunk_size, steps=args.steps),
            "student_params": sc.num_params(), "teacher_params": tc.num_params(),
            "plan_total_bytes": plan.total, "device_memory_bytes": plan.memory,
            "measured_peak_flops": peak, "nominal_peak_flops": nominal,
            "nominal_peak_source": "vendor datasheet, dense bf16" if nominal else None,
            "results": results}


def table(result: dict) -> str:
    """The result as a table (stderr)."""
    s = result["setting"]
    lines = [f"{result['device']} x{result['devices']}, jax {result['jax']}: "
             f"{s['student']} <- {s['teacher']}{' (smoke shapes)' if s['smoke'] else ''}, "
             f"batch {s['batch']} x {s['length']}, {s['dtype']}, remat {s['remat']}",
             f"{'signal':>9} {'tokens/s':>10} {'step s':>9} {'compile s':>10} {'TFLOP/s':>8} "
             f"{'MFU meas.':>10} {'MFU nom.':>9}"]
    pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    for name, r in result["results"].items():
        tf = "-" if r["achieved_flops"] is None else f"{r['achieved_flops'] / 1e12:.3f}"
        lines.append(f"{name:>9} {r['tokens_per_s']:10.0f} {r['step_s']:9.4f} "
                     f"{r['compile_s']:10.1f} {tf:>8} {pct(r['mfu_measured_peak']):>10} "
                     f"{pct(r['mfu_nominal_peak']):>9}")
    nominal = result["nominal_peak_flops"]
    lines.append(f"peaks: measured bf16 matmul {result['measured_peak_flops'] / 1e12:.2f} "
                 "TFLOP/s; nominal " + ("unknown for this device" if nominal is None else
                                        f"{nominal / 1e12:.0f} TFLOP/s (vendor datasheet, "
                                        "dense bf16)"))
    lines.append("live FLOPs: teacher fwd + student fwd/bwd; cached: student only; attention "
                 "counted over the full length in both; onpolicy: generation tokens/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        result = run(args)
    except (Refusal, presets.ConfigError, PL.PlanError) as e:
        print(f"gpu_scale: {e}", file=sys.stderr)
        return 2
    print(table(result), file=sys.stderr)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
