"""The student's own samples as training rows: rollout, packing, lmbda mixing, metrics.

Everything here is pure JAX with shapes fixed by the prompt bucket ``P`` and ``max_new_tokens``
``N``, so it runs inside a jitted train step (one compilation per bucket).

Rollout. :func:`rollout` runs the KV-cache generator's core (``models.generate.decode``:
prefill, then a ``lax.while_loop`` of one-token decode steps that stops once every row has
emitted an EOS id) on left-padded prompts, under ``stop_gradient`` (no gradient flows through
sampling). It returns the completion tokens, each token's log-probability under the
distribution it was drawn from, the completion lengths (EOS included) and whether each row
ended with EOS.

Rows. :func:`pack_rows` lays out one sample per row of ``L = P + N`` slots, as the data
pipeline lays out documents (``distill_jax.data.packing``)::

    slot         0 .. p-1          p .. p+c-1          p+c .. L-1
    tokens       prompt            completion          0
    targets      tokens[i+1] (0 at the last real token and after)
    positions    0 .. p+c-1 (0 on padding)
    segment_ids  1 on real tokens, 0 on padding
    loss_mask    1 at slots p-1 .. p+c-2 (the slots that predict the completion, EOS included;
                 nothing after it), times the completion's own flags (dataset rows: the
                 pipeline's training mask)

Mixing (``lmbda``, GKD's name and meaning): the fraction of rows filled with the student's
samples instead of the dataset's reference completion. ``mix="batch"`` (default) draws one
uniform ``u`` in [0, 1) per call and samples the whole batch when ``u < lmbda``, as GKD's
Algorithm 1 and TRL's ``GKDTrainer`` (``if random.random() <= self.lmbda`` in its
``training_step``) do, so a dataset batch skips generation entirely (``lax.cond``). TRL draws
once per micro-batch (``training_step`` call) from Python's RNG; here the draw comes from the
step's key and covers the whole global batch, so every host and micro-batch agree and a run is
reproducible from its seed. ``mix="row"`` draws one Bernoulli(lmbda) per row. ``lmbda = 0``
gives exactly the dataset rows, ``lmbda = 1`` only samples. Rows without a reference
(prompt-only records) always take the student's sample.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from distill_jax.models import Model, ModelConfig
from distill_jax.models.generate import decode, sampling_args
from distill_jax.onpolicy import objective

Array = jax.Array

# The training-row arrays (the engine's batch contract) and the extra per-row rollout arrays.
ROW_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
SAMPLE_LOGPROBS = "sample_logprobs"      # (B, L) sampling-time log q of each target (0 elsewhere)
SAMPLED = "sampled"                      # (B,) bool: the row holds the student's sample
COMPLETION_LENGTHS = "completion_lengths"  # (B,) int32 tokens after the prompt (EOS included)
FINISHED = "finished"                    # (B,) bool: the completion ends with an EOS id
TEACHER_LOGPROBS = "teacher_token_logprob"  # (B, L) log T of each target (0 where unmasked)
ONPOLICY_KEYS = (SAMPLE_LOGPROBS, SAMPLED, COMPLETION_LENGTHS, FINISHED)

# Metric names.
ROWS = "onpolicy/sampled_rows"
GENERATED = "onpolicy/generated_tokens"
MEAN_LENGTH = "onpolicy/mean_completion_length"
EOS_SHARE = "onpolicy/eos_share"
TEACHER_LOGPROB = "onpolicy/teacher_logprob"
LOGPROB_GAP = "onpolicy/logprob_gap"
LOGPROB_GAP_ABS = "onpolicy/logprob_gap_abs"
# Additive counts (rollout_sums), from which the means above are made.
FINISHED_ROWS = "onpolicy/finished_rows"
SCORED_TOKENS = "onpolicy/scored_tokens"
TEACHER_LOGPROB_SUM = "onpolicy/teacher_logprob_sum"
# Held-out on-policy evaluation's metrics: this prefix + the last part of the name
# (``eval/onpolicy/teacher_logprob``, ``eval/onpolicy/loss``, ...).
EVAL_PREFIX = "eval/onpolicy/"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "logprobs", "lengths", "finished"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Rollout:
    """The student's completions of a batch of prompts.

    ``tokens`` (B, N) int32: generated ids, ``pad_id`` after EOS; ``logprobs`` (B, N) fp32:
    each token's log-probability under its sampling distribution (temperature and filters
    applied; 0 after EOS); ``lengths`` (B,) int32: generated tokens per row, EOS included;
    ``finished`` (B,) bool: whether the row emitted an EOS id.
    """

    tokens: Array
    logprobs: Array
    lengths: Array
    finished: Array


def _eos_mask(vocab: int, eos_ids: Sequence[int]) -> Array:
    ids = sorted({int(e) for e in eos_ids if 0 <= int(e) < vocab})
    mask = jnp.zeros((vocab,), bool)
    return mask.at[jnp.asarray(ids, jnp.int32)].set(True) if ids else mask


def rollout(student_cfg: ModelConfig, student_params: Any, prompts_BP: Array,
            prompt_lengths_B: Array, key: Array, *, max_new_tokens: int,
            temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
            eos_ids: Sequence[int] = (), pad_id: int = 0, cache_dtype: Any = None) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt (pure, jittable).

    ``prompts_BP``: prompts right-aligned in ``P`` slots (``onpolicy.prompt_batch``);
    ``prompt_lengths_B``: real tokens per row (>= 1). ``temperature`` (0: greedy), ``top_p``,
    ``top_k`` as in ``models.generate``; ``eos_ids`` end a row (the EOS is kept). The sampling
    settings and ``eos_ids`` are Python values (static), the rest traced. No gradient flows to
    ``student_params``.
    """
    if max_new_tokens < 1 or int(max_new_tokens) != max_new_tokens:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    vocab = student_cfg.vocab_size
    mode, t, k, p = sampling_args(temperature, top_k, top_p, vocab)
    model = Model(student_cfg, jax.lax.stop_gradient(student_params))
    tokens, logprobs, lengths, finished, _ = decode(
        model, jnp.asarray(prompts_BP, jnp.int32), jnp.asarray(prompt_lengths_B, jnp.int32),
        key, t, k, p, _eos_mask(vocab, eos_ids), jnp.int32(pad_id),
        max_new_tokens=int(max_new_tokens), mode=mode,
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name)
    return Rollout(tokens, jax.lax.stop_gradient(logprobs), lengths, finished)


