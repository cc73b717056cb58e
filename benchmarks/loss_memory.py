"""Peak memory of the distillation loss's forward + backward: chunked vs full logits.

The step measured is ``value_and_grad`` of the loss with respect to the student's final hidden
states and lm_head, from (student hidden, student head, teacher hidden, teacher head, labels,
mask) — what the train step differentiates. "naive" computes (B, T, V) logits for both models and
calls ``combined_loss``; "chunked" is ``chunked_loss`` (each chunk recomputed in the backward
pass); "fused" is ``chunked_loss`` with the cotangent announced, as the training step runs it
(each chunk's backward in the forward scan, no recomputation). Figures come from XLA's buffer assignment
(``jax.jit(f).lower(...).compile().memory_analysis()``), so nothing is allocated and the full
Qwen2.5-sized case compiles on a laptop CPU. ``--execute`` also runs every variant on the
current device and reports the allocator's peak where the backend exposes it (GPU/TPU), and the
process's max RSS (run one variant per process, e.g. ``--skip-naive --chunk-sizes 512``, for it
to mean anything on CPU).

    python benchmarks/loss_memory.py                       # Qwen2.5 0.5B <- 1.5B shapes
    python benchmarks/loss_memory.py --length 512 --execute --out /tmp/loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import losses as L

GiB = 1024 ** 3


def _parse_terms(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        out[name.strip()] = float(weight or 1.0)
    return out


def _step(kind: str, spec: L.LossSpec, chunk_size: int, softcap: float | None):
    if kind == "fused":
        return _fused_step(spec, chunk_size, softcap)

    def loss(hs, ws, ht, wt, labels, mask):
        if kind == "naive":
            zs = L.logits_from_hidden(hs, ws, softcap)
            zt = L.logits_from_hidden(ht, wt, softcap)
            return L.combined_loss(zs, zt, labels, mask, spec)
        return L.chunked_loss(hs, ws, ht, wt, labels, mask, spec=spec, chunk_size=chunk_size,
                              student_softcap=softcap, teacher_softcap=softcap)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _fused_step(spec: L.LossSpec, chunk_size: int, softcap: float | None):
    """The training step's form: the cotangent of every term's sum (weight / token count) is
    announced, so each chunk's backward runs in the forward scan (no recomputation)."""
    names = [n for n, _ in spec.terms]

    def step(hs, ws, ht, wt, labels, mask):
        tokens = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
        ct = {n: jnp.float32(w) / tokens for n, w in spec.terms}

        def sums(hs, ws):
            _, m = L.chunked_loss(hs, ws, ht, wt, labels, mask, spec=spec, chunk_size=chunk_size,
                                  student_softcap=softcap, teacher_softcap=softcap, cotangent=ct)
            return {n: m[L.kd.sum_key(n)] for n in names}

        s, vjp = jax.vjp(sums, hs, ws)
        loss = sum(s[n] * ct[n] for n in names)
        return (loss, s), vjp(ct)

    return step


def _shapes(a):
    h_dtype = jnp.dtype(a.dtype)
    s = jax.ShapeDtypeStruct
    return (s((a.batch, a.length, a.hidden), h_dtype), s((a.hidden, a.vocab), jnp.float32),
            s((a.batch, a.length, a.teacher_hidden), h_dtype),
            s((a.teacher_hidden, a.vocab), jnp.float32),
            s((a.batch, a.length), jnp.int32), s((a.batch, a.length), jnp.bool_))


