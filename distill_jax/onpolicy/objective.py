"""The sampled-token objective of on-policy distillation, and per-token log-probs of rows.

Setting. The student ``S`` (params theta) samples a completion ``y ~ S`` for a prompt ``x``;
``h_t = (x, y_<t)`` are its own prefixes. The teacher ``T`` scores only the sampled tokens, so
the objective needs one teacher number per token, ``log T(y_t | h_t)`` (no teacher
distribution over the vocabulary). Per token, the *advantage* is

    A_t = log T(y_t | h_t) - log S(y_t | h_t)        (a constant: under stop_gradient)

and the policy-gradient surrogate is ``-A_t * log S(y_t | h_t)``.

What its gradient is unbiased for (``discount = 0``, the per-token recipe of the Qwen3 report
and of Thinking Machines' "on-policy distillation"). For any prefix ``h``::

    grad_phi KL(S_phi(.|h) || T(.|h)) = sum_v S(v|h) grad log S(v|h) (log S(v|h) - log T(v|h))
                                         + sum_v grad S(v|h)           (= grad of 1 = 0)
                                       = E_{v ~ S(.|h)} [ -A(v) grad log S(v|h) ].

So with ``y`` drawn from the current student, ``E_y [ sum_t -A_t grad log S(y_t|h_t) ]`` equals

    grad_phi  E_{y ~ S_theta} [ sum_t KL( S_phi(.|h_t) || T(.|h_t) ) ]   at phi = theta,

the per-token reverse KL summed over the student's own prefixes, *with the prefix distribution
held fixed* (no gradient through which prefixes get sampled): exactly the gradient of the
full-vocabulary ``reverse_kl`` term evaluated on the student's rollout rows (GKD's on-policy
objective with beta = 1), estimated from one sample per position. It is *not* the gradient of
the sequence-level KL(S(y|x) || T(y|x)), which also moves the prefix distribution.

``discount = gamma > 0`` replaces ``A_t`` by the discounted reward-to-go
``G_t = sum_{t' >= t} gamma^(t'-t) A_t'`` (within the row's completion). With ``gamma = 1``,
by the score-function identity (``grad KL(S(y)||T(y)) = E[grad log S(y) (log S(y) - log T(y))]``,
``log S(y) = sum_t log S(y_t|h_t)``, and causality dropping the past terms), the gradient is
unbiased for the sequence-level ``grad KL(S(y|x) || T(y|x))``; per row the sums are over its
completion tokens, so this holds per sequence (a fixed token normaliser; with a normaliser that
depends on the sampled lengths it is a ratio estimate).

Sampling at another temperature or with top-p: pass the sampling-time log-probs
``sample_logprobs`` (``log q(y_t|h_t)``) and each term is weighted by the importance ratio
``rho_t = S(y_t|h_t) / q(y_t|h_t)`` (under stop_gradient; per-token objective only), which
makes the per-token gradient unbiased again for prefixes drawn from ``q``, where ``q`` covers
the support of ``S`` (top-p truncation does not: the estimate then misses the cut tokens).

Value. Each token contributes ``rho_t (log S - log T)`` to the value (the "k1" Monte-Carlo
estimate of that token's reverse KL, >= 0 on average) and ``-rho_t G_t (log S - sg(log S))``
(value 0) for the gradient, so the logged loss is the estimated reverse KL per token while the
gradient is the surrogate's.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from distill_jax.losses import chunked
from distill_jax.models import Model, ModelConfig, hidden_states, lm_head

Array = jax.Array

SAMPLED_REVERSE_KL = "sampled_reverse_kl"  # the objective's name (a loss term later)
TOKENS = "onpolicy/tokens"                  # number (sum of weights) of scored tokens


def _reward_to_go(a_BT: Array, w_BT: Array, discount: float) -> Array:
    """``G_t = sum_{t' >= t, w > 0} discount^(t' - t) a_t'`` along the last axis."""
    def step(carry, x):
        a, w = x
        g = jnp.where(w > 0, a, 0.0) + discount * carry
        return g, g
    xs = (jnp.moveaxis(a_BT, -1, 0), jnp.moveaxis(w_BT, -1, 0))
    _, g = jax.lax.scan(step, jnp.zeros(a_BT.shape[:-1], a_BT.dtype), xs, reverse=True)
    return jnp.moveaxis(g, 0, -1)