def pack_rows(prompts_BP: Array, prompt_lengths_B: Array, completions_BN: Array,
              completion_lengths_B: Array, completion_mask_BN: Array | None = None,
              completion_logprobs_BN: Array | None = None) -> dict[str, Array]:
    """One (prompt, completion) per row of ``P + N`` slots (layout in the module docstring).

    ``completion_mask_BN`` (default: 1 on each row's first ``completion_lengths_B`` tokens)
    weights the loss on predicting each completion token; ``completion_logprobs_BN``, if given,
    is moved to the slots that predict those tokens and returned as ``SAMPLE_LOGPROBS``.
    Returns ``ROW_KEYS`` (int32; ``loss_mask`` float32), plus ``SAMPLE_LOGPROBS``.
    """
    prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
    completions_BN = jnp.asarray(completions_BN, jnp.int32)
    b, p = prompts_BP.shape
    n = completions_BN.shape[1]
    length = p + n
    plen_B1 = jnp.asarray(prompt_lengths_B, jnp.int32)[:, None]
    clen_B1 = jnp.asarray(completion_lengths_B, jnp.int32)[:, None]
    slot_L = jnp.arange(length, dtype=jnp.int32)[None, :]
    comp_idx_N = jnp.arange(n, dtype=jnp.int32)[None, :]
    if completion_mask_BN is None:
        completion_mask_BN = (comp_idx_N < clen_B1).astype(jnp.float32)
    cmask_BN = jnp.where(comp_idx_N < clen_B1, jnp.asarray(completion_mask_BN, jnp.float32), 0.0)

    # Left-padded [prompt | completion] shifted left by each row's padding.
    full_BL = jnp.concatenate([prompts_BP, completions_BN], axis=1)
    src_BL = jnp.clip(slot_L + (p - plen_B1), 0, length - 1)
    real_BL = slot_L < plen_B1 + clen_B1
    tokens = jnp.where(real_BL, jnp.take_along_axis(full_BL, src_BL, axis=1), 0)
    nxt_real = jnp.concatenate([real_BL[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    targets = jnp.where(nxt_real, jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)],
                                                  axis=1), 0)
    # Slot i predicts completion token j = i - p + 1 (for p - 1 <= i <= p + c - 2).
    j_BL = slot_L - plen_B1 + 1
    in_comp = (j_BL >= 0) & (j_BL < clen_B1)
    j_safe = jnp.clip(j_BL, 0, n - 1)
    loss_mask = jnp.where(in_comp, jnp.take_along_axis(cmask_BN, j_safe, axis=1), 0.0)
    out = {"tokens": tokens, "targets": targets,
           "positions": jnp.where(real_BL, slot_L, 0).astype(jnp.int32),
           "segment_ids": real_BL.astype(jnp.int32), "loss_mask": loss_mask}
    if completion_logprobs_BN is not None:
        lp = jnp.take_along_axis(jnp.asarray(completion_logprobs_BN, jnp.float32), j_safe, axis=1)
        out[SAMPLE_LOGPROBS] = jnp.where(in_comp, lp, 0.0)
    else:
        out[SAMPLE_LOGPROBS] = jnp.zeros((b, length), jnp.float32)
    return out


