"""``distill-jax traces``: sample a teacher on prompts, verify every sample, write them once.

Every prompt gets ``samples`` completions from the teacher (KV-cache decoding,
:func:`distill_jax.models.generate.decode`, ``batch_size`` sequences per jitted call with one
padded prompt length for the whole prompt set, so one compilation serves the run; each prompt
is prefilled once for all its samples; the teacher's params are sharded on the config's mesh
over this process's devices). Each completion is scored by the teacher as it is sampled (its
mean log-prob per completion token at temperature 1, read from the logits each token was drawn
from) and judged by the verifier against the prompt's reference. The records go to the output
directory in committed groups (:mod:`distill_jax.traces.store`); one record per sample::

    {"prompt_id": 7, "sample": 0, "messages": [{"role": "user", "content": "..."}],
     "prompt": "...", "reference": "... #### 72", "completion": "...", "answer": "72",
     "verdict": true, "mean_logprob": -0.41, "length": 57, "finished": true}

``prompt_id`` is the record's position in the prompt file(s); ``prompt`` the last user
message; ``length`` the number of generated tokens (the EOS token included when one was
produced, ``finished``); ``answer`` the verifier's reading of the completion (what
majority-consistent selection votes on).

The sampling key of generation call ``c`` of group ``g`` is ``fold_in(fold_in(key(seed), g),
c)``, and a group's calls always hold the same rows, so results do not depend on
interruptions or on how many processes share the prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.pairs import encode_messages
from distill_jax.traces.config import TracesConfig
from distill_jax.traces.store import TracesDir
from distill_jax.traces.verify import Verifier, make_verifier


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its id (position in the prompt set), the conversation up to the answer,
    the reference answer (text), and the prompt's token ids."""

    id: int
    messages: tuple
    reference: str
    tokens: tuple[int, ...]

    @property
    def text(self) -> str:
        """The last user message (the question)."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def _split_chat(messages: Sequence[dict], where: str) -> tuple[tuple, str]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise ValueError(f"{where}: a prompt record needs the reference answer as an assistant "
                         "message after the prompt (or prompt/response fields)")
    return tuple(dict(m) for m in messages[:last]), messages[last]["content"]


def load_prompts(cfg: TracesConfig, tokenizer: Any) -> list[Prompt]:
    """The prompts of ``cfg.prompts`` with their references and token ids."""
    from distill_jax.data import DataConfig, SourceConfig
    from distill_jax.data.records import read_records
    p = cfg.prompts
    data_cfg = DataConfig(sources=(SourceConfig(path=p.path, format=p.format),), record="chat",
                          prompt_field=p.prompt_field, response_field=p.response_field,
                          messages_field=p.messages_field, max_records=p.max_prompts)
    records = read_records(data_cfg)
    out = []
    for i in range(len(records)):
        rec = records[i]
        messages, reference = _split_chat(rec.data["messages"], f"{rec.source}: record {rec.index}")
        tokens = encode_messages(tokenizer, messages, p.chat_template)
        if not tokens:
            raise ValueError(f"{rec.source}: record {rec.index}: the prompt encodes to no tokens")
        out.append(Prompt(len(out), messages, reference, tuple(tokens)))
    if not out:
        raise ValueError(f"{p.path} holds no prompts")
    return out


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the prompts' token ids and references (what the samples depend on)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([list(p.tokens), p.reference]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Teachers


class Teacher(Protocol):
    """What the traces run needs from a teacher (a model, or a test's planted one)."""

    def sample(self, prompts: list[list[int]], samples: int, key: jax.Array
               ) -> tuple[list[list[int]], list[bool], list[float]]:
        """``samples`` completions of each prompt (prompt-major: prompt ``i``'s are rows
        ``i * samples ...``): per row the generated token ids, whether generation stopped at an
        EOS, and the teacher's mean log-prob per generated token at temperature 1."""


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "mode", "samples"))
def _sample_scored(model, tokens_BP, lengths_B, key, temperature, top_k, top_p, eos_V, pad_id,
                   *, max_new_tokens: int, mode: str, samples: int):
    """:func:`distill_jax.models.generate.decode` with shared prompt prefills, returning per
    row the generated ids, the sum of their temperature-1 log-probs, counts and EOS flags."""
    from distill_jax.models.generate import decode
    out_BN, lp_BN, count_B, done_B, _ = decode(
        model, tokens_BP, lengths_B, key, temperature, top_k, top_p, eos_V, pad_id,
        max_new_tokens=max_new_tokens, mode=mode, samples=samples, model_logprobs=True)
    return out_BN, jnp.sum(lp_BN, axis=-1), count_B, done_B


