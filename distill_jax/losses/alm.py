"""ALM: cross-tokenizer distillation by matching the likelihoods of aligned text chunks.

Teacher and student tokenize the same text differently. The alignment (``distill_jax.xtok``)
splits it into *chunks*: the smallest spans whose bytes both tokenizations cover exactly. ALM asks
the student to give every chunk (or group of chunks) the likelihood the teacher gives it. The
teacher side needs only two numbers per teacher token (its log-prob of the actual next token and
its boundary log-mass), so this loss trains from a live teacher or from a cache alike.

How a packed batch represents the alignment
-------------------------------------------
Student rows are ``(B, L)``, teacher rows ``(B, Lt)``; position ``i`` predicts ``targets[i]``.
``chunk_ids`` ``(B, L)`` and ``teacher_chunk_ids`` ``(B, Lt)`` hold the row-local index of the
chunk that each position's *target* belongs to, ``-1`` for none. Ids increase along a row; the
same id on both sides is the same bytes. If ids ``c`` and ``c + 1`` are both present in a row,
chunk ``c + 1`` directly follows chunk ``c`` in the text; an absent id (a gap) marks a skipped
span or a document / segment change. Ids must be ``< num_chunks`` (default: the longer row length
of the chunk-id arrays given); an id outside ``[0, num_chunks)`` is treated like ``-1``.

A chunk takes part only if it has at least one position on *both* sides; an id present on one
side only (which a consistent alignment never produces) is treated as absent on both.

The math (``DESIGN.md``, "ALM, precisely")
------------------------------------------
1. ``token_stats``: per token, ``logp = log p(target)`` and the boundary log-mass
   ``log sum_{v: word_start[v]} p(v)`` (the probability that the next token starts a new word or
   is special), from hidden states and the lm_head in token chunks, never with full logits.
2. ``chunk_scores``: per chunk ``c`` and side, ``l(c) = sum of logp`` over the chunk's positions,
   and ``b(c)`` = the boundary log-mass at position ``last + 1`` (``last`` = the chunk's last
   position; the distribution that follows the chunk's last token) when that position exists and
   has the same ``segment_ids`` value as ``last``, else ``b(c) = 0`` (log 1: the document or the
   packed piece ends there, so a boundary follows for certain).
3. ``alm_groups`` (teacher only): with ``merge_threshold`` ``theta``, consecutive chunks merge
   into groups; a group ends at chunk ``c`` when ``exp(b_T(c)) > theta`` or when ``c + 1`` is
   absent. With ``merge_threshold=None`` every chunk is its own group. The number of groups
   (``count``) depends on the teacher and the alignment only, so a training step can compute it
   over the whole global batch before any student forward pass and divide every micro-batch's
   sum by it: the mean is then exact under gradient accumulation and across hosts.
4. Group score ``s = sum of the members' l`` (``+ b`` of the last member with ``append_space``),
   for the teacher (under ``stop_gradient``) and the student separately, with the teacher's
   groups on both sides.
5. Distance between ``log a = s_T / tau`` and ``log b = s_S / tau`` (``a = p_T**(1/tau)``):

   - ``binary_ce``:          ``-[a log b + (1 - a) log(1 - b)]`` (minimal at ``b = a``)
   - ``abs``:                ``|a - b|``
   - ``reverse_binary_kl``:  ``b (log b - log a) + (1 - b) (log(1 - b) - log(1 - a))``

   ``log(1 - e^x)`` is computed stably (``log(-expm1(x))`` for ``x > -ln 2``, else
   ``log1p(-exp(x))``, each branch fed only inputs where it is finite). Both ``s_T / tau`` and
   ``s_S / tau`` are clamped to at most ``-EPS`` (``EPS = 1e-7``) first: a score of 0 (a chunk the
   model is certain of, or a rounding-positive log-prob) would make ``log(1 - b)`` ``-inf`` and
   its gradient infinite. The clamp changes ``a`` or ``b`` by at most ``1e-7`` and its gradient
   is 0 where it is active, so the loss and its gradients stay finite everywhere.
6. ``alm_sums`` returns the sum of the distance over the groups and their number (``count``,
   equal to ``alm_groups``' count); ``alm_loss`` is ``sum / max(count, 1)``, or the sum divided
   by a given global normaliser.

Everything is fp32, shapes are static, and the per-chunk and per-group reductions are per-row
segment sums (vmapped over rows, so a batch sharded over rows stays sharded). The score inputs
(log-probs, boundary log-masses) must be finite.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses import chunked, kd, sparse

Array = jax.Array
Metrics = kd.Metrics

ALM = "alm"
BINARY_CE = "binary_ce"
ABS = "abs"
REVERSE_BINARY_KL = "reverse_binary_kl"
ALM_DISTANCES = (BINARY_CE, ABS, REVERSE_BINARY_KL)

ALM_LOSS = kd.metric_key(ALM)            # distill/alm: sum / count
ALM_SUM = kd.sum_key(ALM)                # distill/alm_sum
ALM_CHUNKS = kd.PREFIX + "alm_chunks"    # distill/alm_chunks: number of (merged) chunk groups

EPS = 1e-7  # scaled scores s / tau are clamped to <= -EPS (see the module docstring)
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Per-token statistics from hidden states
# ---------------------------------------------------------------------------------------------


def token_stats(h_ND: Array, head_DV: Array, targets_N: Array, word_start_V: Array, *,
                softcap: float | None = None, chunk_size: int = 512) -> tuple[Array, Array]:
    """Per-token ``log p(target)`` and boundary log-mass, without materialising full logits.

    The tokens (all leading dims, e.g. ``(B, L)``, flattened) are split into chunks of
    ``chunk_size``; one ``jax.lax.scan`` step under ``jax.checkpoint`` computes a chunk's fp32
    logits (``chunked.logits_from_hidden``: ``h @ head`` with fp32 accumulation, then the optional
    softcap) and reduces them to two numbers per token, so memory holds a few
    ``(chunk_size, V)`` arrays at a time, forward and backward. Differentiable with respect to
    ``h_ND`` and ``head_DV``.

    Args:
      h_ND: ``(..., D)`` final hidden states (after the final norm).
      head_DV: ``(D, V)`` output projection.
      targets_N: ``(...)`` integer next-token ids; ids outside ``[0, V)`` are clipped (give such
        positions chunk id -1: their values are meaningless).
      word_start_V: ``(V,)`` bool, True for tokens that start a new word or are special
        (``distill_jax.tokens.word_start_mask``).
      softcap: final-logit softcap (``ModelConfig.final_logit_softcap``), or None.
      chunk_size: tokens per scan step; the token count need not be divisible by it.

    Returns:
      ``(logp, boundary)``, both fp32 with ``h_ND``'s leading shape: ``log p(target)`` and
      ``log sum_{v: word_start[v]} p(v)`` (``-inf``, with zero gradients, if no token is a word
      start).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    lead = h_ND.shape[:-1]
    if head_DV.ndim != 2 or head_DV.shape[0] != h_ND.shape[-1]:
        raise ValueError(f"head {head_DV.shape} does not match hidden size {h_ND.shape[-1]}; "
                         "pass the (D, V) output projection")
    vocab = head_DV.shape[1]
    if tuple(targets_N.shape) != lead:
        raise ValueError(f"targets have shape {targets_N.shape}, expected the hidden states' "
                         f"leading shape {lead}")
    word_start_V = jnp.asarray(word_start_V)
    if word_start_V.shape != (vocab,):
        raise ValueError(f"word_start has shape {word_start_V.shape}, expected ({vocab},): one "
                         "flag per vocabulary entry of the head (pad it for a padded vocabulary)")
    word_start_V = word_start_V.astype(bool)
    n = math.prod(lead)
    targets = jnp.clip(jnp.asarray(targets_N).astype(jnp.int32), 0, vocab - 1)
    xs = {"h": h_ND.reshape(n, -1), "t": targets.reshape(n)}

    def body(carry, c):
        z_CV = chunked.logits_from_hidden(c["h"], head_DV, softcap)
        lse_C = jax.nn.logsumexp(z_CV, axis=-1)
        z_target_C = jnp.take_along_axis(z_CV, c["t"][:, None], axis=-1)[:, 0]
        z_bound_C = sparse.safe_logsumexp(jnp.where(word_start_V, z_CV, -jnp.inf))
        return carry, (z_target_C - lse_C, z_bound_C - lse_C)

    _, ys = chunked.chunked_scan(body, (), xs, chunk_size)
    logp, boundary = chunked.unchunk(ys, n)
    return logp.reshape(lead), boundary.reshape(lead)


