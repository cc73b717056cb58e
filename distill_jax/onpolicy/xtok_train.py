"""On-policy distillation across tokenizers as a configured run: two-phase batches, one step.

A run with an ``onpolicy:`` section and cross-tokenizer terms (``alm``, ``sft``, ...) trains
each step in two phases, the engine's step unchanged:

1. *Rollout* (device, jitted, sharded like the step's batch): :func:`make_sampler`'s function
   completes this process's prompt batch (:mod:`distill_jax.onpolicy.stream`) with the
   student's current params, its key folded from the state's RNG as the step's signal key is
   (so a resumed run samples what the uninterrupted one did); the rows come back to the host.
2. *Conversion* (host, numpy): :func:`~distill_jax.onpolicy.xtok.xtok_rows` decodes each row to
   bytes, tokenizes the text with the teacher's tokenizer, aligns and packs it into the data
   pipeline's cross-tokenizer batch at ``data.seq_len`` / ``data.teacher_seq_len`` (fixed
   shapes, so the step compiles once whatever the prompt bucket).

Then the step with the live teacher over aligned text (:func:`xtok_onpolicy_signal`:
``terms.LIVE_ALIGNED``'s preparation and its metrics) trains on it.

Mixing (``lmbda``, GKD's meaning): the share of rows that are the student's samples; the other
rows are the off-policy pipeline's own packed cross-tokenizer rows of the same data (a second,
independent stream over the records). ``mix="batch"`` draws once per step (the whole batch is
sampled with probability ``lmbda``: GKD's Algorithm 1, TRL's ``GKDTrainer``), ``mix="row"``
once per row of the global batch. The draws are made on the host from ``(seed, step)``, so
every process agrees on them (the global batch does not depend on the process count), no
device value is waited for, and a resumed run draws what the uninterrupted one did. A stream is
read only on a step where some row of the global batch uses it, and then by every process (so
each process's streams advance as one process's would, and every process joins the rollout,
one computation over all their devices): ``lmbda = 0`` reads only the pipeline, exactly as the
off-policy run does (same batches, same step, same updates), ``lmbda = 1`` only prompts. Both
streams' positions are checkpointed (:class:`XtokBatches` state).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.losses import terms
from distill_jax.onpolicy.prompts import PROMPT_KEYS
from distill_jax.onpolicy.rows import TEACHER_LOGPROB, pack_rows, rollout
from distill_jax.onpolicy.xtok import (COMPLETION_BYTES, CUT_TOKENS, EOS_SHARE, FINISHED,
                                       MEAN_BYTES, TEACHER_LOGPROB_PER_BYTE, TIME_RETOKENIZE,
                                       TIME_ROLLOUT, xtok_rows)

__all__ = ["SAMPLED", "XtokBatches", "make_sampler", "xtok_onpolicy_signal"]

SAMPLED = "onpolicy/sampled"  # (B,) bool: the row holds the student's sample
# The per-row arrays an on-policy cross-tokenizer batch adds (zeros on dataset rows).
ROW_KEYS = (SAMPLED, CUT_TOKENS, COMPLETION_BYTES, FINISHED)
BATCH_RANKS = tuple((k, 1) for k in ROW_KEYS)
# Metric names (besides those of onpolicy.xtok).
ROWS = "onpolicy/sampled_rows"
CUT = CUT_TOKENS  # metric: completion tokens dropped (cut characters or past a row's end)
MIX_SALT = 0x6B1D  # the mixing draws' seed salt


def _metrics(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The sampled rows' metrics (zeros on a step that sampled none)."""
    sampled = jnp.asarray(batch[SAMPLED], bool)
    rows = jnp.sum(sampled).astype(jnp.float32)
    w = (jnp.asarray(batch["teacher_loss_mask"]) > 0) & sampled[:, None]
    lp = jnp.sum(jnp.where(w, jnp.asarray(batch["teacher_actual_logprob"], jnp.float32), 0.0))
    nbytes = jnp.sum(jnp.where(sampled, batch[COMPLETION_BYTES], 0)).astype(jnp.float32)
    return {ROWS: rows,
            TEACHER_LOGPROB: lp / jnp.maximum(jnp.sum(w).astype(jnp.float32), 1.0),
            TEACHER_LOGPROB_PER_BYTE: lp / jnp.maximum(nbytes, 1.0),
            CUT: jnp.sum(jnp.where(sampled, batch[CUT_TOKENS], 0)).astype(jnp.float32),
            EOS_SHARE: jnp.sum(sampled & jnp.asarray(batch[FINISHED], bool)) / jnp.maximum(
                rows, 1.0),
            MEAN_BYTES: nbytes / jnp.maximum(rows, 1.0)}


