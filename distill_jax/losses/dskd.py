"""Dual-Space Knowledge Distillation with cross-model attention (DSKD; Zhang et al., EMNLP 2024).

A cross-tokenizer baseline: the teacher and the student read the same bytes with different
tokenizers, so their positions and vocabularies do not correspond. DSKD aligns them with a learned
attention and distils in both models' output spaces, on one (micro-)batch of packed rows:

* Alignment. Student position ``i`` asks ``q_i = [e_S(x_i); e_S(y_i)] @ W_query`` (its input and
  target embeddings); teacher position ``j`` answers with the key
  ``k_j = rms_normalise([e_T(x_j); e_T(y_j)])``.
  ``a_ij = softmax_j(q_i . k_j / sqrt(2 D_T))`` over the teacher positions of the same document,
  and the transposed ``b_ji = softmax_i(...)`` over the student positions of the same document.
* Teacher -> student space. The values ``v_j = (rms_normalise(h^T_j) +
  rms_normalise(e_T(y_j))) W_t2s`` (the teacher's state plus its target's embedding), mixed by
  ``a``, read through the (frozen) student head give ``p^t2s_i``. ``ce_t2s`` is its
  cross-entropy on the student's targets (trains the query and ``t2s`` projectors);
  ``kd_student`` is ``KL(p^t2s_i || p^S_i)`` with ``p^t2s`` fixed (trains the student), counted
  only where ``p^t2s_i`` predicts the student's target (its argmax is the target): a projected
  teacher distribution that gets the token wrong teaches nothing.
* Student -> teacher space. ``h^s2t_j = sum_i b_ji h^S_i W_s2t`` read through the (frozen) teacher
  head gives ``p^s2t_j``; ``kd_teacher`` is ``KL(p^T_j || p^s2t_j)`` (trains the student,
  ``s2t`` and, through ``b``, ``query``).

Gradient routing: the teacher (hidden states, head, embeddings) and the student's embedding table
are frozen; ``ce_t2s`` reaches only ``query`` and ``t2s`` (the student head is under
``stop_gradient`` in that path); ``kd_student`` reaches only the student's hidden states and head;
``kd_teacher`` reaches the student's hidden states, ``s2t`` and ``query``.

Choices made here: the keys, the teacher states and the target embeddings in the values are
normalised per vector by their RMS (a per-batch standard deviation would make the loss depend on
how a batch is split into micro-batches); attention never crosses the documents packed in a
row; a position whose document has no positions on the other side contributes nothing and is
not counted. ``t2s_correct`` counts the student positions where ``p^t2s`` is right (the
positions ``kd_student`` covers). Everything is fp32; the vocabulary-sized logits are
computed in position chunks under ``jax.checkpoint`` (as ``distill_jax.losses.chunked``), so
(B, L, V) logits never exist whole; the (B, L, Lt) attention matrices do.

:func:`dskd_sums` returns masked *sums* and the micro-batch's counts; :func:`dskd_counts` gives
the counts from the batch alone (for the whole global batch, before any micro-batch) and
:func:`dskd_loss` divides the sums by them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from distill_jax.losses.chunked import chunked_sums, logits_from_hidden
from distill_jax.losses.kd import kl_divergence

Array = jax.Array

CE_T2S = "ce_t2s"
KD_STUDENT = "kd_student"
KD_TEACHER = "kd_teacher"
STUDENT_TOKENS = "student_tokens"
TEACHER_TOKENS = "teacher_tokens"
T2S_CORRECT = "t2s_correct"
SUMS = (CE_T2S, KD_STUDENT, KD_TEACHER)

_RMS_EPS = 1e-6


def init_dskd_params(key: Array, student_width: int, teacher_width: int,
                     dtype: Any = jnp.float32) -> dict[str, Array]:
    """Fresh DSKD projectors, entries N(0, 1/fan_in): ``query`` (2 D_S, 2 D_T) maps the student's
    [input; target] embeddings to attention queries, ``t2s`` (D_T, D_S) and ``s2t`` (D_S, D_T) map
    hidden states between the two widths."""
    shapes = {"query": (2 * student_width, 2 * teacher_width),
              "t2s": (teacher_width, student_width),
              "s2t": (student_width, teacher_width)}
    keys = jax.random.split(key, len(shapes))
    return {name: (jax.random.normal(k, shape, jnp.float32) / math.sqrt(shape[0])).astype(dtype)
            for k, (name, shape) in zip(keys, shapes.items())}


def _docs_present(segment_ids_BN: Array, num_segments: int) -> Array:
    """(B, num_segments) bool: which segment numbers (> 0) occur in each row."""
    batch = segment_ids_BN.shape[0]
    seg_BN = jnp.clip(segment_ids_BN.astype(jnp.int32), 0, num_segments - 1)
    rows_BN = jnp.broadcast_to(jnp.arange(batch)[:, None], seg_BN.shape)
    present = jnp.zeros((batch, num_segments), jnp.bool_).at[rows_BN, seg_BN].max(
        segment_ids_BN > 0)
    return present.at[:, 0].set(False)


def _position_masks(targets: Array, loss_mask: Array, segment_ids: Array,
                    teacher_segment_ids: Array, teacher_mask: Array) -> tuple[Array, Array]:
    """(trained student positions (B, L), valid teacher positions (B, Lt)), bool."""
    num = max(segment_ids.shape[1], teacher_segment_ids.shape[1]) + 1
    seg_s = jnp.clip(segment_ids.astype(jnp.int32), 0, num - 1)
    seg_t = jnp.clip(teacher_segment_ids.astype(jnp.int32), 0, num - 1)
    in_t = jnp.take_along_axis(_docs_present(teacher_segment_ids, num), seg_s, axis=1)
    in_s = jnp.take_along_axis(_docs_present(segment_ids, num), seg_t, axis=1)
    w_s = (loss_mask > 0) & (segment_ids > 0) & (targets >= 0) & in_t
    w_t = (teacher_mask > 0) & (teacher_segment_ids > 0) & in_s
    return w_s, w_t


def dskd_counts(*, targets: Array, loss_mask: Array, segment_ids: Array,
                teacher_segment_ids: Array, teacher_mask: Array) -> dict[str, Array]:
    """The positions :func:`dskd_sums` sums over, counted (fp32 scalars): ``student_tokens`` (
    ``loss_mask > 0``, in a document (segment > 0), a real target (>= 0), and the document has
    teacher positions) and ``teacher_tokens`` (``teacher_mask > 0``, in a document that has
    student positions). A function of the batch alone, so it can run on the whole global batch."""
    w_s, w_t = _position_masks(targets, loss_mask, segment_ids, teacher_segment_ids, teacher_mask)
    return {STUDENT_TOKENS: jnp.sum(w_s).astype(jnp.float32),
            TEACHER_TOKENS: jnp.sum(w_t).astype(jnp.float32)}


def _masked_softmax(scores: Array, mask: Array) -> Array:
    """Softmax over the last axis restricted to ``mask``; all-masked rows are all zeros. Masked
    entries neither receive nor pass gradient (no inf or nan anywhere)."""
    scores = jnp.where(mask, scores, 0.0)
    top = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.where(mask, jnp.exp(scores - top), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _rms_normalise(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _RMS_EPS)


def _pair_embeddings(emb_VD: Array, tokens_BN: Array, targets_BN: Array) -> Array:
    """[emb(token); emb(target)] per position, fp32 and frozen; negative ids read row 0."""
    emb_VD = jax.lax.stop_gradient(emb_VD).astype(jnp.float32)

    def look(ids):
        return jnp.take(emb_VD, jnp.maximum(ids.astype(jnp.int32), 0), axis=0, mode="clip")

    return jnp.concatenate([look(tokens_BN), look(targets_BN)], axis=-1)


def _check_shapes(h_s, head_s, emb_s, tokens, targets, loss_mask, segment_ids, h_t, head_t, emb_t,
                  teacher_tokens, teacher_targets, teacher_segment_ids, teacher_mask, params,
                  chunk_size) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if h_s.ndim != 3 or h_t.ndim != 3:
        raise ValueError(f"h_s {h_s.shape} and h_t {h_t.shape} must be (batch, length, width) "
                         "final hidden states")
    batch, length, ds = h_s.shape
    tb, tlength, dt = h_t.shape
    if tb != batch:
        raise ValueError(f"h_s has {batch} rows but h_t has {tb}: student and teacher rows must "
                         "be the same documents, row for row")
    for name, x in (("tokens", tokens), ("targets", targets), ("loss_mask", loss_mask),
                    ("segment_ids", segment_ids)):
        if x.shape != (batch, length):
            raise ValueError(f"{name} has shape {x.shape}, expected {(batch, length)} "
                             f"(h_s is {h_s.shape})")
    for name, x in (("teacher_tokens", teacher_tokens), ("teacher_targets", teacher_targets),
                    ("teacher_segment_ids", teacher_segment_ids), ("teacher_mask", teacher_mask)):
        if x.shape != (batch, tlength):
            raise ValueError(f"{name} has shape {x.shape}, expected {(batch, tlength)} "
                             f"(h_t is {h_t.shape})")
    for name, head, width in (("head_s", head_s, ds), ("head_t", head_t, dt)):
        if head.ndim != 2 or head.shape[0] != width:
            raise ValueError(f"{name} has shape {head.shape}, expected ({width}, vocab): pass the "
                             "(width, vocab) lm_head projection")
    for name, emb, width in (("emb_s", emb_s, ds), ("emb_t", emb_t, dt)):
        if emb.ndim != 2 or emb.shape[1] != width:
            raise ValueError(f"{name} has shape {emb.shape}, expected (vocab, {width}): pass the "
                             "(vocab, width) input embedding table")
    want = {"query": (2 * ds, 2 * dt), "t2s": (dt, ds), "s2t": (ds, dt)}
    got = {k: tuple(params[k].shape) for k in want if k in params}
    if got != want:
        raise ValueError(f"DSKD params have shapes {got}, expected {want} for student width {ds} "
                         f"and teacher width {dt}; create them with init_dskd_params(key, {ds}, "
                         f"{dt})")


def _chunked_scan(body, names: tuple[str, ...], xs: Mapping[str, Array], n: int,
                  chunk_size: int) -> dict[str, Array]:
    """Sum over position chunks of ``body(chunk)`` (a dict of scalars keyed by ``names``), each
    chunk under ``jax.checkpoint`` so only one chunk's logits are alive at a time."""
    flat = {name: x.reshape((n,) + x.shape[2:]) for name, x in xs.items()}
    init = {name: jnp.zeros((), jnp.float32) for name in names}
    return chunked_sums(body, init, flat, chunk_size)


