"""Shared by the benchmark scripts: print the result as JSON and optionally save it; the
measured matmul peak MFU is relative to."""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import jax.numpy as jnp


def emit(result: Any, out: str | None) -> None:
    """Print ``result`` as JSON on stdout and, with ``out``, write the same JSON there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul (fp32 accumulation) on the default device: the best
    of three timings of ``reps`` back-to-back products."""
    a = jax.device_put(jnp.ones((n, n), dtype))
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(a, a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best
