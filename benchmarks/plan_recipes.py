"""The shipped full-size recipes planned for v5e-8, v5p-8 and one 80 GB GPU, and the planner's
agreement with XLA's compiled peak on this machine's CPU (README "Memory plan").

The recipes' meshes name 16-way fsdp (a pod); on 8 chips they are planned with ``mesh.data=1
mesh.fsdp=8 mesh.tensor=1``, on one GPU with every axis 1. Figures come from
:func:`distill_jax.plan.plan_run` (nothing is loaded or compiled). ``--agreement`` also
compiles the train step of the tiny config and the reference pair of
``benchmarks/train_throughput.py`` in several settings (1 device; 8 host devices with data
parallelism and with fsdp; remat none / full / dots_no_batch; fp32 and bf16) and prints the
planned and compiled peaks per device (compiled: argument + output - alias + temp of
``memory_analysis()``).

    python benchmarks/plan_recipes.py [--agreement] [--out results.json]

The tables are printed as markdown (what the README quotes); ``--out`` writes the same rows as
JSON (atomically).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from distill_jax import plan as PL  # noqa: E402
from distill_jax.config import load_run_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ("qwen2.5-7b_to_0.5b.yaml", "llama3.1-8b_to_3.2-1b.yaml", "gemma2-9b_to_2b.yaml")
TARGETS = (("v5e-8", "v5e", 8, ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]),
           ("v5p-8", "v5p", 8, ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]),
           ("1x H100 80 GB", "h100", 1, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]))
REFERENCE = [
    "teacher.overrides={vocab_size: 32000, hidden_size: 512, intermediate_size: 1408, "
    "num_layers: 8, num_heads: 8, num_kv_heads: 4, head_dim: 64}",
    "student.overrides={vocab_size: 32000, hidden_size: 256, intermediate_size: 704, "
    "num_layers: 4, num_heads: 4, num_kv_heads: 2, head_dim: 64}",
    "data.batch_size=8", "data.seq_len=512", "loss.chunk_size=512",
    "loss.terms={forward_kl: 1.0}"]
BF16 = ["student.dtype=bfloat16", "teacher.dtype=bfloat16", "teacher.param_dtype=bfloat16"]
ONE, DATA8, FSDP8 = ["mesh.num_devices=1"], ["mesh.data=8"], ["mesh.data=1", "mesh.fsdp=8"]
SETTINGS = (
    ("tiny.yaml", "1 device", ONE),
    ("tiny.yaml", "8 devices, data=8", DATA8),
    ("tiny.yaml", "8 devices, fsdp=8", FSDP8),
    ("reference pair", "1 device, remat none", REFERENCE + ONE),
    ("reference pair", "1 device, remat full", REFERENCE + ONE + ["student.remat=full"]),
    ("reference pair", "1 device, remat dots_no_batch",
     REFERENCE + ONE + ["student.remat=dots_no_batch"]),
    ("reference pair", "1 device, grad_accum 2", REFERENCE + ONE + ["optimizer.grad_accum=2"]),
    ("reference pair", "1 device, bf16 compute", REFERENCE + ONE + BF16),
    ("reference pair", "8 devices, data=8, remat none", REFERENCE + DATA8),
    ("reference pair", "8 devices, data=8, remat full", REFERENCE + DATA8
     + ["student.remat=full"]),
    ("reference pair", "8 devices, fsdp=8, remat none", REFERENCE + FSDP8),
    ("reference pair", "8 devices, fsdp=8, remat full", REFERENCE + FSDP8
     + ["student.remat=full"]),
    ("reference pair", "1 device, LoRA rank 16", REFERENCE + ONE + ["student.lora.rank=16"]),
    ("reference pair", "8 devices, fsdp=8, LoRA rank 16", REFERENCE + FSDP8
     + ["student.lora.rank=16"]),
)


def recipes_table(rows: list[dict]) -> str:
    lines = ["| recipe | target | per device | fits | largest item | first change that fits |",
             "|---|---|---|---|---|---|"]
    for recipe in RECIPES:
        for name, kind, devices, mesh in TARGETS:
            cfg = load_run_config(CONFIGS / recipe, mesh)
            plan = PL.plan_run(cfg, devices=devices, device_kind=kind)
            fix = next((p for p in plan.proposals if p.total <= plan.memory and not p.planned),
                       None)
            fix_text = "" if plan.fits else (
                f"{' '.join(fix.overrides)}: {fix.total / PL.GiB:.1f} GiB" if fix else
                "none of the proposals")
            rows.append(dict(recipe=recipe, target=name, total_gib=plan.total / PL.GiB,
                             memory_gib=plan.memory / PL.GiB, fits=plan.fits,
                             largest=plan.largest.name, change=fix_text))
            lines.append(
                f"| {recipe.removesuffix('.yaml')} | {name} | {plan.total / PL.GiB:.1f} GiB "
                f"of {plan.memory / PL.GiB:.0f} | {'yes' if plan.fits else 'no'} | "
                f"{plan.largest.name} {plan.largest.bytes / PL.GiB:.1f} GiB | {fix_text} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    lines = ["| config | setting | planned MiB | XLA peak MiB | planned / XLA |",
             "|---|---|---|---|---|"]
    for config, setting, overrides in SETTINGS:
        cfg = load_run_config(CONFIGS / "tiny.yaml", overrides)
        planned = PL.plan_run(cfg).total
        compiled = PL.xla_peak(cfg)["peak"]
        rows.append(dict(config=config, setting=setting, planned_mib=planned / 2**20,
                         xla_peak_mib=compiled / 2**20, ratio=planned / compiled))
        lines.append(f"| {config} | {setting} | {planned / 2**20:.1f} | {compiled / 2**20:.1f} "
                     f"| {planned / compiled:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agreement", action="store_true",
                    help="also compile the step in several settings and compare")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    result: dict[str, list[dict]] = {"recipes": [], "agreement": []}
    print(recipes_table(result["recipes"]), flush=True)
    if args.agreement:
        print(agreement_table(result["agreement"]), flush=True)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