# ---------------------------------------------------------------------------------------------
# Chunk scores and groups
# ---------------------------------------------------------------------------------------------


class ChunkScores(NamedTuple):
    """Per-chunk quantities of one side, indexed ``[row, chunk id]`` (``C = num_chunks``)."""

    loglik_BC: Array    # l(c): sum of log p over the chunk's positions (0 where absent)
    boundary_BC: Array  # b(c): boundary log-mass after the chunk's last token, or 0
    present_BC: Array   # bool: the chunk has at least one position on this side
    last_BC: Array      # int32: the chunk's last position (-1 where absent)


def _segment_ids(ids_BL: Array, num_chunks: int) -> Array:
    """Chunk ids with anything outside ``[0, num_chunks)`` sent to the spare slot ``num_chunks``."""
    ids_BL = jnp.asarray(ids_BL).astype(jnp.int32)
    return jnp.where((ids_BL >= 0) & (ids_BL < num_chunks), ids_BL, num_chunks)


def _row_segment_sum(values_BL: Array, seg_BL: Array, num_chunks: int) -> Array:
    """Per-row segment sums over ``num_chunks`` slots (ids == num_chunks are dropped)."""
    fn = lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_chunks + 1)[:num_chunks]
    return jax.vmap(fn)(values_BL, seg_BL)


