"""``distill-jax eval``: evaluate a run's teacher and student from its config.

:func:`run_eval` builds the models (the student from the run's latest checkpoint in
``run_dir``, or ``step``; the student as initialised when the run has no checkpoint yet), each
with its own tokenizer (the teacher's is ``teacher.tokenizer`` when set, else the run's), and
measures what the config's ``eval`` section asks for:

* held-out text (``eval.sources``): bits per byte and perplexity of each model
  (:mod:`distill_jax.eval.lm`). Records are read and rendered as the training data is (the
  ``data`` section's record kind, fields, BOS/EOS and ``loss_on_prompt``; chats in the run
  tokenizer's template), and a teacher with another tokenizer tokenizes the same text, so both
  models are scored on the same UTF-8 bytes;
* teacher/student top-1 agreement and KL(teacher || student) per token on the same text, when
  the two share a tokenizer (:mod:`distill_jax.eval.agreement`);
* math exact match on ``eval.math`` (:mod:`distill_jax.eval.math_eval`);
* with ``eval.onpolicy`` (on-policy runs): the student completes the held-out prompts with
  the fixed key training evaluates with and the teacher grades them
  (:func:`distill_jax.train.assemble.onpolicy_eval_of`), the same ``eval/onpolicy/...``
  numbers training logs at that step.

Both models are placed on the run's mesh (``mesh`` section) with the training sharding rules;
held-out batches are spread over its data-parallel axes (``eval.batch_size`` rounded up to a
multiple of them), while generation keeps every prompt on every data-parallel shard (fsdp and
tensor axes still split the model). The result is a dict (see :func:`run_eval`), written as JSON to
``<run_dir>/eval/eval_step<N>.json`` (``N``: the student's checkpoint step, 0 for the
initialised student) through a temporary file and a rename, and :func:`format_table` renders it
for the terminal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from distill_jax import checkpoint, models as M, sharding
from distill_jax.config import RunConfig
from distill_jax.errors import UserError
from distill_jax.onpolicy import EVAL_PREFIX
from distill_jax.eval.agreement import agreement_docs
from distill_jax.eval.lm import ScoredDoc, evaluate_docs, same_first_byte, scored_doc
from distill_jax.eval.math_eval import load_problems, math_accuracy
from distill_jax.tokenizer import load_tokenizer, tokenizer_fingerprint

MODELS = ("teacher", "student")
EVAL_DIR = "eval"


def result_path(run_dir: str | Path, step: int) -> Path:
    """Where the JSON result of evaluating the run at ``step`` goes."""
    return Path(run_dir) / EVAL_DIR / f"eval_step{step}.json"


def write_json_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same directory and a
    rename, so a reader sees the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_models(cfg: RunConfig, models: Sequence[str]) -> tuple[str, ...]:
    models = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"models must be a non-empty subset of {','.join(MODELS)}, got "
                         f"{','.join(models) or 'nothing'}")
    if "teacher" in models and cfg.teacher is None:
        raise ValueError("the config has no teacher section; evaluate with models=('student',) "
                         "(--models student)")
    return models


def _load_student(cfg: RunConfig, step: int | None, teacher: M.Model | None, mesh, rules,
                  tokenizers: dict[str, Any]) -> tuple[M.Model, int, bool]:
    """The student at ``step`` (default: the latest checkpoint) placed on ``mesh``, its step,
    and whether it came from a checkpoint (else it is the student as initialised, step 0)."""
    from distill_jax.export import load_student
    from distill_jax.train.assemble import init_student
    run_dir = Path(cfg.run_dir)
    latest = checkpoint.latest_step(run_dir / "checkpoints")
    if step is None and latest is None:
        return init_student(cfg, mesh, rules, teacher=teacher, tokenizer=tokenizers["student"],
                            teacher_tokenizer=tokenizers.get("teacher")), 0, False
    model, _ = load_student(run_dir, step)
    params = jax.device_put(model.params, M.param_shardings(model.config, mesh, rules))
    return model.replace(params=params), latest if step is None else step, True


def heldout_docs(cfg: RunConfig, student_tokenizer: Any, teacher_tokenizer: Any = None
                 ) -> tuple[list[ScoredDoc], list[ScoredDoc] | None]:
    """The held-out documents of ``eval.sources`` tokenized by the run's tokenizer, and by the
    teacher's when it differs (the same text, scored from the same first byte; else None); see
    the module docstring."""
    from distill_jax.data import read_records
    from distill_jax.data.tokenize import tokenize_records
    data_cfg = dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle=False,
                                   num_epochs=None, workers=0,
                                   max_records=cfg.eval.max_documents)
    records = []
    for record in read_records(data_cfg):
        if cfg.eval.max_documents is not None and len(records) >= cfg.eval.max_documents:
            break
        records.append(record)
    docs = []
    for doc in tokenize_records(records, student_tokenizer, data_cfg,
                                teacher_tokenizer=teacher_tokenizer):
        if isinstance(doc, Exception):
            if data_cfg.on_bad_record == "raise":
                raise doc
            continue
        docs.append(doc)
    student = [scored_doc(d.student) for d in docs]
    if teacher_tokenizer is None:
        return student, None
    pairs = [same_first_byte(s, scored_doc(d.teacher)) for s, d in zip(student, docs)]
    return [s for s, _ in pairs], [t for _, t in pairs]


def run_eval(cfg: RunConfig, *, step: int | None = None, models: Sequence[str] | None = None,
             progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate the run ``cfg`` describes (see the module docstring); returns the result dict.

    ``step``: the student checkpoint (default: the latest). ``models``: which of ``teacher``
    and ``student`` to evaluate (default: both, or the student alone when the config has no
    teacher). ``write``: save the JSON to :func:`result_path` (process 0 only); its path is the
    result's ``path``.

    The dict holds ``run_dir``, ``step``, ``student_source``, ``eval`` (the settings), ``models``
    (per model: ``params``, ``tokenizer``, ``load_s``, ``heldout`` with ``bits_per_byte``,
    ``perplexity``, ``nll_nats``, ``tokens``, ``bytes``, ``wall_s``, ``tokens_per_s``, and
    ``math`` with ``accuracy``, ``correct``, ``total``, ``num_samples``, ``generated_tokens``,
    ``wall_s``, ``tokens_per_s`` and per-problem ``predictions``), ``agreement``
    (``top1_agreement``, ``kl_teacher_student``, ``tokens``, ``wall_s``, ``tokens_per_s``; or
    None), ``onpolicy`` (with ``eval.onpolicy``: the ``eval/onpolicy/...`` metrics and
    ``wall_s``; else None), ``notes`` and ``wall_s``.

    Models are placed on the run's mesh and every evaluation is traced under it
    (``jax.set_mesh``), as training is, so activations stay sharded by rows.
    """
    from distill_jax.train import build
    mesh, rules = build.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _run_eval(cfg, mesh, rules, step=step, models=models, progress=progress,
                         write=write)


