"""Metrics people can read: a live progress line with ETA, JSONL always, TensorBoard on request.

Throughput and MFU: ``flops_per_token`` counts 2 x teacher + 6 x student matmul parameters per
token (input embeddings excluded, lm_head included); MFU divides achieved FLOP/s by the peak of
all devices (``peak_flops_per_device`` from the config, or the table below by device kind).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, TextIO, TypeVar

T = TypeVar("T")

TOKENS_PER_SEC = "perf/tokens_per_sec"
STEP_TIME = "perf/step_time_s"
MFU = "perf/mfu"
# further metrics the progress line shows when a run reports them (on-policy samples' quality)
PROGRESS_EXTRA = ("onpolicy/teacher_logprob", "onpolicy/cut_tokens")

# Dense bf16 peak FLOP/s per device (chip) by ``jax.Device.device_kind`` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``every``: log every N steps; ``tensorboard``: also write event files;
    ``progress``: live progress line (on a terminal); ``peak_flops_per_device`` for MFU
    (default: looked up from the device kind; unknown kinds report no MFU)."""

    every: int = 10
    tensorboard: bool = False
    progress: bool = True
    peak_flops_per_device: float | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"logging.every must be >= 1 (log every N steps), got {self.every}")


def peak_flops(device_kind: str, override: float | None = None) -> float | None:
    if override:
        return override
    for prefix, value in PEAK_FLOPS.items():
        if device_kind.startswith(prefix):
            return value
    return None


def flops_per_token(student_matmul_params: int, teacher_matmul_params: int = 0) -> float:
    return 6.0 * student_matmul_params + 2.0 * teacher_matmul_params


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(items: Iterable[T], desc: str, *, total: int | None = None, enabled: bool = True,
             stream: TextIO | None = None, every_s: float = 30.0, every_frac: float = 0.1
             ) -> Iterator[T]:
    """``items`` with progress on ``stream`` (default stderr): a tqdm bar on a terminal; else
    (a log file, a pipe) a plain line ``desc: i/total (p%) elapsed`` every ``every_frac`` of the
    total or ``every_s`` seconds, whichever comes first, and one at the end, so logs are not
    filled with redraws."""
    stream = stream or sys.stderr
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if bool(getattr(stream, "isatty", lambda: False)()):
        from tqdm import tqdm
        yield from tqdm(items, desc=desc, total=total, file=stream, leave=False)
        return
    t0 = last_t = time.monotonic()
    last_frac, i = 0.0, 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        frac = i / total if total else 0.0
        if (total and frac - last_frac >= every_frac and i < total) or now - last_t >= every_s:
            of = f"/{total} ({100 * frac:.0f}%)" if total else ""
            stream.write(f"{desc}: {i}{of} {format_eta(now - t0)} elapsed\n")
            stream.flush()
            last_t, last_frac = now, frac
    if i:
        stream.write(f"{desc}: {i}{f'/{total}' if total else ''} done in {format_eta(time.monotonic() - t0)}\n")
        stream.flush()


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run directory (append, one object per logged step),
    optional TensorBoard events, and a progress line (``\\r`` on a terminal, plain lines
    otherwise). Only process 0 writes."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, *, total_steps: int,
                 is_main: bool = True, stream: TextIO | None = None):
        self.cfg = cfg
        self.total = total_steps
        self.is_main = is_main
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start: tuple[float, int] | None = None
        self._file = None
        self._tb = None
        if is_main:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            if cfg.tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record metrics of ``step`` (floats); updates the ETA from wall time."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        if not self.is_main:
            return
        record = {"step": step, "time": time.time(),
                  **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)
        if self.cfg.progress:
            self._progress(step, record, now)

    def _progress(self, step: int, record: Mapping[str, float], now: float) -> None:
        t0, s0 = self._start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else float("nan")
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        keys = [k for k in ("distill/loss", "train/grad_norm", "train/lr", TOKENS_PER_SEC, MFU,
                            *PROGRESS_EXTRA) if k in record]
        parts = [f"step {step}/{self.total}"] + [
            f"{k.split('/')[-1]}={record[k]:.4g}" for k in keys] + [f"eta {format_eta(eta)}"]
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A plain message line (start, resume, checkpoint...)."""
        if self.is_main:
            if self.tty:
                self.stream.write("\n")
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.is_main:
            self.stream.write("\n")
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