def onpolicy_batch(student_cfg: ModelConfig, student_params: Any, prompts: Mapping[str, Array],
                   key: Array, *, lmbda: float, max_new_tokens: int, temperature: float = 1.0,
                   top_p: float | None = None, top_k: int | None = None,
                   eos_ids: Sequence[int] = (), mix: str = "batch",
                   teacher_cfg: ModelConfig | None = None, teacher_params: Any = None,
                   chunk_size: int = 512) -> dict[str, Array]:
    """``(student params, prompt batch, key) -> training batch``: the prepare step of the
    on-policy teacher signal (pure, jittable; one compilation per prompt bucket).

    ``prompts`` holds ``prompts.PROMPT_KEYS`` (``onpolicy.prompt_batch``; its reference width
    must equal ``max_new_tokens``). ``lmbda`` in [0, 1] and ``mix`` ("batch" or "row") choose
    which rows take the student's sample (module docstring); the rollout settings are those of
    :func:`rollout`. With ``teacher_cfg``/``teacher_params`` the frozen teacher scores the rows
    and ``TEACHER_LOGPROBS`` is added (what the sampled-token objective needs).

    Returns the training rows (``ROW_KEYS``, (B, P + N)) plus ``ONPOLICY_KEYS``.
    """
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy rows), got {lmbda}")
    if mix not in ("batch", "row"):
        raise ValueError(f"mix must be 'batch' (one draw per batch, as TRL) or 'row', got {mix!r}")
    ref_BN = jnp.asarray(prompts["reference_tokens"], jnp.int32)
    if ref_BN.shape[1] != max_new_tokens:
        raise ValueError(f"the prompt batch's references have {ref_BN.shape[1]} slots but "
                         f"max_new_tokens is {max_new_tokens}; build it with "
                         f"prompt_batch(..., max_new_tokens={max_new_tokens})")
    prompts_BP = jnp.asarray(prompts["prompt_tokens"], jnp.int32)
    plen_B = jnp.asarray(prompts["prompt_lengths"], jnp.int32)
    ref_len_B = jnp.asarray(prompts["reference_lengths"], jnp.int32)
    ref_mask_BN = jnp.asarray(prompts["reference_mask"], jnp.float32)
    b, n = ref_BN.shape
    eos_V = _eos_mask(student_cfg.vocab_size, eos_ids)
    k_mix, k_sample = jax.random.split(key)
    draws = jax.random.uniform(k_mix, () if mix == "batch" else (b,))
    no_ref_B = ~jnp.any((ref_mask_BN > 0) & (jnp.arange(n)[None, :] < ref_len_B[:, None]), axis=1)
    sampled_B = jnp.broadcast_to(draws < lmbda, (b,)) | no_ref_B
    ref_last = jnp.take_along_axis(ref_BN, jnp.maximum(ref_len_B - 1, 0)[:, None], axis=1)[:, 0]
    ref_finished_B = (ref_len_B > 0) & eos_V[jnp.clip(ref_last, 0, eos_V.shape[0] - 1)]
    dataset = (ref_BN, jnp.zeros((b, n), jnp.float32), ref_len_B, ref_finished_B)

    def with_samples(_):
        r = rollout(student_cfg, student_params, prompts_BP, plen_B, k_sample,
                    max_new_tokens=n, temperature=temperature, top_p=top_p, top_k=top_k,
                    eos_ids=eos_ids)
        s = sampled_B
        return (jnp.where(s[:, None], r.tokens, ref_BN), jnp.where(s[:, None], r.logprobs, 0.0),
                jnp.where(s, r.lengths, ref_len_B), jnp.where(s, r.finished, ref_finished_B))

    if lmbda == 1.0:
        comp, lp, clen, fin = with_samples(None)
    else:  # a batch without sampled rows skips generation
        comp, lp, clen, fin = jax.lax.cond(jnp.any(sampled_B), with_samples,
                                           lambda _: dataset, None)
    cmask = jnp.where(sampled_B[:, None], (jnp.arange(n)[None, :] < clen[:, None]).astype(
        jnp.float32), ref_mask_BN)
    batch = pack_rows(prompts_BP, plen_B, comp, clen, cmask, lp)
    batch.update({SAMPLED: sampled_B, COMPLETION_LENGTHS: clen, FINISHED: fin})
    if teacher_cfg is not None:
        batch[TEACHER_LOGPROBS] = jax.lax.stop_gradient(objective.token_logprobs(
            teacher_cfg, jax.lax.stop_gradient(teacher_params), batch, chunk_size=chunk_size))
    return batch