def _run_eval(cfg: RunConfig, mesh, rules, *, step: int | None, models: Sequence[str] | None,
              progress: bool, write: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    if models is None:
        models = MODELS if cfg.teacher is not None else ("student",)
    models = _check_models(cfg, models)
    ev = cfg.eval
    if not ev.sources and not ev.math:
        raise UserError("no eval data configured: set eval.sources=[{path: FILE}] (held-out bits per "
                        "byte) and/or eval.math=FILE (math exact match)")
    notes: list[str] = []
    batch_sharding = sharding.batch_sharding(mesh, 2, rules)

    tok_spec = {"student": cfg.tokenizer_path()}
    if cfg.teacher is not None:
        tok_spec["teacher"] = cfg.teacher.tokenizer or cfg.tokenizer_path()
    tokenizers = {name: load_tokenizer(spec) for name, spec in tok_spec.items()}
    shared = "teacher" in tokenizers and (
        tok_spec["teacher"] == tok_spec["student"]
        or tokenizer_fingerprint(tokenizers["teacher"]) == tokenizer_fingerprint(tokenizers["student"]))

    loaded: dict[str, M.Model] = {}
    load_s: dict[str, float] = {}
    if "teacher" in models:
        t = time.perf_counter()
        from distill_jax.train import build
        loaded["teacher"] = build.load_model(cfg.teacher, mesh, rules)
        load_s["teacher"] = time.perf_counter() - t
    if "student" in models:
        t = time.perf_counter()
        loaded["student"], student_step, from_checkpoint = _load_student(
            cfg, step, loaded.get("teacher"), mesh, rules, tokenizers)
        load_s["student"] = time.perf_counter() - t
        source = f"checkpoint step {student_step}" if from_checkpoint else "initialised"
        if not from_checkpoint:
            notes.append(f"no checkpoint in {Path(cfg.run_dir) / 'checkpoints'}: evaluated the "
                         "student as initialised (step 0)")
    else:
        student_step = step if step is not None else (
            checkpoint.latest_step(Path(cfg.run_dir) / "checkpoints") or 0)
        source = "not evaluated"

    out_models: dict[str, dict[str, Any]] = {
        name: {"params": m.config.num_params(), "tokenizer": str(tok_spec[name]),
               "load_s": load_s[name]} for name, m in loaded.items()}

    docs: dict[str, list[ScoredDoc]] = {}
    seq_len = ev.seq_len or cfg.data.seq_len
    if ev.sources:
        student_docs, teacher_docs = heldout_docs(
            cfg, tokenizers["student"], None if shared or "teacher" not in tokenizers
            else tokenizers["teacher"])
        docs = {"student": student_docs, "teacher": teacher_docs or student_docs}
        for name, model in loaded.items():
            r = evaluate_docs(model, docs[name], seq_len=seq_len, batch_size=ev.batch_size,
                              chunk_size=ev.chunk_size, sharding=batch_sharding,
                              progress=progress)
            out_models[name]["heldout"] = r.as_dict()
        if {"teacher", "student"} <= set(out_models):
            b_t = out_models["teacher"]["heldout"]["bytes"]
            b_s = out_models["student"]["heldout"]["bytes"]
            if b_t != b_s:
                notes.append(f"teacher and student scored different bytes ({b_t} vs {b_s}): "
                             "tokens straddling the end of a scored span count whole")
    else:
        notes.append("eval.sources is empty: no held-out bits per byte or agreement")

    agreement = None
    if {"teacher", "student"} <= set(loaded) and ev.sources:
        if shared:
            agreement = agreement_docs(loaded["teacher"], loaded["student"], docs["student"],
                                       seq_len=seq_len, batch_size=ev.batch_size,
                                       chunk_size=ev.chunk_size, sharding=batch_sharding,
                                       progress=progress).as_dict()
        else:
            notes.append("teacher and student tokenizers differ: no token-level agreement")

    if ev.math:
        problems = load_problems(ev.math, ev.math_samples)
        for name, model in loaded.items():
            r = math_accuracy(model, tokenizers[name], problems,
                              max_new_tokens=ev.max_new_tokens, num_samples=ev.num_samples,
                              temperature=ev.temperature, batch_size=ev.batch_size,
                              seed=cfg.seed, progress=progress)
            out_models[name]["math"] = r.as_dict()
    else:
        notes.append("eval.math is not set: no math exact match")

    onpolicy_metrics = None
    if ev.onpolicy and {"teacher", "student"} <= set(loaded) and ev.sources:
        from distill_jax.train.assemble import onpolicy_eval_of
        t = time.perf_counter()
        onpolicy_metrics = onpolicy_eval_of(cfg, loaded["student"], loaded["teacher"],
                                            tokenizers["student"], batch_sharding)
        onpolicy_metrics["wall_s"] = time.perf_counter() - t
    elif ev.onpolicy:
        notes.append("eval.onpolicy needs both models and eval.sources: no on-policy metrics")

    result = {
        "run_dir": str(cfg.run_dir), "step": student_step,
        "student_source": source,
        "eval": {"sources": [s.path for s in ev.sources], "max_documents": ev.max_documents,
                 "seq_len": seq_len, "batch_size": ev.batch_size, "chunk_size": ev.chunk_size,
                 "math": ev.math, "math_samples": ev.math_samples,
                 "max_new_tokens": ev.max_new_tokens, "num_samples": ev.num_samples,
                 "temperature": ev.temperature if ev.num_samples > 1 else 0.0},
        "models": out_models, "agreement": agreement, "onpolicy": onpolicy_metrics,
        "notes": notes,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "wall_s": time.perf_counter() - t_start,
    }
    if write and jax.process_index() == 0:
        result["path"] = str(write_json_atomic(result, result_path(cfg.run_dir, student_step)))
    return result


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The result of :func:`run_eval` as a terminal table: one row per model (held-out bits per
    byte, perplexity, tokens/s; math accuracy and generated tokens/s), then agreement and
    notes."""
    lines = [f"eval of {result['run_dir']}, student: {result['student_source']}"]
    head = (f"{'model':<8} {'params':>8} {'bits/byte':>9} {'ppl':>9} {'tokens':>8} "
            f"{'text s':>7} {'tok/s':>9} {'math acc':>8} {'correct':>9} {'math s':>7} "
            f"{'gen tok/s':>9}")
    lines += [head, "-" * len(head)]
    for name, m in result["models"].items():
        h, q = m.get("heldout", {}), m.get("math", {})
        correct = f"{q['correct']}/{q['total']}" if q else "-"
        lines.append(
            f"{name:<8} {m['params'] / 1e6:7.2f}M {_fmt(h.get('bits_per_byte'), '9.4f')} "
            f"{_fmt(h.get('perplexity'), '9.3f')} {_fmt(h.get('tokens'), '8d')} "
            f"{_fmt(h.get('wall_s'), '7.1f')} {_fmt(h.get('tokens_per_s'), '9.0f')} "
            f"{_fmt(q.get('accuracy'), '8.3f')} {correct:>9} {_fmt(q.get('wall_s'), '7.1f')} "
            f"{_fmt(q.get('tokens_per_s'), '9.0f')}")
    a = result.get("agreement")
    if a:
        lines.append(f"teacher vs student: top-1 agreement {a['top1_agreement']:.4f}, "
                     f"KL(teacher || student) {a['kl_teacher_student']:.4f} nats/token over "
                     f"{a['tokens']} tokens ({a['wall_s']:.1f} s, {a['tokens_per_s']:.0f} tok/s)")
    o = result.get("onpolicy")
    if o:
        p = EVAL_PREFIX
        lines.append(f"on-policy (student samples, teacher grades): teacher log-prob "
                     f"{o[p + 'teacher_logprob']:.4f} nats/token, loss {o[p + 'loss']:.4f}, "
                     f"mean length {o[p + 'mean_completion_length']:.1f} tokens, EOS share "
                     f"{o[p + 'eos_share']:.3f} over {o[p + 'sampled_rows']:.0f} prompts "
                     f"({o['wall_s']:.1f} s)")
    for n in result.get("notes", []):
        lines.append(f"note: {n}")
    if result.get("path"):
        lines.append(f"wrote {result['path']}")
    return "\n".join(lines)


def main_eval(cfg: RunConfig, *, step: int | None = None,
              models: Sequence[str] | None = None) -> dict:
    """:func:`run_eval` with progress bars, then the table on stdout (what the CLI runs)."""
    result = run_eval(cfg, step=step, models=models, progress=True)
    if jax.process_index() == 0:
        print(format_table(result), file=sys.stdout, flush=True)
    return result
