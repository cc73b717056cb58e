"""Plackett-Luce distillation (PLD; Bassam, Zhu and Bian, 2025): a list-wise ranking loss.

The teacher's logits are read as Plackett-Luce "worth" scores. PLD trains the student on one
"teacher-optimal" ranking of the vocabulary, pi = (the true next token y, then the other tokens
in descending teacher probability), each rank weighted by the teacher's confidence in the token
placed there::

    PLD = sum_k alpha_k * [ log sum_{j >= k} exp(z_{pi_j}) - z_{pi_k} ],   alpha_k = p_T(pi_k)

with z the student's logits (at temperature T, times T^2 like every divergence here). The
first rank is cross-entropy on y weighted by p_T(y); the loss is convex in z and invariant to
adding a constant to the logits.

From a teacher cache (top-k ids and log-probs, by descending probability or in any order) the
ranking is truncated: pi = (y, the top-k ids other than y, by descending teacher probability),
and only those ranks are summed. The denominators stay exact: at rank k they cover every token
not yet placed, the k tokens still to be ranked *and* all tokens outside the list, computed in
log space as ``logaddexp(logsumexp of the unlisted tokens, reverse cumulative logsumexp of the
listed ones)`` with one masked ``logsumexp`` over the vocabulary per token. The label's weight
is p_T(y) when y is among the cached ids; otherwise the cache does not hold it, and the
weight is its upper bound ``min(smallest cached probability, tail mass)``. With k = V (or a
live teacher and ``top_k=None``) the loss is the full-ranking PLD exactly.

All functions return masked *sums* per the conventions of :mod:`distill_jax.losses.kd` (fp32,
``0`` at masked positions, teacher under ``stop_gradient``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses import kd

Array = jax.Array
PLD = "pld"


def _rev_cumlogsumexp(x_xK: Array) -> Array:
    """out[..., k] = logsumexp(x[..., k:]) (exact for -inf entries)."""
    return jnp.flip(jax.lax.cumlogsumexp(jnp.flip(x_xK, -1), axis=x_xK.ndim - 1), -1)


def pld_per_token(student_logits_xV: Array, labels_x: Array, topk_ids_xK: Array,
                  topk_logprobs_xK: Array, tail_logmass_x: Array | None = None, *,
                  temperature: float = 1.0) -> Array:
    """PLD per token from the teacher's top-k (ids, log-probs at ``temperature``), fp32.

    ``tail_logmass_x`` (log of the teacher's mass outside the top-k) bounds the label's weight
    when the label is not cached; None means the top-k covers the vocabulary.
    """
    z = student_logits_xV.astype(jnp.float32) / temperature
    logt = jax.lax.stop_gradient(topk_logprobs_xK).astype(jnp.float32)
    ids = topk_ids_xK.astype(jnp.int32)
    labels = labels_x.astype(jnp.int32)
    # the cached ranking by descending teacher probability
    order = jnp.argsort(-logt, axis=-1, stable=True)
    ids = jnp.take_along_axis(ids, order, -1)
    logt = jnp.take_along_axis(logt, order, -1)
    is_label = ids == labels[..., None]
    label_cached = jnp.any(is_label, -1)
    label_logt_cached = jnp.max(jnp.where(is_label, logt, -jnp.inf), -1)
    bound = logt[..., -1]
    if tail_logmass_x is not None:
        bound = jnp.minimum(bound, jax.lax.stop_gradient(tail_logmass_x).astype(jnp.float32))
    label_logt = jnp.where(label_cached, label_logt_cached, bound)
    # the list pi = (y, top-k with y removed): K + 1 slots, the slot where y recurs is empty
    list_ids = jnp.concatenate([labels[..., None], ids], -1)
    live = jnp.concatenate([jnp.ones_like(is_label[..., :1]), ~is_label], -1)
    weights = jnp.exp(jnp.concatenate([label_logt[..., None], logt], -1))
    z_list = jnp.take_along_axis(z, list_ids, -1)
    z_list_live = jnp.where(live, z_list, -jnp.inf)
    # tokens outside the list: a masked logsumexp over the vocabulary
    listed = _scatter_mask(jnp.zeros(z.shape, bool), list_ids)
    lse_out = jax.nn.logsumexp(jnp.where(listed, -jnp.inf, z), axis=-1)
    lse_out = jnp.where(jnp.all(listed, -1), -jnp.inf, lse_out)
    denom = jnp.logaddexp(lse_out[..., None], _rev_cumlogsumexp(z_list_live))
    per_rank = jnp.where(live, weights * (denom - z_list), 0.0)
    return jnp.sum(per_rank, -1) * temperature ** 2


def _scatter_mask(mask_xV: Array, ids_xK: Array) -> Array:
    """``mask`` with True at ``ids`` along the last axis."""
    flat = mask_xV.reshape(-1, mask_xV.shape[-1])
    idx = ids_xK.reshape(-1, ids_xK.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    return flat.at[rows, idx].set(True).reshape(mask_xV.shape)


def pld_sums(student_logits_xV: Array, labels_x: Array, topk_ids_xK: Array,
             topk_logprobs_xK: Array, tail_logmass_x: Array | None, w_x: Array, *,
             temperature: float = 1.0) -> Array:
    """PLD summed over unmasked tokens (weights ``w_x``); masked positions are inert."""
    live = w_x > 0
    K = topk_ids_xK.shape[-1]
    z = kd.masked_logits(student_logits_xV, w_x)
    ids = jnp.where(live[..., None], topk_ids_xK, jnp.arange(K))
    logt = jnp.where(live[..., None], topk_logprobs_xK, -jnp.log(float(K)))
    tail = None if tail_logmass_x is None else jnp.where(live, tail_logmass_x, -jnp.inf)
    labels = jnp.where(live, labels_x, 0)
    per = pld_per_token(z, labels, ids, logt, tail, temperature=temperature)
    return jnp.sum(jnp.where(live, w_x * per, 0.0))


def pld_sums_from_logits(student_logits_xV: Array, labels_x: Array, teacher_logits_xV: Array,
                         w_x: Array, *, temperature: float = 1.0,
                         top_k: int | None = None) -> Array:
    """PLD summed over unmasked tokens with a live teacher's logits: the full ranking
    (``top_k=None``) or its first ``top_k`` tokens."""
    logt = jax.nn.log_softmax(
        kd.masked_logits(jax.lax.stop_gradient(teacher_logits_xV), w_x) / temperature, -1)
    k = logt.shape[-1] if top_k is None else top_k
    top_logt, top_ids = jax.lax.top_k(logt, k)
    tail = None
    if k < logt.shape[-1]:  # the teacher's log-mass outside its top k
        outside = ~_scatter_mask(jnp.zeros(logt.shape, bool), top_ids)
        tail = jax.nn.logsumexp(jnp.where(outside, logt, -jnp.inf), axis=-1)
    return pld_sums(student_logits_xV, labels_x, top_ids, top_logt, tail, w_x,
                    temperature=temperature)


def pld_loss(student_logits: Array, labels: Array, teacher_logits: Array, mask: Array, *,
             temperature: float = 1.0, top_k: int | None = None) -> tuple[Array, kd.Metrics]:
    """Masked mean of PLD with a live teacher's logits: the full ranking (``top_k=None``) or
    its first ``top_k`` tokens."""
    w_x = kd.token_weights(mask, student_logits.shape[:-1])
    total = pld_sums_from_logits(student_logits, labels, teacher_logits, w_x,
                                 temperature=temperature, top_k=top_k)
    return kd.single_term(PLD, total, kd.token_count(w_x))


def sparse_pld(student_logits: Array, labels: Array, topk_ids: Array, topk_logprobs: Array,
               tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0
               ) -> tuple[Array, kd.Metrics]:
    """Masked mean of PLD from a teacher cache (see the module docstring)."""
    w_x = kd.token_weights(mask, student_logits.shape[:-1])
    total = pld_sums(student_logits, labels, topk_ids, topk_logprobs, tail_logmass, w_x,
                     temperature=temperature)
    return kd.single_term(PLD, total, kd.token_count(w_x))
