"""On-policy distillation (GKD; the per-token reverse KL of the Qwen3 report; ALM across tokenizers).

* :mod:`~distill_jax.onpolicy.prompts`: records -> prompts and reference completions, bucketed
  to a few fixed prompt lengths (host side, numpy).
* :mod:`~distill_jax.onpolicy.rows`: the jittable rollout, packing of samples into training
  rows, ``lmbda`` mixing with the dataset's completions (:func:`onpolicy_batch`, the prepare
  step of an on-policy teacher signal) and rollout metrics.
* :mod:`~distill_jax.onpolicy.objective`: the sampled-token reverse-KL objective (one teacher
  log-prob per token) and per-token log-probs of packed rows.
* :mod:`~distill_jax.onpolicy.stream`: the run's data as a resumable, sharded stream of prompt
  batches.
* :mod:`~distill_jax.onpolicy.signal`: the teacher signal "the student's own samples" for the
  one step factory (and its evaluation form, :func:`eval_signal`, for held-out prompts), and
  the ``sampled_reverse_kl`` loss term (registered on import).
* :mod:`~distill_jax.onpolicy.xtok`: across tokenizers, the student's samples as the data
  pipeline's cross-tokenizer batch of the same text (host side), for the ALM step.
* :mod:`~distill_jax.onpolicy.xtok_train`: across tokenizers as a configured run: the jitted
  rollout, the host conversion and ``lmbda`` mixing with the pipeline's rows
  (:class:`XtokBatches`), and the signal of the step (:func:`xtok_onpolicy_signal`).
"""

from distill_jax.onpolicy.objective import (
    SAMPLED_REVERSE_KL, sampled_token_chunk_sums, sampled_token_loss, sampled_token_per_token,
    sampled_token_sums, token_logprobs,
)
from distill_jax.onpolicy.prompts import (
    DEFAULT_BUCKETS, PROMPT_KEYS, Prompt, prompt_batch, prompt_from_record, prompt_length_bucket,
)
from distill_jax.onpolicy.rows import (
    EVAL_PREFIX, ONPOLICY_KEYS, ROW_KEYS, Rollout, onpolicy_batch, pack_rows, rollout, rollout_means,
    rollout_metrics, rollout_sums,
)
from distill_jax.onpolicy.signal import (
    OnPolicySettings, SAMPLED_TERM, default_eos_ids, eval_signal, onpolicy_signal, settings_from,
)
from distill_jax.onpolicy.stream import PromptIterator, combine_prompt_batches, make_prompt_iterator
from distill_jax.onpolicy.xtok import (
    teacher_prompt, teacher_turn_end, xtok_onpolicy_batch, xtok_rollout_metrics, xtok_rows,
)
from distill_jax.onpolicy.xtok_train import XtokBatches, make_sampler, xtok_onpolicy_signal

__all__ = [
    "DEFAULT_BUCKETS", "EVAL_PREFIX", "ONPOLICY_KEYS", "OnPolicySettings", "PROMPT_KEYS", "Prompt",
    "PromptIterator", "ROW_KEYS", "Rollout", "SAMPLED_REVERSE_KL", "SAMPLED_TERM",
    "combine_prompt_batches", "default_eos_ids", "eval_signal", "make_prompt_iterator", "onpolicy_batch",
    "onpolicy_signal", "settings_from", "pack_rows", "prompt_batch", "prompt_from_record",
    "prompt_length_bucket", "rollout", "rollout_means", "rollout_metrics", "rollout_sums", "sampled_token_chunk_sums",
    "sampled_token_loss", "sampled_token_per_token", "sampled_token_sums", "teacher_prompt",
    "teacher_turn_end", "token_logprobs", "XtokBatches", "make_sampler",
    "xtok_onpolicy_batch", "xtok_onpolicy_signal", "xtok_rollout_metrics", "xtok_rows",
]
