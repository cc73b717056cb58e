"""Shared test setup: 8 fake CPU devices, a persistent compilation cache, exact fp32 matmuls.

The device count must be in ``XLA_FLAGS`` before jax initialises its backends, so this file
sets it before anything imports jax. An explicit ``--xla_force_host_platform_device_count``
already in the environment wins; tests that need 8 devices then skip (see ``devices8``).
"""

from __future__ import annotations

import os
from pathlib import Path

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICE_FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_DEVICE_FLAG}=8".strip()

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_CACHE_DIR", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# fp32 matmuls at full precision, so sharded and unsharded results agree to rounding.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices8() -> list[jax.Device]:
    """Eight devices (fake CPU ones unless the host really has 8); skips if there are fewer."""
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip(f"needs 8 devices, have {len(devices)}: XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} "
                    f"was set before jax was imported; use {_DEVICE_FLAG}=8")
    return devices[:8]


@pytest.fixture
def ambient_meshes(monkeypatch) -> list[dict]:
    """The ambient mesh's axis sizes each time a model's forward is traced from now on (recorded
    at ``models.transformer.constrain_batch``; ``{}`` outside a mesh). Clears jax's caches, since
    a forward traced earlier under another context would not be traced again."""
    from distill_jax.models import transformer
    seen: list[dict] = []
    real = transformer.constrain_batch

    def recording(x):
        seen.append(dict(jax.sharding.get_abstract_mesh().shape))
        return real(x)

    monkeypatch.setattr(transformer, "constrain_batch", recording)
    jax.clear_caches()
    return seen


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A packed (batch, length) batch: random tokens, 1-3 documents per row, some padding (0).

    Document lengths differ across rows, so the segment masks and the positions (which
    restart at every document) both matter.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for b in range(batch):
        end = length - (b % 4)  # the last b % 4 tokens are padding
        cuts = np.sort(rng.choice(np.arange(2, end - 1), size=b % 3, replace=False))
        bounds = [0, *cuts.tolist(), end]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[b, lo:hi] = s + 1
    return {"tokens": tokens, "segment_ids": segment_ids}


@pytest.fixture(scope="session")
def make_packed_batch():
    """The :func:`packed_batch` factory, for tests that need a batch of their own shape."""
    return packed_batch


def logged_rows(run_dir: Path) -> list[dict]:
    """A training run's ``metrics.jsonl`` records, in order."""
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def saved_params(run_dir: Path):
    """The params of a training run's latest checkpoint."""
    from distill_jax import checkpoint
    return checkpoint.load_state_dict(run_dir / "checkpoints")["params"]


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> the run's logged training metrics at that step, without the ones that vary from
    run to run of the same computation (wall times, throughput, data-loader counters)."""
    skip = ("time", "perf/", "data/")
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(skip)}
            for r in logged_rows(run_dir) if "distill/loss" in r}


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as the module ``bench_<name>`` (its folder on
    ``sys.path`` for its own ``_common`` import)."""
    import importlib.util
    import sys
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


class FakeCellRunner:
    """A benchmark's (method, seed) cell runner without training: records its calls, raises at
    the cell ``fail_at`` (an interrupted run) and returns made-up results (``result``)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def result(self, method: str, seed: int) -> dict:
        raise NotImplementedError

    def __call__(self, method, seed):
        if (method, seed) == self.fail_at:
            raise RuntimeError("interrupted")
        self.calls.append((method, seed))
        return self.result(method, seed)