def _row_segment_max(values_BL: Array, seg_BL: Array, num_chunks: int) -> Array:
    fn = lambda v, s: jax.ops.segment_max(v, s, num_segments=num_chunks + 1)[:num_chunks]
    return jax.vmap(fn)(values_BL, seg_BL)


def _check_rows(name: str, shape: tuple[int, ...], **arrays) -> None:
    for key, x in arrays.items():
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{key} has shape {jnp.shape(x)} but {name} has {shape}; pass one "
                             "entry per position of the same (batch, length) rows")


def _check_ids_in_range(num_chunks: int, **arrays) -> None:
    """Loud failure for concrete (numpy) chunk ids that would be dropped; skipped under jit."""
    for key, x in arrays.items():
        if isinstance(x, np.ndarray) and x.size and int(x.max()) >= num_chunks:
            raise ValueError(f"{key} holds chunk id {int(x.max())} >= num_chunks={num_chunks}; "
                             "pass num_chunks larger than every chunk id")


def chunk_scores(logp_BL: Array, boundary_BL: Array, chunk_ids_BL: Array, segment_ids_BL: Array,
                 num_chunks: int) -> ChunkScores:
    """Per-chunk log-likelihood ``l(c)`` and boundary log-mass ``b(c)`` of one side.

    Args:
      logp_BL: ``(B, L)`` log p(target) per position (``token_stats``).
      boundary_BL: ``(B, L)`` boundary log-mass per position (``token_stats``).
      chunk_ids_BL: ``(B, L)`` int chunk id of each position's target, -1 for none.
      segment_ids_BL: ``(B, L)`` int document/segment id of each position.
      num_chunks: ``C``, one more than the largest chunk id (e.g. the row length).

    Returns:
      ``ChunkScores`` with ``(B, C)`` arrays: ``l(c)`` is the sum of ``logp`` over the chunk's
      positions; ``b(c)`` is ``boundary[last + 1]`` if position ``last + 1`` exists in the row
      and has the segment id of ``last``, else 0; both are 0 for absent chunks.
    """
    logp_BL = jnp.asarray(logp_BL, jnp.float32)
    boundary_BL = jnp.asarray(boundary_BL, jnp.float32)
    if logp_BL.ndim != 2:
        raise ValueError(f"logp must be (batch, length), got shape {logp_BL.shape}")
    _check_rows("logp", logp_BL.shape, boundary=boundary_BL, chunk_ids=chunk_ids_BL,
                segment_ids=segment_ids_BL)
    _check_ids_in_range(num_chunks, chunk_ids=chunk_ids_BL)
    length = logp_BL.shape[1]
    seg_BL = _segment_ids(chunk_ids_BL, num_chunks)
    in_chunk_BL = seg_BL < num_chunks
    loglik_BC = _row_segment_sum(jnp.where(in_chunk_BL, logp_BL, 0.0), seg_BL, num_chunks)
    pos_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), logp_BL.shape)
    count_BC = _row_segment_sum(in_chunk_BL.astype(jnp.int32), seg_BL, num_chunks)
    present_BC = count_BC > 0
    last_BC = jnp.where(present_BC, _row_segment_max(pos_BL, seg_BL, num_chunks), -1)
    nxt_BC = last_BC + 1
    segment_ids_BL = jnp.asarray(segment_ids_BL)
    same_BC = (jnp.take_along_axis(segment_ids_BL, jnp.clip(nxt_BC, 0, length - 1), axis=1)
               == jnp.take_along_axis(segment_ids_BL, jnp.clip(last_BC, 0, length - 1), axis=1))
    has_next_BC = present_BC & (nxt_BC < length) & same_BC
    b_next_BC = jnp.take_along_axis(boundary_BL, jnp.clip(nxt_BC, 0, length - 1), axis=1)
    boundary_BC = jnp.where(has_next_BC, b_next_BC, 0.0)
    return ChunkScores(loglik_BC, boundary_BC, present_BC, last_BC)