def xtok_onpolicy_signal() -> terms.Signal:
    """The signal of an on-policy cross-tokenizer run: the live teacher over aligned text
    (``terms.LIVE_ALIGNED``'s capabilities and preparation) on batches that also carry
    ``teacher_loss_mask`` and :data:`ROW_KEYS`, reporting the sampled rows': ``onpolicy/
    sampled_rows``, ``onpolicy/teacher_logprob`` (the teacher's mean log-prob per teacher token
    of the completions, its end of turn included), ``onpolicy/teacher_logprob_per_byte``,
    ``onpolicy/cut_tokens`` (summed over the batch), ``onpolicy/eos_share`` and
    ``onpolicy/mean_completion_bytes``."""
    live = terms.LIVE_ALIGNED
    return terms.Signal("the student's own samples across tokenizers", live.provides,
                        live.batch_keys + ("teacher_loss_mask",) + ROW_KEYS, False,
                        terms.ALIGNED, live.prepare, _metrics, BATCH_RANKS)


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded over its rows (all of it on one host)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    starts = {}
    for s in x.addressable_shards:
        starts.setdefault(s.index[0].start or 0, s)
    return np.concatenate([np.asarray(starts[k].data) for k in sorted(starts)])


def make_sampler(student_cfg, settings, sharding_of: Callable[[int], Any],
                 salt: int) -> Callable:
    """``sample(params, rng, local_prompts) -> local rows``: phase 1. The student's params (the
    state's model params) complete the prompt batch (``PROMPT_KEYS``; this process's rows) in
    one jitted rollout over the global batch, its key ``fold_in(state rng, salt)`` (the
    step's signal salt, ``train.step.SIGNAL_SALT``); ``sharding_of(ndim)`` is the batch's
    sharding of an array of that rank (over its rows). Returns this process's rows as numpy
    (``tokens``, ``segment_ids``, ``completion_lengths``: what
    :func:`~distill_jax.onpolicy.xtok.xtok_rows` reads). One compilation per prompt bucket."""
    s = settings

    def sample(params, rng, prompts):
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), salt)
        r = rollout(student_cfg, params, prompts["prompt_tokens"], prompts["prompt_lengths"],
                    key, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                    top_p=s.top_p, top_k=s.top_k, eos_ids=s.eos_ids)
        rows = pack_rows(prompts["prompt_tokens"], prompts["prompt_lengths"], r.tokens,
                         r.lengths)
        return {"tokens": rows["tokens"], "segment_ids": rows["segment_ids"],
                "completion_lengths": r.lengths}

    out_sh = {"tokens": sharding_of(2), "segment_ids": sharding_of(2),
              "completion_lengths": sharding_of(1)}
    jitted = jax.jit(sample, out_shardings=out_sh)
    ranks = {"prompt_lengths": 1, "reference_lengths": 1}

    def run(params, rng, local_prompts):
        prompts = {k: jax.make_array_from_process_local_data(
            sharding_of(ranks.get(k, 2)), np.asarray(local_prompts[k])) for k in PROMPT_KEYS}
        return {k: _local_rows(v) for k, v in jitted(params, rng, prompts).items()}

    return run