class ModelTeacher:
    """A model sampled by KV-cache decoding (:func:`distill_jax.models.generate.decode`, one
    jitted call per batch: each prompt prefilled once for all its samples, and each sampled
    token's temperature-1 log-prob read from the logits it was drawn from, so no second pass
    scores the completions). ``prompt_bucket``: the one padded prompt length (a multiple of 64
    covering every prompt of the run), so one compilation serves the run. ``mesh``: the mesh the
    model is placed on; sampling is traced under it (``jax.set_mesh``), as training is, so the
    activations stay sharded by rows (``models.transformer.constrain_batch``)."""

    def __init__(self, model: Any, *, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, eos_ids: Sequence[int], pad_id: int,
                 prompt_bucket: int, mesh: jax.sharding.Mesh | None = None):
        from distill_jax.models.generate import sampling_args
        self.model, self.mesh = model, mesh
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.top_k, self.top_p = top_k, top_p
        self.eos_ids, self.pad_id, self.prompt_bucket = tuple(eos_ids), pad_id, prompt_bucket
        vocab = model.config.vocab_size
        self._sampling = sampling_args(temperature, top_k, top_p, vocab)
        self._eos_V = np.zeros((vocab,), bool)
        self._eos_V[[int(e) for e in self.eos_ids if 0 <= int(e) < vocab]] = True

    def sample(self, prompts, samples, key):
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        width = max(self.prompt_bucket, -(-int(lengths.max()) // 64) * 64)
        tokens = np.zeros((len(prompts), width), np.int32)  # left-padded (token 0: masked)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
        mode, temperature, top_k, top_p = self._sampling
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            out, lp_sum, count, done = _sample_scored(
                self.model, tokens, lengths, key, temperature, top_k, top_p, self._eos_V,
                jnp.int32(self.pad_id), max_new_tokens=self.max_new_tokens, mode=mode,
                samples=int(samples))
        out, lp_sum, count, done = (np.asarray(a) for a in (out, lp_sum, count, done))
        seqs = [out[i, :count[i]].tolist() for i in range(len(out))]
        return (seqs, [bool(f) for f in done],
                [float(s) / max(int(n), 1) for s, n in zip(lp_sum, count)])


def load_teacher(cfg: TracesConfig, tokenizer: Any, prompt_bucket: int) -> ModelTeacher:
    """The config's teacher model, sharded on its mesh over this process's devices."""
    from distill_jax import sharding
    from distill_jax.models.source import load_model
    m = cfg.mesh
    devices = jax.local_devices()
    if m.num_devices is not None:
        devices = devices[:m.num_devices]
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices)
    model = load_model(cfg.teacher, mesh, {**sharding.DEFAULT_RULES, **m.rules})
    vocab = model.config.vocab_size
    if getattr(tokenizer, "__len__", None) and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's "
                         f"vocabulary is {vocab}; give the teacher's own tokenizer")
    eos = set(model.config.eos_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    return ModelTeacher(model, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, eos_ids=sorted(eos), pad_id=pad,
                        prompt_bucket=prompt_bucket, mesh=mesh)


# ---------------------------------------------------------------------------------------------
# Summary


@dataclasses.dataclass(frozen=True)
class TracesSummary:
    """Figures of a traces data set: ``prompts`` with samples so far (all of them when
    ``complete``), ``samples`` and ``correct`` samples, ``pass_at_1`` (mean over prompts of the
    fraction of correct samples), ``pass_at_n`` (prompts with at least one correct sample),
    ``kept_fraction`` (correct / all samples), ``mean_length`` (generated tokens per sample),
    and this run's ``generated_tokens`` over ``wall_s`` seconds of sampling."""

    out: str
    complete: bool
    prompts: int
    samples: int
    correct: int
    pass_at_1: float
    pass_at_n: float
    kept_fraction: float
    mean_length: float
    generated_tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tokens_per_s": self.tokens_per_s}

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        state = "complete" if self.complete else "partial (other processes' groups missing)"
        return (f"traces {self.out}: {state}: {self.prompts} prompts, {self.samples} samples, "
                f"pass@1 {self.pass_at_1:.3f}, pass@N {self.pass_at_n:.3f}, kept "
                f"{self.kept_fraction:.3f}, mean length {self.mean_length:.1f} tokens, "
                f"{self.tokens_per_s:.1f} tokens/s ({self.generated_tokens} generated this run "
                f"in {self.wall_s:.1f} s)")


def summarize(records: Sequence[dict], *, out: str = "", complete: bool = True,
              generated_tokens: int = 0, wall_s: float = 0.0) -> TracesSummary:
    """The :class:`TracesSummary` of a list of sample records."""
    by_prompt: dict[int, list[bool]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(bool(r["verdict"]))
    n = len(records)
    correct = sum(sum(v) for v in by_prompt.values())
    k = max(len(by_prompt), 1)
    return TracesSummary(
        out=out, complete=complete, prompts=len(by_prompt), samples=n, correct=correct,
        pass_at_1=sum(sum(v) / len(v) for v in by_prompt.values()) / k,
        pass_at_n=sum(any(v) for v in by_prompt.values()) / k,
        kept_fraction=correct / max(n, 1),
        mean_length=sum(r["length"] for r in records) / max(n, 1),
        generated_tokens=generated_tokens, wall_s=wall_s)


# ---------------------------------------------------------------------------------------------
# The run


def manifest(cfg: TracesConfig, prompts: Sequence[Prompt], tokenizer: Any) -> dict[str, Any]:
    """What the samples depend on (a run on an existing directory must match it): the
    teacher (its checkpoint's real path), the tokenizer's and the prompts' fingerprints (not
    their paths, so the same files named another way match), and every sampling setting."""
    from distill_jax.tokens import tokenizer_fingerprint
    t = cfg.teacher
    return {
        "teacher": {"hf_path": os.path.realpath(t.hf_path) if t.hf_path else None,
                    "preset": t.preset, "overrides": dict(t.overrides), "dtype": t.dtype,
                    "param_dtype": t.param_dtype, "seed": t.seed},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompts_sha256": prompts_fingerprint(prompts), "num_prompts": len(prompts),
        "samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "top_k": cfg.top_k, "max_new_tokens": cfg.max_new_tokens, "verifier": cfg.verifier,
        "seed": cfg.seed, "batch_size": cfg.batch_size,
        "prompts_per_group": cfg.prompts_per_group}


def group_records(group: int, prompts: Sequence[Prompt], cfg: TracesConfig, teacher: Teacher,
                  tokenizer: Any, verifier: Verifier) -> tuple[list[dict], int]:
    """Sample, score and verify every completion of one group; (records, generated tokens).

    With ``samples <= batch_size`` one call samples every prompt of the group ``samples``
    times (each prompt prefilled once); otherwise each call samples ``batch_size`` completions
    of the group's one prompt. Calls always have the same shape (a short group repeats its
    first prompt): one compilation for the run."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), group)
    if cfg.samples <= cfg.batch_size:
        per, samples_per_call, calls = cfg.batch_size // cfg.samples, cfg.samples, 1
    else:
        per, samples_per_call = 1, cfg.batch_size
        calls = -(-cfg.samples // cfg.batch_size)
    rows: list[tuple[Prompt, int, list[int], bool, float]] = []
    for c in range(calls):
        ids = [list(p.tokens) for p in prompts] + [list(prompts[0].tokens)] * (per - len(prompts))
        seqs, finished, logps = teacher.sample(ids, samples_per_call, jax.random.fold_in(key, c))
        for i, p in enumerate(prompts):
            for j in range(samples_per_call):
                s = c * samples_per_call + j
                if s < cfg.samples:
                    r = i * samples_per_call + j
                    rows.append((p, s, seqs[r], finished[r], logps[r]))
    records, generated = [], 0
    for p, s, seq, fin, lp in rows:
        text = tokenizer.decode(seq, skip_special_tokens=True)
        records.append({
            "prompt_id": p.id, "sample": s, "messages": list(p.messages),
            "prompt": p.text, "reference": p.reference, "completion": text,
            "answer": verifier.answer(text), "verdict": verifier(text, p.reference),
            "mean_logprob": lp, "length": len(seq), "finished": fin})
        generated += len(seq)
    return records, generated


def _barrier(active: bool, name: str) -> None:
    """Wait for every process of the JAX run (when ``active``)."""
    if active:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def run_traces(cfg: TracesConfig, *, teacher: Teacher | None = None, tokenizer: Any = None,
               stream=None) -> TracesSummary:
    """Sample, verify and write this process's share of the traces ``cfg`` describes (resuming
    what a previous run left), then, when every share is written, the whole data set. Returns
    the summary (of the whole set when complete, else of the samples written so far).
    ``teacher`` / ``tokenizer`` replace the config's (tests plant teachers this way)."""
    from distill_jax.tokenizer import load_tokenizer
    stream = stream or sys.stderr
    verifier = make_verifier(cfg.verifier)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer_path())
    prompts = load_prompts(cfg, tokenizer)
    out = TracesDir(cfg.out)
    index = jax.process_index() if cfg.process_index is None else cfg.process_index
    count = jax.process_count() if cfg.process_count is None else cfg.process_count
    # In a multi-process JAX run the processes meet twice: once the first has created the
    # directory (the others then only check its manifest), and once every group is written
    # (so the last one to finish is never missed and the data set is written once).
    together = cfg.process_index is None and count > 1
    if index == 0 or not together:
        out.open(manifest(cfg, prompts, tokenizer))
    _barrier(together, "traces: directory created")
    if index != 0 and together:
        out.open(manifest(cfg, prompts, tokenizer))
    per = cfg.prompts_per_group
    num_groups = -(-len(prompts) // per)
    mine = [g for g in range(num_groups) if g % count == index]
    todo = [g for g in mine if g not in out.done_groups()]
    generated, t0 = 0, time.perf_counter()
    if todo:
        if teacher is None:
            bucket = -(-max(len(p.tokens) for p in prompts) // 64) * 64
            teacher = load_teacher(cfg, tokenizer, bucket)
        t0 = time.perf_counter()
        done_prompts = (len(mine) - len(todo)) * per
        correct = total = 0
        for i, g in enumerate(todo):
            recs, n = group_records(g, prompts[g * per:(g + 1) * per], cfg, teacher, tokenizer,
                                    verifier)
            out.write_part(g, recs)
            generated += n
            done_prompts += len(recs) // cfg.samples
            correct += sum(r["verdict"] for r in recs)
            total += len(recs)
            if cfg.progress:
                dt = time.perf_counter() - t0
                eta = dt / (i + 1) * (len(todo) - i - 1)
                stream.write(f"traces: group {i + 1}/{len(todo)} of process {index}/{count}, "
                             f"{done_prompts} prompts done, kept {correct}/{total}, "
                             f"{generated / max(dt, 1e-9):.1f} tokens/s, eta {eta:.0f} s\n")
                stream.flush()
    wall = time.perf_counter() - t0 if todo else 0.0
    _barrier(together, "traces: groups written")
    complete = len(out.done_groups() & set(range(num_groups))) == num_groups
    records = [r for g in sorted(out.done_groups()) if g < num_groups for r in out.read_part(g)]
    summary = summarize(records, out=str(cfg.out), complete=complete, generated_tokens=generated,
                        wall_s=wall)
    if complete and (index == 0 or not together):
        stats = {k: v for k, v in summary.as_dict().items()
                 if k not in ("generated_tokens", "wall_s", "tokens_per_s", "out")}
        out.finalize(num_groups, stats)
        if cfg.select.policy is not None:
            from distill_jax.traces.selection import select_to_file
            select_to_file(out.path, cfg.select.policy, cfg.select.out,
                           max_per_prompt=cfg.select.max_per_prompt)
    return summary


__all__ = ["ModelTeacher", "Prompt", "Teacher", "TracesSummary", "encode_messages",
           "group_records", "load_prompts", "load_teacher", "manifest", "run_traces",
           "summarize"]
