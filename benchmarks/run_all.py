"""Run every benchmark (what `make bench` does) and collect their JSON into benchmarks/results/.

    python benchmarks/run_all.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "train_throughput": ["--steps", "3", "--rounds", "3"],
    "loss_memory": [],
    "data_throughput": [],
    "cache_training": ["--steps", "3"],
    "cache_fidelity": [],
    "cache_size": [],
    "alignment_throughput": [],
    "cache_write": [],
    "alm_step": ["--steps", "3"],
    "int8_teacher": [],
    "plan_recipes": ["--agreement"],
    "on_policy": [],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(BENCHMARKS))
    args = p.parse_args(argv)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    failed = []
    for name, extra in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", file=sys.stderr, flush=True)
        out = out_dir / f"{name}.json"
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra, "--out", str(out)])
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