class XtokBatches(grain.DatasetIterator):
    """This process's training batches of an on-policy cross-tokenizer run (module docstring).

    ``prompts``: the prompt stream (None when ``lmbda`` is 0); ``data``: the off-policy
    pipeline's cross-tokenizer batches (None when ``lmbda`` is 1); ``sample``: phase 1
    (:func:`make_sampler`); the tokenizers, ``config`` (the data config: row lengths, record
    kind) and ``stop_ids`` (the rollout's stop ids besides the student's EOS) are phase 2's;
    ``rows`` is this process's share of the global batch (process ``process_index`` of
    ``process_count``).
    :meth:`next_batch` makes step ``step``'s batch; ``get_state``/``set_state`` hold both
    streams' positions."""

    def __init__(self, prompts, data, *, lmbda: float, mix: str, seed: int, rows: int,
                 sample: Callable, student_tokenizer, teacher_tokenizer, config: DataConfig,
                 stop_ids=(), process_index: int = 0, process_count: int = 1):
        super().__init__()
        if mix not in ("batch", "row"):
            raise ValueError(f"onpolicy.mix must be 'batch' or 'row', got {mix!r}")
        self.prompts, self.data = prompts, data
        self.lmbda, self.mix, self.seed, self.rows = float(lmbda), mix, int(seed), int(rows)
        self.sample, self.config, self.stop_ids = sample, config, tuple(stop_ids)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.process_index, self.process_count = process_index, process_count
        self.seconds = {TIME_ROLLOUT: 0.0, TIME_RETOKENIZE: 0.0}

    def global_draws(self, step: int) -> np.ndarray:
        """(rows x process_count,) bool: which rows of the global batch take the student's
        sample at ``step`` (the same in every process)."""
        n = self.rows * self.process_count
        if self.mix == "batch":
            u = np.random.default_rng([self.seed, MIX_SALT, step]).random()
            return np.full(n, u < self.lmbda)
        # one draw per row of the global batch, so the batch does not depend on the process count
        return np.random.default_rng([self.seed, MIX_SALT, step]).random(n) < self.lmbda

    def draws(self, step: int) -> np.ndarray:
        """(rows,) bool: which of this process's rows take the student's sample at ``step``
        (its shards' rows are rows ``process_index * rows ...`` of the global batch)."""
        lo = self.process_index * self.rows
        return self.global_draws(step)[lo:lo + self.rows]

    def next_batch(self, step: int, params: Any, rng: Any) -> dict[str, np.ndarray]:
        """Step ``step``'s batch (this process's rows): samples of the student with ``params``
        (the state's model params, its RNG ``rng``) where :meth:`draws` says, else the
        pipeline's rows; ``ROW_KEYS`` added. Whether to sample and whether to read the pipeline
        is decided on the global batch's draws: the rollout is one computation over every
        process's devices, so every process runs it when any row of the global batch is
        sampled (even with none of its own), and both streams advance in every process as
        they do in one process reading all the shards."""
        every = self.global_draws(step)
        sampled = self.draws(step)
        out = None
        if every.any():
            t0 = time.perf_counter()
            rows = self.sample(params, rng, next(self.prompts))
            t1 = time.perf_counter()
            out = xtok_rows(rows, self.student_tokenizer, self.teacher_tokenizer, self.config,
                            stop_ids=self.stop_ids)
            self.seconds[TIME_ROLLOUT] += t1 - t0
            self.seconds[TIME_RETOKENIZE] += time.perf_counter() - t1
        if not every.all():
            data = dict(next(self.data))
            for k in ROW_KEYS:
                data[k] = np.zeros(self.rows, bool if k in (SAMPLED, FINISHED) else np.int32)
            out = data if out is None else {
                k: np.where(sampled.reshape((-1,) + (1,) * (np.ndim(out[k]) - 1)), out[k],
                            data[k]) for k in data if k in out}
        out[SAMPLED] = sampled
        return out

    def __next__(self):
        raise TypeError("an on-policy cross-tokenizer batch depends on the student: call "
                        "next_batch(step, params, rng)")

    def get_state(self) -> dict[str, Any]:
        """Both streams' positions (JSON-able; None for a stream the run does not read)."""
        return {"prompts": None if self.prompts is None else self.prompts.get_state(),
                "data": None if self.data is None else self.data.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume both streams at ``state`` (from :meth:`get_state` of the same run)."""
        if not isinstance(state, dict) or set(state) != {"prompts", "data"}:
            raise ValueError("the checkpoint's data state is not an on-policy cross-tokenizer "
                             "run's (was it written by another kind of run?); resume it with "
                             "its own config")
        for name, it in (("prompts", self.prompts), ("data", self.data)):
            if (it is None) != (state[name] is None):
                raise ValueError(f"the checkpoint was written with another onpolicy.lmbda (its "
                                 f"{name} stream is {'absent' if state[name] is None else 'used'}"
                                 "); resume with the run's own lmbda")
            if it is not None:
                it.set_state(state[name])

    @property
    def stats(self) -> dict[str, float]:
        """Both streams' counters added up, and the seconds spent in each phase so far in this
        process (``time/rollout``, ``time/retokenize``)."""
        out: dict[str, float] = dict(self.seconds)
        for it in (self.prompts, self.data):
            if it is not None:
                for k, v in it.stats.items():
                    out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for it in (self.prompts, self.data):
            if it is not None:
                it.close()