def _check_threshold(merge_threshold: float | None) -> None:
    if merge_threshold is not None and not 0.0 < merge_threshold < 1.0:
        raise ValueError(f"merge_threshold must be in (0, 1) (a boundary probability), or None "
                         f"for no merging; got {merge_threshold}")


def _groups(teacher_boundary_BC: Array, present_BC: Array,
            merge_threshold: float | None) -> dict[str, Array]:
    """Group structure from the teacher's per-chunk boundary log-mass and chunk presence."""
    next_present_BC = jnp.pad(present_BC[:, 1:], ((0, 0), (0, 1)), constant_values=False)
    if merge_threshold is None:
        end_BC = present_BC
    else:
        high_BC = jnp.exp(teacher_boundary_BC) > merge_threshold
        end_BC = present_BC & (high_BC | ~next_present_BC)
    ends_before_BC = jnp.cumsum(end_BC.astype(jnp.int32), axis=1) - end_BC.astype(jnp.int32)
    group_BC = jnp.where(present_BC, ends_before_BC, -1)
    n_groups_B = jnp.sum(end_BC.astype(jnp.int32), axis=1)
    return {"group_BC": group_BC, "end_BC": end_BC, "present_BC": present_BC,
            "n_groups_B": n_groups_B, "count": jnp.sum(n_groups_B).astype(jnp.float32)}


def _default_num_chunks(num_chunks: int | None, *arrays) -> int:
    if num_chunks is not None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
        return int(num_chunks)
    return max(int(jnp.shape(x)[1]) for x in arrays)


def alm_groups(teacher_boundary_BLt: Array, teacher_chunk_ids: Array, teacher_segment_ids: Array,
               *, student_chunk_ids: Array | None = None, merge_threshold: float | None = 0.1,
               num_chunks: int | None = None) -> dict[str, Array]:
    """The chunk groups ALM scores, and how many there are; needs no student outputs.

    With ``merge_threshold`` theta, consecutive chunks merge into groups that end at chunk ``c``
    when the teacher's boundary probability ``exp(b_T(c)) > theta`` or when ``c + 1`` is absent
    from the row; with ``None`` every chunk is its own group. A training step calls this on the
    whole global batch and divides every micro-batch's ``alm_sums(...)["sum"]`` by ``count``.

    Args:
      teacher_boundary_BLt: ``(B, Lt)`` teacher boundary log-mass per position.
      teacher_chunk_ids, teacher_segment_ids: ``(B, Lt)`` teacher chunk ids (-1: none) and
        segment ids.
      student_chunk_ids: ``(B, L)`` student chunk ids. When given, a chunk counts only if it has
        positions on both sides, exactly as in ``alm_sums``; when None, teacher presence alone
        decides (the same whenever every chunk id occurs on both sides of its row, which a
        consistent alignment guarantees).
      merge_threshold: theta in (0, 1), or None for no merging.
      num_chunks: one more than the largest chunk id; default the longer row length given.

    Returns:
      ``group_BC`` (int32 ``(B, C)``: each chunk's row-local group index, -1 where absent),
      ``end_BC`` (bool: the chunk ends its group), ``present_BC`` (bool), ``n_groups_B``
      (int32 per row) and ``count`` (fp32 scalar: the number of groups, all non-empty).
    """
    _check_threshold(merge_threshold)
    teacher_boundary_BLt = jax.lax.stop_gradient(jnp.asarray(teacher_boundary_BLt, jnp.float32))
    given = [teacher_chunk_ids] + ([student_chunk_ids] if student_chunk_ids is not None else [])
    num_chunks = _default_num_chunks(num_chunks, *given)
    zeros = jnp.zeros(teacher_boundary_BLt.shape, jnp.float32)
    teacher = chunk_scores(zeros, teacher_boundary_BLt, teacher_chunk_ids, teacher_segment_ids,
                           num_chunks)
    present_BC = teacher.present_BC
    if student_chunk_ids is not None:
        if jnp.shape(student_chunk_ids)[0] != teacher_boundary_BLt.shape[0]:
            raise ValueError(f"student_chunk_ids has {jnp.shape(student_chunk_ids)[0]} rows, the "
                             f"teacher {teacher_boundary_BLt.shape[0]}; pass the same batch rows")
        _check_ids_in_range(num_chunks, student_chunk_ids=student_chunk_ids)
        seg_BL = _segment_ids(student_chunk_ids, num_chunks)
        present_BC &= _row_segment_sum((seg_BL < num_chunks).astype(jnp.int32), seg_BL,
                                       num_chunks) > 0
    return _groups(teacher.boundary_BC, present_BC, merge_threshold)


