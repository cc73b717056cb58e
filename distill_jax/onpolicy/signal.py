"""On-policy distillation as a teacher signal and a loss term of the one step factory.

* :func:`onpolicy_signal`: the signal "the student's own samples". Its batches are prompt
  batches (``PROMPT_KEYS``, from :mod:`distill_jax.onpolicy.stream`); its ``prepare`` runs
  :func:`~distill_jax.onpolicy.rows.onpolicy_batch` with the step's key (the student samples
  completions, ``lmbda`` of the rows, and they are laid out as training rows), then the live
  teacher's final hidden states over those rows exactly as the live same-tokenizer teacher does.
  Any shared-vocabulary term then trains on them (``reverse_kl`` is GKD's on-policy reverse KL;
  ``sampled_reverse_kl`` the one-sample estimate). Its ``metrics`` are the rollout's
  (:func:`~distill_jax.onpolicy.rows.rollout_metrics`), ``onpolicy/teacher_logprob`` included:
  the teacher's mean log-prob of the sampled tokens, read from its hidden states over the rows
  through its lm_head at the ``B x max_new_tokens`` completion slots only (skipped on a step
  that sampled no row).
* :func:`eval_signal`: the same signal in its evaluation form (every row sampled, a given
  temperature, the rollout reported as additive counts, ``rows.rollout_sums``, so evaluation
  batches add up), for the step factory without an optimizer.
* ``sampled_reverse_kl`` (:data:`~distill_jax.onpolicy.objective.SAMPLED_REVERSE_KL`): the
  sampled-token objective, registered in the term registry when this module is imported
  (``distill_jax.config`` imports it, so configs know the name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from distill_jax.losses import terms
from distill_jax.models import Model, lm_head
from distill_jax.onpolicy.objective import (SAMPLED_REVERSE_KL, hidden_logprobs,
                                            sampled_token_chunk_sums)
from distill_jax.onpolicy.prompts import DEFAULT_BUCKETS, PROMPT_KEYS
from distill_jax.onpolicy.rows import (SAMPLED, TEACHER_LOGPROBS, onpolicy_batch, rollout_metrics,
                                       rollout_sums)

__all__ = ["OnPolicySettings", "SAMPLED_TERM", "default_eos_ids", "eval_signal",
           "onpolicy_signal"]

# the chat templates' end-of-turn tokens a sample may stop at besides EOS
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>")

SAMPLED_TERM = terms.REGISTRY.get(SAMPLED_REVERSE_KL) or terms.register_term(terms.Term(
    SAMPLED_REVERSE_KL, {terms.TEACHER_LOGITS}, terms.SHARED,
    "the sampled-token reverse KL: log S - log T of each sampled token, as a policy gradient",
    chunk_sums=sampled_token_chunk_sums))


@dataclasses.dataclass(frozen=True)
class OnPolicySettings:
    """The rollout and mixing settings of :func:`~distill_jax.onpolicy.rows.onpolicy_batch`
    (``eos_ids`` resolved: :func:`default_eos_ids`)."""

    lmbda: float = 0.5
    mix: str = "batch"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    eos_ids: tuple[int, ...] = ()
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS


def default_eos_ids(tokenizer) -> tuple[int, ...]:
    """The ids a sample stops at: the tokenizer's EOS and its chat template's end-of-turn
    tokens (those of :data:`TURN_END_TOKENS` in its vocabulary)."""
    vocab = tokenizer.get_vocab()
    ids = {int(vocab[t]) for t in TURN_END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has no EOS or end-of-turn token; set onpolicy.eos_ids")
    return tuple(sorted(ids))


# the prompt batch's arrays that are per row only (not (rows, length))
BATCH_RANKS = (("prompt_lengths", 1), ("reference_lengths", 1))


def completion_teacher_logprobs(ctx, teacher_params, rows, prompt_lengths_B, max_new_tokens: int):
    """(B, L) the teacher's log-prob of each sampled completion token, at the slot that predicts
    it (0 elsewhere and on dataset rows), from ``rows["teacher_hidden"]``: the teacher's lm_head
    runs over the ``B x max_new_tokens`` completion slots only, and not at all when no row holds
    a sample."""
    h_BLD = rows["teacher_hidden"]
    b, length, d = h_BLD.shape
    n = int(max_new_tokens)
    plen_B1 = jnp.asarray(prompt_lengths_B, jnp.int32)[:, None]
    slot_BN = jnp.clip(plen_B1 - 1 + jnp.arange(n, dtype=jnp.int32)[None, :], 0, length - 1)
    sampled_B = jnp.asarray(rows[SAMPLED], bool)
    teacher = Model(ctx.teacher_cfg, jax.lax.stop_gradient(teacher_params))
    head = jax.lax.stop_gradient(lm_head(teacher))

    def score(_):
        h_ND = jnp.take_along_axis(h_BLD, slot_BN[..., None], axis=1).reshape(b * n, d)
        y_N = jnp.take_along_axis(rows["targets"], slot_BN, axis=1).reshape(b * n)
        return hidden_logprobs(h_ND, head, y_N, softcap=ctx.teacher_cfg.final_logit_softcap,
                               chunk_size=ctx.chunk_size).reshape(b, n)

    lp_BN = jax.lax.cond(jnp.any(sampled_B), score, lambda _: jnp.zeros((b, n), jnp.float32),
                         None)
    j_BL = jnp.arange(length, dtype=jnp.int32)[None, :] - plen_B1 + 1
    keep = (j_BL >= 0) & (j_BL < n) & (rows["loss_mask"] > 0) & sampled_B[:, None]
    lp_BL = jnp.take_along_axis(lp_BN, jnp.clip(j_BL, 0, n - 1), axis=1)
    return jax.lax.stop_gradient(jnp.where(keep, lp_BL, 0.0))


def onpolicy_signal(settings: OnPolicySettings) -> terms.Signal:
    """The signal "the student's own samples" with ``settings`` (see the module docstring)."""
    s = settings

    def prepare(ctx, student_params, teacher_params, batch, rng):
        """The student's samples as training rows, then the live teacher's hidden states."""
        rows = onpolicy_batch(
            ctx.student_cfg, student_params, batch, rng, lmbda=s.lmbda,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, eos_ids=s.eos_ids, mix=s.mix)
        out = dict(terms.LIVE_SAME.prepare(ctx, student_params, teacher_params, rows, rng))
        if "teacher_hidden" in out:
            out[TEACHER_LOGPROBS] = completion_teacher_logprobs(
                ctx, teacher_params, out, batch["prompt_lengths"], s.max_new_tokens)
        return out

    return terms.Signal("the student's own samples",
                        frozenset({terms.TOKEN_DIST, terms.TEACHER_LOGITS, terms.TEACHER_HIDDEN}),
                        PROMPT_KEYS, False, terms.SHARED, prepare, rollout_metrics, BATCH_RANKS)


def eval_signal(settings: OnPolicySettings, temperature: float | None = None) -> terms.Signal:
    """:func:`onpolicy_signal` for held-out evaluation: every row is the student's sample
    (``lmbda`` 1), drawn at ``temperature`` (None: ``settings.temperature``; 0: greedy), and its
    ``metrics`` are :func:`~distill_jax.onpolicy.rows.rollout_sums` (additive over batches;
    ``rollout_means`` finishes). The step's evaluation form adds them to its sums."""
    t = settings.temperature if temperature is None else float(temperature)
    signal = onpolicy_signal(dataclasses.replace(settings, lmbda=1.0, temperature=t))
    return dataclasses.replace(signal, name="the student's own samples (evaluation)",
                               metrics=rollout_sums)


def settings_from(lmbda: float, mix: str, max_new_tokens: int, temperature: float,
                  top_p: float | None, top_k: int | None, eos_ids: Sequence[int] | None,
                  prompt_buckets: Sequence[int], tokenizer: Any) -> OnPolicySettings:
    """:class:`OnPolicySettings` from a config's values, ``eos_ids`` None meaning
    :func:`default_eos_ids` of ``tokenizer``."""
    eos = default_eos_ids(tokenizer) if eos_ids is None else tuple(int(e) for e in eos_ids)
    return OnPolicySettings(lmbda=float(lmbda), mix=mix, max_new_tokens=int(max_new_tokens),
                            temperature=float(temperature), top_p=top_p, top_k=top_k,
                            eos_ids=eos, prompt_buckets=tuple(int(b) for b in prompt_buckets))