def dskd_sums(*, h_s: Array, head_s: Array, emb_s: Array, tokens: Array, targets: Array,
              loss_mask: Array, segment_ids: Array, h_t: Array, head_t: Array, emb_t: Array,
              teacher_tokens: Array, teacher_targets: Array, teacher_segment_ids: Array,
              teacher_mask: Array, params: Mapping[str, Array],
              student_softcap: float | None = None, teacher_softcap: float | None = None,
              chunk_size: int = 512) -> dict[str, Array]:
    """DSKD's three masked sums and the counts of one (micro-)batch of packed rows.

    Args:
      h_s: (B, L, D_S) student final hidden states (after the final norm).
      head_s: (D_S, V) student lm_head; emb_s: (V', D_S) its input embedding table (frozen here).
      tokens, targets: (B, L) student input and next-token ids (negative targets: none).
      loss_mask: (B, L) > 0 where the student is trained.
      segment_ids: (B, L) document number per position, 0 for padding.
      h_t, head_t, emb_t: the teacher's (B, Lt, D_T) hidden states, (D_T, W) head and (W', D_T)
        embeddings (all frozen).
      teacher_tokens, teacher_targets, teacher_segment_ids: (B, Lt), as the student's; equal
        segment numbers in a row are the same document on both sides.
      teacher_mask: (B, Lt) > 0 where the teacher position carries ``kd_teacher``.
      params: DSKD's projectors (:func:`init_dskd_params`).
      student_softcap, teacher_softcap: final-logit softcaps of the two models (None: none).
      chunk_size: positions per lm_head chunk.

    Returns:
      ``{ce_t2s, kd_student, kd_teacher}`` sums and ``{student_tokens, teacher_tokens,
      t2s_correct}`` counts, fp32 scalars (see :func:`dskd_counts` for which positions count).
    """
    _check_shapes(h_s, head_s, emb_s, tokens, targets, loss_mask, segment_ids, h_t, head_t,
                  emb_t, teacher_tokens, teacher_targets, teacher_segment_ids, teacher_mask,
                  params, chunk_size)
    f32 = jnp.float32
    sg = jax.lax.stop_gradient
    batch, length, _ = h_s.shape
    tlength, dt = h_t.shape[1:]
    h_t, head_t, head_s_frozen = sg(h_t), sg(head_t), sg(head_s)
    w_s_BL, w_t_BT = _position_masks(targets, loss_mask, segment_ids, teacher_segment_ids,
                                     teacher_mask)

    # Cross-model attention, per document.
    q_BLE = _pair_embeddings(emb_s, tokens, targets) @ params["query"].astype(f32)
    pair_t_BTE = _pair_embeddings(emb_t, teacher_tokens, teacher_targets)
    k_BTE = _rms_normalise(pair_t_BTE)
    scores_BLT = jnp.einsum("ble,bte->blt", q_BLE, k_BTE) / math.sqrt(2 * dt)
    same_BLT = (segment_ids[:, :, None] == teacher_segment_ids[:, None, :]) & \
        (segment_ids[:, :, None] > 0)
    a_BLT = _masked_softmax(scores_BLT, same_BLT)
    b_BTL = _masked_softmax(scores_BLT.transpose(0, 2, 1), same_BLT.transpose(0, 2, 1))

    v_BTS = (_rms_normalise(h_t.astype(f32)) + _rms_normalise(pair_t_BTE[..., dt:])) \
        @ params["t2s"].astype(f32)
    t2s_BLS = jnp.einsum("blt,bts->bls", a_BLT, v_BTS)
    u_BLD = h_s.astype(f32) @ params["s2t"].astype(f32)
    s2t_BTD = jnp.einsum("btl,bld->btd", b_BTL, u_BLD)

    def student_body(c):
        live = c["w"][:, None]
        zs = jnp.where(live, logits_from_hidden(c["hs"], head_s, student_softcap), 0.0)
        zx = jnp.where(live, logits_from_hidden(c["t2s"], head_s_frozen, student_softcap), 0.0)
        logp_s, logp_x = jax.nn.log_softmax(zs), jax.nn.log_softmax(zx)
        y = jnp.maximum(c["y"], 0)
        ce = -jnp.take_along_axis(logp_x, y[:, None], axis=-1)[:, 0]
        correct = c["w"] & (jnp.argmax(zx, axis=-1) == y)
        kl = kl_divergence(sg(logp_x), logp_s)
        return {CE_T2S: jnp.sum(jnp.where(c["w"], ce, 0.0)),
                KD_STUDENT: jnp.sum(jnp.where(correct, kl, 0.0)),
                T2S_CORRECT: jnp.sum(correct).astype(f32)}

    def teacher_body(c):
        live = c["w"][:, None]
        zt = jnp.where(live, logits_from_hidden(c["ht"], head_t, teacher_softcap), 0.0)
        zx = jnp.where(live, logits_from_hidden(c["s2t"], head_t, teacher_softcap), 0.0)
        kl = kl_divergence(jax.nn.log_softmax(sg(zt)), jax.nn.log_softmax(zx))
        return {KD_TEACHER: jnp.sum(jnp.where(c["w"], kl, 0.0))}

    student_xs = {"hs": h_s, "t2s": t2s_BLS, "y": targets.astype(jnp.int32), "w": w_s_BL}
    teacher_xs = {"ht": h_t, "s2t": s2t_BTD, "w": w_t_BT}
    sums = _chunked_scan(student_body, (CE_T2S, KD_STUDENT, T2S_CORRECT), student_xs,
                         batch * length, chunk_size)
    sums.update(_chunked_scan(teacher_body, (KD_TEACHER,), teacher_xs, batch * tlength,
                              chunk_size))
    sums[STUDENT_TOKENS] = jnp.sum(w_s_BL).astype(f32)
    sums[TEACHER_TOKENS] = jnp.sum(w_t_BT).astype(f32)
    return sums


def dskd_loss(sums: Mapping[str, Array], n_student: Array, n_teacher: Array) -> Array:
    """The DSKD objective from (micro-)batch sums and whole-batch counts:
    ``(ce_t2s + kd_student) / n_student + kd_teacher / n_teacher`` (an empty side gives 0)."""
    ns = jnp.maximum(jnp.asarray(n_student, jnp.float32), 1.0)
    nt = jnp.maximum(jnp.asarray(n_teacher, jnp.float32), 1.0)
    return (sums[CE_T2S] + sums[KD_STUDENT]) / ns + sums[KD_TEACHER] / nt