# ---------------------------------------------------------------------------------------------
# Distances and the loss
# ---------------------------------------------------------------------------------------------


def log1mexp(x: Array) -> Array:
    """``log(1 - e^x)`` for ``x < 0``, stable at both ends, with finite gradients for ``x < 0``.

    ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` below; each branch only ever sees
    inputs where it is finite, so the unused branch cannot leak ``nan`` into gradients.
    """
    near = x > -_LN2
    x_near = jnp.where(near, x, -1.0)
    x_far = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def _distance(name: str, log_a: Array, log_b: Array) -> Array:
    """Elementwise distance between ``a = e^log_a`` (teacher) and ``b = e^log_b`` (student)."""
    if name == BINARY_CE:
        return -(jnp.exp(log_a) * log_b + (-jnp.expm1(log_a)) * log1mexp(log_b))
    if name == ABS:
        return jnp.abs(jnp.exp(log_a) - jnp.exp(log_b))
    if name == REVERSE_BINARY_KL:
        return (jnp.exp(log_b) * (log_b - log_a)
                + (-jnp.expm1(log_b)) * (log1mexp(log_b) - log1mexp(log_a)))
    raise ValueError(kd.unknown_message(name, ALM_DISTANCES, "ALM distance"))


def _group_sum(values_BC: Array, group_BC: Array, num_chunks: int) -> Array:
    seg_BC = jnp.where(group_BC >= 0, group_BC, num_chunks)
    return _row_segment_sum(jnp.where(group_BC >= 0, values_BC, 0.0), seg_BC, num_chunks)


