"""Shared by the benchmark scripts: print the result as JSON and optionally save it; the
measured matmul peak MFU is relative to."""

from __future__ import annotations

import json
import os
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


# ------------------------------------------------------------------ resumable benchmark cells
# A benchmark of (method, seed) cells records each finished cell in one JSON file, written
# atomically after every cell, and skips finished cells on the next call.

def write_json_atomic(path, obj: Any) -> None:
    """Write ``obj`` as JSON via a temporary file and a rename."""
    from distill_jax.fsutil import write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2))


def load_results(path, setting: dict[str, Any], **fresh: Any) -> dict[str, Any]:
    """The results file at ``path`` if it was made at ``setting``, else a fresh record
    ``{"setting", "cells": {}, **fresh}`` (an older file for another setting is kept beside it
    as ``<name>.<time>.json``)."""
    new = {"setting": setting, "cells": {}, **fresh}
    if not path.is_file():
        return new
    old = json.loads(path.read_text())
    if old.get("setting") == setting:
        return {**new, **old}
    os.replace(path, path.with_name(f"{path.stem}.{int(time.time())}.json"))
    return new


def cell_key(method: str, seed: int) -> str:
    return f"{method}/seed{seed}"


def method_cells(entries: dict[str, Any], method: str) -> dict[int, Any]:
    """The values of ``method`` among ``entries`` keyed by :func:`cell_key`, by seed (other
    keys are skipped)."""
    return {int(k.split("seed")[-1]): v for k, v in entries.items() if k.split("/")[0] == method}


def run_cells(cells, results: dict[str, Any], path, runner, log=print) -> dict[str, Any]:
    """Run ``runner(method, seed)`` for every cell not yet in ``results["cells"]``, recording
    each result (with its ``cell_s``) and writing ``path`` atomically after each; returns
    ``results``."""
    todo = [c for c in cells if cell_key(*c) not in results["cells"]]
    log(f"{len(cells) - len(todo)} of {len(cells)} cells already done, {len(todo)} to run")
    for i, (method, seed) in enumerate(todo, 1):
        log(f"\n== [{i}/{len(todo)}] {method}, seed {seed}")
        t = time.perf_counter()
        res = runner(method, seed)
        results["cells"][cell_key(method, seed)] = {**res, "cell_s": time.perf_counter() - t}
        write_json_atomic(path, results)
    return results


def remaining_s(cells, results: dict[str, Any], unmeasured_s) -> float:
    """Seconds the unfinished ``cells`` will take: each the mean time of its method's finished
    cells, else ``unmeasured_s(method)`` (the benchmark's own per-step estimate)."""
    total = 0.0
    for method, seed in cells:
        if cell_key(method, seed) in results["cells"]:
            continue
        done = [c["cell_s"] for c in method_cells(results["cells"], method).values()]
        total += sum(done) / len(done) if done else unmeasured_s(method)
    return total