def _scored(batch: Mapping[str, Array]) -> tuple[Array, Array]:
    """(B,) which rows are samples, and (B, L) the sampled tokens the loss scores."""
    sampled = jnp.asarray(batch[SAMPLED], bool)
    return sampled, (jnp.asarray(batch["loss_mask"]) > 0) & sampled[:, None]


def rollout_sums(batch: Mapping[str, Array], teacher_logprobs: Array | None = None
                 ) -> dict[str, Array]:
    """Additive counts of the sampled rows of an :func:`onpolicy_batch` batch (they add up over
    batches; :func:`rollout_means` finishes): ``ROWS`` sampled rows, ``GENERATED`` tokens they
    hold, ``FINISHED_ROWS`` of them that ended with EOS, ``SCORED_TOKENS`` sampled tokens the
    loss scores and, with ``teacher_logprobs`` (B, L) (default: the batch's
    ``TEACHER_LOGPROBS`` if present), ``TEACHER_LOGPROB_SUM`` their teacher log-probs."""
    sampled, w = _scored(batch)
    out = {ROWS: jnp.sum(sampled).astype(jnp.float32),
           GENERATED: jnp.sum(jnp.where(sampled, batch[COMPLETION_LENGTHS], 0)).astype(
               jnp.float32),
           FINISHED_ROWS: jnp.sum(sampled & batch[FINISHED]).astype(jnp.float32),
           SCORED_TOKENS: jnp.sum(w).astype(jnp.float32)}
    if teacher_logprobs is None:
        teacher_logprobs = batch.get(TEACHER_LOGPROBS)
    if teacher_logprobs is not None:
        out[TEACHER_LOGPROB_SUM] = jnp.sum(jnp.where(w, teacher_logprobs, 0.0))
    return out


def rollout_means(sums: Mapping[str, Array]) -> dict[str, Array]:
    """``ROWS``, ``GENERATED``, ``MEAN_LENGTH`` per sampled row, ``EOS_SHARE`` of them that
    ended with EOS and (where :func:`rollout_sums` had teacher log-probs) ``TEACHER_LOGPROB``,
    the teacher's mean log-prob per scored sampled token, from (summed) :func:`rollout_sums`."""
    rows = jnp.maximum(sums[ROWS], 1.0)
    out = {ROWS: sums[ROWS], GENERATED: sums[GENERATED], MEAN_LENGTH: sums[GENERATED] / rows,
           EOS_SHARE: sums[FINISHED_ROWS] / rows}
    if TEACHER_LOGPROB_SUM in sums:
        out[TEACHER_LOGPROB] = sums[TEACHER_LOGPROB_SUM] / jnp.maximum(sums[SCORED_TOKENS], 1.0)
    return out


def rollout_metrics(batch: Mapping[str, Array], student_logprobs: Array | None = None,
                    teacher_logprobs: Array | None = None) -> dict[str, Array]:
    """Metrics of the sampled rows of an :func:`onpolicy_batch` batch.

    ``ROWS`` sampled rows, ``GENERATED`` tokens they hold, ``MEAN_LENGTH`` per sampled row and
    ``EOS_SHARE`` of them that ended with EOS; with ``teacher_logprobs`` (B, L) (default: the
    batch's ``TEACHER_LOGPROBS`` if present) ``TEACHER_LOGPROB``, the teacher's mean log-prob
    of the sampled tokens (:func:`rollout_means` of :func:`rollout_sums`); with the
    training-time ``student_logprobs`` (B, L), ``LOGPROB_GAP`` (mean sampling-time minus
    training-time log-prob of the sampled tokens, ~0 at temperature 1 without filters or
    dropout) and ``LOGPROB_GAP_ABS`` (its mean absolute value).
    """
    sums = rollout_sums(batch, teacher_logprobs)
    out = rollout_means(sums)
    if student_logprobs is not None:
        _, w = _scored(batch)
        count = jnp.maximum(sums[SCORED_TOKENS], 1.0)
        gap = jnp.where(w, batch[SAMPLE_LOGPROBS] - student_logprobs, 0.0)
        out[LOGPROB_GAP] = jnp.sum(gap) / count
        out[LOGPROB_GAP_ABS] = jnp.sum(jnp.abs(gap)) / count
    return out