def alm_sums(student_logp_BL: Array, student_boundary_BL: Array, student_chunk_ids: Array,
             student_segment_ids: Array, teacher_logp_BLt: Array, teacher_boundary_BLt: Array,
             teacher_chunk_ids: Array, teacher_segment_ids: Array, *, append_space: bool = True,
             merge_threshold: float | None = 0.1, distance: str = BINARY_CE, tau: float = 100.0,
             num_chunks: int | None = None) -> dict[str, Array]:
    """Sum of the ALM distance over the chunk groups of a batch, and the number of groups.

    Args:
      student_logp_BL, student_boundary_BL: ``(B, L)`` student ``token_stats``.
      student_chunk_ids, student_segment_ids: ``(B, L)`` student chunk ids (-1: none) and
        segment ids.
      teacher_logp_BLt, teacher_boundary_BLt: ``(B, Lt)`` teacher ``token_stats`` (live or from
        the cache); under ``stop_gradient``.
      teacher_chunk_ids, teacher_segment_ids: ``(B, Lt)`` likewise for the teacher.
      append_space: add the last member's boundary log-mass ``b`` to each group's score (the
        boundary debias).
      merge_threshold: theta in (0, 1) for merging chunks into groups, or None (no merging).
      distance: one of ``ALM_DISTANCES`` (see the module docstring).
      tau: the temperature of ``a = p_T**(1/tau)``, ``b = p_S**(1/tau)``; > 0.
      num_chunks: one more than the largest chunk id; default ``max(L, Lt)``.

    Returns:
      ``{"sum": fp32 scalar, "count": fp32 scalar}``; ``count`` equals
      ``alm_groups(..., student_chunk_ids=student_chunk_ids)["count"]``, and both add up exactly
      over any split of the batch rows.
    """
    _check_threshold(merge_threshold)
    if distance not in ALM_DISTANCES:
        raise ValueError(kd.unknown_message(distance, ALM_DISTANCES, "ALM distance"))
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if jnp.shape(student_logp_BL)[0] != jnp.shape(teacher_logp_BLt)[0]:
        raise ValueError(f"student has {jnp.shape(student_logp_BL)[0]} rows, the teacher "
                         f"{jnp.shape(teacher_logp_BLt)[0]}; pass the same batch rows")
    num_chunks = _default_num_chunks(num_chunks, student_chunk_ids, teacher_chunk_ids)
    teacher = chunk_scores(jax.lax.stop_gradient(jnp.asarray(teacher_logp_BLt, jnp.float32)),
                           jax.lax.stop_gradient(jnp.asarray(teacher_boundary_BLt, jnp.float32)),
                           teacher_chunk_ids, teacher_segment_ids, num_chunks)
    student = chunk_scores(student_logp_BL, student_boundary_BL, student_chunk_ids,
                           student_segment_ids, num_chunks)
    groups = _groups(teacher.boundary_BC, teacher.present_BC & student.present_BC,
                     merge_threshold)
    group_BC, end_BC = groups["group_BC"], groups["end_BC"]

    def group_scores(side: ChunkScores) -> Array:
        per_chunk_BC = side.loglik_BC
        if append_space:
            per_chunk_BC = per_chunk_BC + jnp.where(end_BC, side.boundary_BC, 0.0)
        return _group_sum(per_chunk_BC, group_BC, num_chunks)

    log_a_BG = jnp.minimum(group_scores(teacher) / tau, -EPS)
    log_b_BG = jnp.minimum(group_scores(student) / tau, -EPS)
    valid_BG = jnp.arange(num_chunks, dtype=jnp.int32)[None, :] < groups["n_groups_B"][:, None]
    d_BG = _distance(distance, log_a_BG, log_b_BG)
    return {"sum": jnp.sum(jnp.where(valid_BG, d_BG, 0.0)), "count": groups["count"]}


def alm_loss(student_logp_BL: Array, student_boundary_BL: Array, student_chunk_ids: Array,
             student_segment_ids: Array, teacher_logp_BLt: Array, teacher_boundary_BLt: Array,
             teacher_chunk_ids: Array, teacher_segment_ids: Array, *, append_space: bool = True,
             merge_threshold: float | None = 0.1, distance: str = BINARY_CE, tau: float = 100.0,
             num_chunks: int | None = None,
             normalizer: Array | None = None) -> tuple[Array, Metrics]:
    """``alm_sums`` turned into ``(loss, metrics)``: ``sum / max(count, 1)``.

    Args are those of ``alm_sums``, plus ``normalizer``: divide by this instead of the local
    ``max(count, 1)`` (pass the global batch's ``alm_groups`` count for exact gradient
    accumulation; a value of 0 is treated as 1).

    Metrics: ``distill/alm`` (the loss), ``distill/alm_sum`` and ``distill/alm_chunks`` (this
    batch's sum and number of groups, so ``sum(sums) / sum(chunks)`` over hosts or micro-batches
    is the exact mean).
    """
    out = alm_sums(student_logp_BL, student_boundary_BL, student_chunk_ids, student_segment_ids,
                   teacher_logp_BLt, teacher_boundary_BLt, teacher_chunk_ids, teacher_segment_ids,
                   append_space=append_space, merge_threshold=merge_threshold, distance=distance,
                   tau=tau, num_chunks=num_chunks)
    denom = out["count"] if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    loss = out["sum"] / jnp.maximum(denom, 1.0)
    return loss, {ALM_LOSS: loss, ALM_SUM: out["sum"], ALM_CHUNKS: out["count"]}