def sampled_token_per_token(student_logprobs: Array, teacher_logprobs: Array, mask: Array, *,
                            sample_logprobs: Array | None = None,
                            discount: float = 0.0) -> Array:
    """Per-token values of the sampled-token objective (see the module docstring).

    Args:
      student_logprobs: (..., T) fp32 ``log S(y_t | h_t)`` of the sampled tokens, differentiable
        (the training-time forward of the student).
      teacher_logprobs: (..., T) ``log T(y_t | h_t)`` of the same tokens (stop_gradient applied).
      mask: (..., T) token weights (bool or float; > 0 means scored): the completion tokens.
      sample_logprobs: optional (..., T) sampling-time ``log q(y_t | h_t)``; given, each token is
        importance-weighted by ``S / q``.
      discount: 0 for the per-token advantage; > 0 for the discounted reward-to-go along the last
        axis (one sample per row), 1 being the sequence-level reverse KL's gradient.

    Returns:
      (..., T) fp32, zero where masked; its sum's gradient is the surrogate's.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if discount and sample_logprobs is not None:
        raise ValueError("importance weighting (sample_logprobs) applies to the per-token "
                         "objective only; use discount=0, or sample at temperature 1 without "
                         "top-p/top-k and pass no sample_logprobs")
    w = jnp.asarray(mask, jnp.float32)
    logs = jnp.where(w > 0, student_logprobs.astype(jnp.float32), 0.0)
    logt = jnp.where(w > 0, jax.lax.stop_gradient(teacher_logprobs).astype(jnp.float32), 0.0)
    adv = jax.lax.stop_gradient(logt - logs)
    if sample_logprobs is None:
        rho = jnp.ones_like(logs)
    else:
        logq = jnp.where(w > 0, jax.lax.stop_gradient(sample_logprobs).astype(jnp.float32), 0.0)
        rho = jax.lax.stop_gradient(jnp.exp(logs - logq))
    g = adv if discount == 0.0 else _reward_to_go(adv, w, discount)
    surrogate = -jax.lax.stop_gradient(rho * g) * (logs - jax.lax.stop_gradient(logs))
    value = jax.lax.stop_gradient(-rho * adv)
    return jnp.where(w > 0, w * (value + surrogate), 0.0)


def sampled_token_sums(student_logprobs: Array, teacher_logprobs: Array, mask: Array, *,
                       sample_logprobs: Array | None = None,
                       discount: float = 0.0) -> dict[str, Array]:
    """``{SAMPLED_REVERSE_KL: sum of the per-token values, TOKENS: sum of the weights}``, the
    engine's sums-and-counts form (divide by the whole batch's ``TOKENS``); the arguments are
    those of :func:`sampled_token_per_token`."""
    per = sampled_token_per_token(student_logprobs, teacher_logprobs, mask,
                                  sample_logprobs=sample_logprobs, discount=discount)
    w = jnp.asarray(mask, jnp.float32)
    return {SAMPLED_REVERSE_KL: jnp.sum(per), TOKENS: jnp.sum(jnp.where(w > 0, w, 0.0))}


def sampled_token_loss(student_logprobs: Array, teacher_logprobs: Array, mask: Array, *,
                       sample_logprobs: Array | None = None, discount: float = 0.0
                       ) -> tuple[Array, dict[str, Array]]:
    """``(loss, metrics)``: :func:`sampled_token_sums` divided by the token count (0 when no
    token is scored). The loss's value is the estimated per-token reverse KL; its gradient the
    policy-gradient surrogate's."""
    sums = sampled_token_sums(student_logprobs, teacher_logprobs, mask,
                              sample_logprobs=sample_logprobs, discount=discount)
    loss = sums[SAMPLED_REVERSE_KL] / jnp.maximum(sums[TOKENS], 1.0)
    return loss, {"distill/" + SAMPLED_REVERSE_KL: loss,
                  "distill/" + SAMPLED_REVERSE_KL + "_sum": sums[SAMPLED_REVERSE_KL],
                  TOKENS: sums[TOKENS]}


def sampled_token_chunk_sums(student_logits: Array, teacher: Mapping[str, Array],
                             labels: Array, w: Array, spec: Any = None) -> Array:
    """The objective's masked sum over one chunk of the engine's fused lm_head + loss scan, in
    the ``chunk_sums(student_logits, teacher, labels, w, spec)`` form of shared-vocabulary
    terms: the student's and the teacher's log-probs of ``labels`` (the sampled tokens) at
    temperature 1, from the teacher's live ``teacher["logits"]`` or from a per-token
    ``teacher["token_logprob"]``. Per-token advantage only (``discount`` 0, no importance
    ratio: the chunk holds flattened tokens of many rows)."""
    labels = jnp.where(w > 0, labels, 0)
    logs = jnp.take_along_axis(jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1),
                               labels[..., None], axis=-1)[..., 0]
    if "logits" in teacher and teacher["logits"] is not None:
        logt = jnp.take_along_axis(
            jax.nn.log_softmax(jax.lax.stop_gradient(teacher["logits"]).astype(jnp.float32),
                               axis=-1), labels[..., None], axis=-1)[..., 0]
    else:
        logt = teacher["token_logprob"]
    return jnp.sum(sampled_token_per_token(logs, logt, w))


def hidden_logprobs(h_ND: Array, head: Array, targets_N: Array, *, softcap: float | None = None,
                    chunk_size: int = 512) -> Array:
    """(N,) fp32 ``log p(targets)`` from final hidden states ``h_ND`` and the lm_head ``head``
    (D, V), in token chunks so (N, V) logits never exist whole."""
    n = h_ND.shape[0]
    xs = {"h": h_ND, "y": jnp.asarray(targets_N, jnp.int32)}

    def step(carry, c):
        z = chunked.logits_from_hidden(c["h"], head, softcap)
        logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
        y = jnp.clip(c["y"], 0, z.shape[-1] - 1)
        return carry, jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]

    _, ys = chunked.chunked_scan(step, None, xs, chunk_size)
    return chunked.unchunk(ys, n)


def token_logprobs(cfg: ModelConfig, params: Any, batch: Mapping[str, Array], *,
                   chunk_size: int = 512) -> Array:
    """(B, L) fp32 ``log p(targets)`` of a model over a packed batch (``tokens``, ``positions``,
    ``segment_ids``, ``targets``; 0 where ``loss_mask`` is 0), through the lm_head in token
    chunks so (B, L, V) logits never exist. Differentiable with respect to ``params``."""
    model = Model(cfg, params)
    h = hidden_states(model, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
    b, length = batch["tokens"].shape
    out = hidden_logprobs(h.reshape(b * length, -1), lm_head(model),
                          jnp.asarray(batch["targets"]).reshape(b * length),
                          softcap=cfg.final_logit_softcap, chunk_size=chunk_size)
    return jnp.where(jnp.asarray(batch["loss_mask"]) > 0, out.reshape(b, length), 0.0)