def _concrete(a, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for sd in _shapes(a):
        if sd.dtype == jnp.int32:
            out.append(jnp.asarray(rng.integers(0, a.vocab, sd.shape), jnp.int32))
        elif sd.dtype == jnp.bool_:
            out.append(jnp.ones(sd.shape, bool))
        else:
            scale = 1.0 if len(sd.shape) == 3 else sd.shape[0] ** -0.5
            out.append(jnp.asarray(scale * rng.standard_normal(sd.shape, np.float32), sd.dtype))
    return out


def measure(a, kind: str, chunk_size: int) -> dict:
    spec = L.LossSpec(_parse_terms(a.terms), temperature=a.temperature)
    fn = jax.jit(_step(kind, spec, chunk_size, a.softcap))
    t0 = time.perf_counter()
    compiled = fn.lower(*_shapes(a)).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    row = dict(variant=kind if kind == "naive" else f"{kind}/{chunk_size}",
               chunk_size=None if kind == "naive" else chunk_size, compile_s=round(compile_s, 2))
    if ma is None:
        row["memory_analysis"] = None
    else:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes")
        for f in fields:
            row[f] = int(getattr(ma, f, 0) or 0)
        row["peak_estimate_bytes"] = (row["argument_size_in_bytes"] + row["output_size_in_bytes"]
                                      - row["alias_size_in_bytes"] + row["temp_size_in_bytes"])
    if a.execute:
        args = _concrete(a)
        dev = jax.devices()[0]
        before = (dev.memory_stats() or {}).get("peak_bytes_in_use")
        (loss, _), grads = compiled(*args)
        jax.block_until_ready(grads)
        t0 = time.perf_counter()
        for _ in range(a.repeats):
            (loss, _), grads = compiled(*args)
        jax.block_until_ready(grads)
        row["step_s"] = round((time.perf_counter() - t0) / a.repeats, 4)
        row["loss"] = float(loss)
        # Process-wide high-water mark (Linux: KiB): meaningful when one variant runs per process.
        row["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
            row["device_peak_before_bytes"] = before
        del args, grads
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=896, help="student hidden size (Qwen2.5-0.5B)")
    p.add_argument("--teacher-hidden", type=int, default=1536, help="teacher (Qwen2.5-1.5B)")
    p.add_argument("--dtype", default="bfloat16", help="hidden-state dtype (heads are fp32)")
    p.add_argument("--chunk-sizes", default="256,512,1024,2048")
    p.add_argument("--terms", default="forward_kl=1.0,cross_entropy=0.1")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--execute", action="store_true", help="also run each variant (allocates)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)

    rows = [] if a.skip_naive else [measure(a, "naive", 0)]
    rows += [measure(a, kind, int(c)) for kind in ("chunked", "fused")
             for c in a.chunk_sizes.split(",") if c]
    result = dict(
        benchmark="loss_memory", backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind), jax=jax.__version__,
        shape=dict(batch=a.batch, length=a.length, vocab=a.vocab, hidden=a.hidden,
                   teacher_hidden=a.teacher_hidden, dtype=a.dtype),
        terms=_parse_terms(a.terms), temperature=a.temperature, softcap=a.softcap,
        full_logits_fp32_bytes=a.batch * a.length * a.vocab * 4, rows=rows)

    logits_gib = result["full_logits_fp32_bytes"] / GiB
    print(f"# value_and_grad of the loss, B={a.batch} T={a.length} V={a.vocab} "
          f"D_S={a.hidden} D_T={a.teacher_hidden} {a.dtype}; one fp32 (B,T,V) logits array = "
          f"{logits_gib:.2f} GiB; backend {result['backend']} ({result['device']})",
          file=sys.stderr)
    head = f"{'variant':<14}{'temp GiB':>10}{'args GiB':>10}{'out GiB':>9}{'peak GiB':>10}" \
           f"{'compile s':>11}"
    if a.execute:
        head += f"{'step s':>9}{'dev peak GiB':>14}"
    print(head, file=sys.stderr)
    for r in rows:
        if r.get("memory_analysis", 0) is None:
            print(f"{r['variant']:<14} (memory_analysis unavailable on this backend)",
                  file=sys.stderr)
            continue
        line = (f"{r['variant']:<14}{r['temp_size_in_bytes'] / GiB:>10.3f}"
                f"{r['argument_size_in_bytes'] / GiB:>10.3f}{r['output_size_in_bytes'] / GiB:>9.3f}"
                f"{r['peak_estimate_bytes'] / GiB:>10.3f}{r['compile_s']:>11.2f}")
        if a.execute:
            peak = r.get("device_peak_bytes")
            line += f"{r['step_s']:>9.3f}" + (f"{peak / GiB:>14.3f}" if peak else f"{'n/a':>14}")
        print(line, file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
