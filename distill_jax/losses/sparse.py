"""Sparse (top-k) distillation losses: training from a teacher cache instead of teacher logits.

Per teacher token the cache holds (see ``DESIGN.md``, "Teacher cache")::

    topk_ids       (..., k) int    the teacher's k most likely next tokens, in any order (a cache
                                   returns them by ascending id)
    topk_logprobs  (..., k) float  their teacher log-probabilities, log p_T(ids), in the same order
    tail_logmass   (...)    float  log(1 - sum_i p_T(ids_i)): the teacher's mass outside the
                                   top-k (-inf when k = V); ``topk_from_logits`` computes all three

Every loss has the signature::

    fn(student_logits_xV, topk_ids_xK, topk_logprobs_xK, tail_logmass_x, mask_x, *,
       temperature=1.0, tail="bucket", **options) -> (loss, metrics)

and the conventions of ``distill_jax.losses.kd``: fp32 inside, the per-token divergence times
``T**2``, weighted by ``mask``, summed and divided by the number of unmasked tokens (0 when there
are none); metrics ``distill/<name>``, ``distill/<name>_sum`` and ``distill/tokens`` with the
same names as the dense losses (a sparse run's ``forward_kl`` is this module's ``forward_kl``).

How the teacher's mass outside the top-k is treated (``tail``):

- ``"bucket"`` (default): both distributions live on k + 1 outcomes, the k cached ids plus one
  "everything else" bucket::

      p_T = (p_T(id_1), ..., p_T(id_k), exp(tail_logmass))
      p_S = (p_S(id_1), ..., p_S(id_k), 1 - sum_i p_S(id_i))

  The student's bucket is computed in log space as ``logsumexp`` of its (tempered) logits over
  the vocabulary with the k ids masked out, minus ``logsumexp`` over the whole vocabulary: stable
  even when the student puts almost all its mass on the k ids (no ``log(1 - s)`` cancellation),
  and exactly ``-inf`` (with zero, finite gradients) when the k ids cover the vocabulary. The
  teacher's k + 1 log-probs are re-normalised by their ``logsumexp`` before use: a no-op up to
  rounding for a consistent cache, but it keeps the divergences of a proper distribution when
  the cache stores rounded (e.g. bf16) values. The bucketed divergence is a lower bound of the
  full-vocabulary one (data processing: it is the divergence after merging the non-top-k
  outcomes) and equals it exactly when k = V (``tail_logmass = -inf``).
- ``"renormalize"``: the tail is dropped; both distributions are restricted to the k ids and
  renormalised over them::

      p_T = softmax(topk_logprobs),    p_S = softmax(student_logits[ids] / T)

  The student gets no signal about its mass outside the top-k (moving all of it elsewhere
  costs nothing), which is why ``bucket`` is the default. ``tail_logmass`` is unused here and
  may be None. With k = V it equals the dense loss.

Temperature. The student side is ``log_softmax(student_logits / T)`` exactly as in the dense
losses. The teacher side is taken as cached: ``topk_logprobs`` and ``tail_logmass`` are used as
they are, assumed to be the teacher's log-probs *at the same temperature T* (the cache writer
calls ``topk_from_logits(teacher_logits, k, temperature=T)``; the cache manifest records T). They
are not re-tempered here: re-tempering a truncated distribution is not exact (the tail's shape is
unknown), so a cache written at another temperature should be rewritten, not adjusted. The result
is multiplied by ``T**2`` as in the dense losses; with k = V the sparse loss at temperature T
equals ``kd.<loss>(student_logits, teacher_logits, mask, temperature=T)``.

Divergences are the dense ones applied to the (k + 1)- or k-outcome distributions (``kd``'s
per-token helpers, so ``0 log 0 = 0``, the accurate mixture log-ratios and the *scaled*
generalised JSD(beta) of GKD / TRL with beta = 0 forward KL and beta = 1 reverse KL, and its
scaled variant ``jsd_scaled``, all carry over).
``sparse_term_sums`` also accepts ``tvd``, ``skew_kl`` and ``skew_reverse_kl`` (the same
divergences of the sparse distributions).

Masking: logits at masked positions are zeroed, and the cached ids / log-probs / tail at masked
positions are replaced by inert values (ids 0..k-1, uniform log-probs, tail -inf) before
anything is computed, so whatever they hold (garbage ids, nan) changes neither the loss nor the
gradients. Ids at unmasked positions must be valid (0 <= id < V) and distinct; that is not
checked under jit. The teacher side is always under ``stop_gradient``.

``sparse_term_sums`` / ``sparse_combined_loss`` mirror ``kd.term_sums`` / ``kd.combined_loss``
for a ``kd.LossSpec`` (divergence terms sparse, ``cross_entropy`` dense on the labels), and
``sparse_chunked_loss`` mirrors ``chunked.chunked_loss``: student lm_head plus loss per token
chunk under ``jax.checkpoint``, so the student's full logits never exist.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from distill_jax.losses import chunked, kd

Array = jax.Array
Metrics = kd.Metrics

BUCKET = "bucket"
RENORMALIZE = "renormalize"
TAIL_MODES = (BUCKET, RENORMALIZE)


# ---------------------------------------------------------------------------------------------
# Cache writer side
# ---------------------------------------------------------------------------------------------


def _scatter_neg_inf(z_xV: Array, ids_xK: Array) -> Array:
    """``z`` with the entries at ``ids`` (per row) set to -inf (their gradient is zero)."""
    lead, vocab, k = z_xV.shape[:-1], z_xV.shape[-1], ids_xK.shape[-1]
    n = math.prod(lead)
    z_NV = z_xV.reshape(n, vocab)
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    z_NV = z_NV.at[rows, ids_xK.reshape(n, k)].set(-jnp.inf)
    return z_NV.reshape(z_xV.shape)


def safe_logsumexp(x_xV: Array) -> Array:
    """logsumexp over the last axis that is -inf (value) with zero, finite gradients when every
    entry is -inf (jax.nn.logsumexp's gradient is nan there)."""
    m = jax.lax.stop_gradient(jnp.max(x_xV, axis=-1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(x_xV - m[..., None]), axis=-1)
    pos = s > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, s, 1.0)) + m, -jnp.inf)


def topk_from_logits(teacher_logits: Array, k: int, temperature: float = 1.0
                     ) -> tuple[Array, Array, Array]:
    """What the cache stores per token: (ids, logprobs, tail_logmass) at temperature T.

    ``logprobs = log_softmax(teacher_logits / T)`` at the ``k`` largest entries (``ids``, int32,
    in descending order, ties broken by the lower id, as ``jax.lax.top_k``), and
    ``tail_logmass = log sum_{v not in ids} softmax(teacher_logits / T)_v``, computed as the
    ``logsumexp`` of the non-top-k tempered logits minus the full ``logsumexp`` (accurate even
    when the tail is tiny, unlike ``log1p(-sum(exp(logprobs)))``); -inf when k = V.
    All fp32. ``teacher_logits`` is (..., V); results are (..., k), (..., k) and (...).
    """
    kd.check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V={vocab}], got {k}")
    z = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    top_z, ids = jax.lax.top_k(z, k)
    ids = ids.astype(jnp.int32)
    logprobs = top_z - lse[..., None]
    tail = safe_logsumexp(_scatter_neg_inf(z, ids)) - lse
    return ids, logprobs, tail


# ---------------------------------------------------------------------------------------------
# Sparse distributions
# ---------------------------------------------------------------------------------------------


def _check_tail(tail: str) -> None:
    if tail not in TAIL_MODES:
        raise ValueError(kd.unknown_message(tail, TAIL_MODES, "tail mode"))


def _check_cache(student_logits_xV: Array, topk_ids: Array, topk_logprobs: Array,
                 tail_logmass: Array | None, tail: str) -> None:
    _check_tail(tail)
    lead, vocab = student_logits_xV.shape[:-1], student_logits_xV.shape[-1]
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != lead:
        raise ValueError(f"topk_ids {topk_ids.shape} and topk_logprobs {topk_logprobs.shape} must "
                         f"both be {lead} + (k,) to match student logits {student_logits_xV.shape}")
    if not 1 <= topk_ids.shape[-1] <= vocab:
        raise ValueError(f"top-k size {topk_ids.shape[-1]} must be in [1, V={vocab}]")
    if tail == BUCKET:
        if tail_logmass is None:
            raise ValueError("tail='bucket' needs tail_logmass (or use tail='renormalize')")
        if tail_logmass.shape != lead:
            raise ValueError(f"tail_logmass has shape {tail_logmass.shape}, expected {lead}")


def _sanitize_cache(topk_ids: Array, topk_logprobs: Array, tail_logmass: Array | None,
                    w_x: Array) -> tuple[Array, Array, Array | None]:
    """Inert cache entries at masked positions (distinct valid ids, uniform teacher, no tail)."""
    k = topk_ids.shape[-1]
    live = (w_x > 0)[..., None]
    ids = jnp.where(live, topk_ids.astype(jnp.int32), jnp.arange(k, dtype=jnp.int32))
    logt = jnp.where(live, jax.lax.stop_gradient(topk_logprobs).astype(jnp.float32),
                     jnp.float32(-math.log(k)))
    if tail_logmass is not None:
        tail_logmass = jnp.where(w_x > 0, jax.lax.stop_gradient(tail_logmass).astype(jnp.float32),
                                 -jnp.inf)
    return ids, logt, tail_logmass


def _sparse_log_probs(z_xV: Array, ids_xK: Array, logt_xK: Array, tail_x: Array | None,
                      tail: str) -> tuple[Array, Array]:
    """(student, teacher) log-probs over the k + 1 (bucket) or k (renormalize) outcomes, from
    the student's tempered fp32 logits and the sanitised cache."""
    zk = jnp.take_along_axis(z_xV, ids_xK, axis=-1)
    if tail == RENORMALIZE:
        logs = zk - jax.nn.logsumexp(zk, axis=-1, keepdims=True)
        logt = logt_xK - jax.nn.logsumexp(logt_xK, axis=-1, keepdims=True)
        return logs, logt
    lse_all = jax.nn.logsumexp(z_xV, axis=-1)
    lse_out = safe_logsumexp(_scatter_neg_inf(z_xV, ids_xK))
    logs = jnp.concatenate([zk - lse_all[..., None], (lse_out - lse_all)[..., None]], axis=-1)
    logt = jnp.concatenate([logt_xK, tail_x[..., None]], axis=-1)
    logt = logt - jax.nn.logsumexp(logt, axis=-1, keepdims=True)
    return logs, logt


def sparse_distributions(student_logits: Array, topk_ids: Array, topk_logprobs: Array,
                         tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0,
                         tail: str = BUCKET) -> tuple[Array, Array]:
    """The (student, teacher) log-probs the sparse losses compare: (..., k + 1) for ``bucket``
    (the last entry is the tail bucket), (..., k) for ``renormalize``. For inspection and tests."""
    _check_cache(student_logits, topk_ids, topk_logprobs, tail_logmass, tail)
    kd.check_temperature(temperature)
    w_x = kd.token_weights(mask, student_logits.shape[:-1])
    ids, logt, tl = _sanitize_cache(topk_ids, topk_logprobs, tail_logmass, w_x)
    z = kd.masked_logits(student_logits, w_x)
    if temperature != 1.0:
        z = z / temperature
    return _sparse_log_probs(z, ids, logt, tl, tail)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def sparse_term_sums(student_logits_xV: Array, topk_ids_xK: Array | None,
                     topk_logprobs_xK: Array | None, tail_logmass_x: Array | None,
                     labels_x: Array | None, w_x: Array, spec: kd.LossSpec, *,
                     tail: str = BUCKET) -> dict[str, Array]:
    """Masked sums of every term of ``spec`` (before weighting), divergences on the sparse
    distributions and ``cross_entropy`` dense on ``labels``: ``kd.term_sums`` for a cache.
    ``w_x`` are fp32 token weights (``kd.token_weights``)."""
    temp = spec.temperature
    sums: dict[str, Array] = {}
    if spec.needs_teacher:
        if topk_ids_xK is None or topk_logprobs_xK is None:
            raise ValueError("this loss has distillation terms but no teacher cache was given")
        _check_cache(student_logits_xV, topk_ids_xK, topk_logprobs_xK, tail_logmass_x, tail)
        ids, logt_k, tl = _sanitize_cache(topk_ids_xK, topk_logprobs_xK,
                                          tail_logmass_x if tail == BUCKET else None, w_x)
        z = kd.masked_logits(student_logits_xV, w_x)
        if temp != 1.0:
            z = z / temp
        logs, logt = _sparse_log_probs(z, ids, logt_k, tl, tail)
        for name, _ in spec.terms:
            if name in kd.DIVERGENCE_TERMS:
                per_token = kd.divergence(name, logs, logt, beta=spec.jsd_beta,
                                           alpha=spec.skew_alpha) * temp ** 2
                sums[name] = kd.masked_sum(per_token, w_x)
    if spec.needs_labels:
        if labels_x is None:
            raise ValueError("this loss has a cross_entropy term but no labels were given")
        if labels_x.shape != w_x.shape:
            raise ValueError(f"labels have shape {labels_x.shape}, expected {w_x.shape}")
    for name, fn in spec.chunk_terms:
        if name in spec.weights:
            teacher = {"topk_ids": topk_ids_xK, "topk_logprobs": topk_logprobs_xK,
                       "tail_logmass": tail_logmass_x if tail == BUCKET else None}
            sums[name] = fn(student_logits_xV, teacher, labels_x, w_x, spec)
    if kd.CROSS_ENTROPY in spec.weights:
        z1 = kd.masked_logits(student_logits_xV, w_x)
        lab = jnp.where(w_x > 0, labels_x, 0).astype(jnp.int32)
        ce = jax.nn.logsumexp(z1, axis=-1) \
            - jnp.take_along_axis(z1, lab[..., None], axis=-1)[..., 0]
        sums[kd.CROSS_ENTROPY] = kd.masked_sum(ce, w_x)
    return sums


def sparse_combined_loss(student_logits: Array, topk_ids: Array | None,
                         topk_logprobs: Array | None, tail_logmass: Array | None,
                         labels: Array | None, mask: Array, spec: kd.LossSpec, *,
                         tail: str = BUCKET) -> tuple[Array, Metrics]:
    """``kd.combined_loss`` with the teacher's logits replaced by its top-k cache."""
    w_x = kd.token_weights(mask, student_logits.shape[:-1])
    sums = sparse_term_sums(student_logits, topk_ids, topk_logprobs, tail_logmass, labels, w_x,
                            spec, tail=tail)
    return kd.finalize(sums, kd.token_count(w_x), spec)


def _sparse_loss(name: str, student_logits: Array, topk_ids: Array, topk_logprobs: Array,
                 tail_logmass: Array | None, mask: Array, temperature: float, tail: str,
                 beta: float = 0.5) -> tuple[Array, Metrics]:
    spec = kd.LossSpec(terms=((name, 1.0),), temperature=temperature, jsd_beta=beta)
    w_x = kd.token_weights(mask, student_logits.shape[:-1])
    sums = sparse_term_sums(student_logits, topk_ids, topk_logprobs, tail_logmass, None, w_x,
                            spec, tail=tail)
    return kd.single_term(name, sums[name], kd.token_count(w_x))


def sparse_forward_kl(student_logits: Array, topk_ids: Array, topk_logprobs: Array,
                      tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0,
                      tail: str = BUCKET) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_T || p_S) * T^2 over the sparse distributions (module docstring)."""
    return _sparse_loss(kd.FORWARD_KL, student_logits, topk_ids, topk_logprobs, tail_logmass,
                        mask, temperature, tail)


def sparse_reverse_kl(student_logits: Array, topk_ids: Array, topk_logprobs: Array,
                      tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0,
                      tail: str = BUCKET) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_S || p_T) * T^2 over the sparse distributions (module docstring)."""
    return _sparse_loss(kd.REVERSE_KL, student_logits, topk_ids, topk_logprobs, tail_logmass,
                        mask, temperature, tail)


def sparse_jsd(student_logits: Array, topk_ids: Array, topk_logprobs: Array,
               tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0,
               tail: str = BUCKET, beta: float = 0.5) -> tuple[Array, Metrics]:
    """Masked mean of GKD's generalised JSD(beta) * T^2 over the sparse distributions:
    ``kd.jsd``'s convention (TRL's; beta = 0 forward KL, beta = 1 reverse KL)."""
    return _sparse_loss(kd.JSD, student_logits, topk_ids, topk_logprobs, tail_logmass, mask,
                        temperature, tail, beta=beta)


def sparse_jsd_scaled(student_logits: Array, topk_ids: Array, topk_logprobs: Array,
                      tail_logmass: Array | None, mask: Array, *, temperature: float = 1.0,
                      tail: str = BUCKET, beta: float = 0.5) -> tuple[Array, Metrics]:
    """``sparse_jsd`` divided by beta (1 - beta) for 0 < beta < 1 (``kd.jsd_scaled``)."""
    return _sparse_loss(kd.JSD_SCALED, student_logits, topk_ids, topk_logprobs, tail_logmass,
                        mask, temperature, tail, beta=beta)


SPARSE_DIVERGENCES = {kd.FORWARD_KL: sparse_forward_kl, kd.REVERSE_KL: sparse_reverse_kl,
                      kd.JSD: sparse_jsd, kd.JSD_SCALED: sparse_jsd_scaled}


# ---------------------------------------------------------------------------------------------
# Chunked
# ---------------------------------------------------------------------------------------------


def sparse_chunked_loss(student_h: Array, student_head: Array, topk_ids: Array | None,
                        topk_logprobs: Array | None, tail_logmass: Array | None,
                        labels: Array | None, mask: Array, *, spec: kd.LossSpec,
                        chunk_size: int = 512, student_softcap: float | None = None,
                        tail: str = BUCKET, cotangent: dict[str, Array] | None = None
                        ) -> tuple[Array, Metrics]:
    """``sparse_combined_loss(h_S @ head_S, cache..., labels, mask, spec)`` without full logits.

    The pattern of ``chunked.chunked_loss``: tokens flattened and split into chunks of
    ``chunk_size`` (the last one padded with masked tokens), one ``jax.lax.scan`` step per chunk
    under ``jax.checkpoint`` computing that chunk's student logits and term sums, so memory holds
    a few (chunk_size, V) arrays at a time. The cache is small ((N, k)) and is chunked alongside.

    Args:
      student_h: (..., D) final student hidden states; student_head: (D, V).
      topk_ids, topk_logprobs: (..., k) cache entries; tail_logmass: (...) (``bucket`` only).
        All may be None when ``spec`` has no divergence terms.
      labels: (...) next-token labels, or None without a cross_entropy term.
      mask: (...) bool or float token weights.
      spec, tail: the loss terms and the tail convention. student_softcap: final-logit softcap.
      cotangent: ``{term: scalar}`` announced by a training step, as for
        ``chunked.chunked_loss``: each chunk's backward then runs in the forward scan.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    _check_tail(tail)
    lead = student_h.shape[:-1]
    w_x = kd.token_weights(mask, lead)
    n = math.prod(lead)
    vocab = student_head.shape[-1]
    chunked.check_student_inputs(student_h, student_head, labels, spec)
    use_teacher = spec.needs_teacher
    if use_teacher:
        if topk_ids is None or topk_logprobs is None:
            raise ValueError("this loss has distillation terms but no teacher cache was given")
        # Shape checks against a stand-in of the logits' shape (nothing is materialised).
        _check_cache(jax.ShapeDtypeStruct(lead + (vocab,), jnp.float32), topk_ids,
                     topk_logprobs, tail_logmass, tail)

    frozen = {"w": w_x.reshape(n)}
    if use_teacher:
        k = topk_ids.shape[-1]
        frozen["ids"] = topk_ids.reshape(n, k)
        frozen["logt"] = jax.lax.stop_gradient(topk_logprobs).reshape(n, k)
        if tail == BUCKET:
            frozen["tail"] = jax.lax.stop_gradient(tail_logmass).reshape(n)
    if spec.needs_labels:
        frozen["labels"] = labels.reshape(n)

    def chunk_sums(head, _, c):
        zs_CV = chunked.logits_from_hidden(c["h"], head, student_softcap)
        sums = sparse_term_sums(zs_CV, c.get("ids"), c.get("logt"), c.get("tail"),
                                c.get("labels"), c["w"], spec, tail=tail)
        return {name: sums[name] for name, _ in spec.terms}

    init = {name: jnp.zeros((), jnp.float32) for name, _ in spec.terms}
    xs = {"h": student_h.reshape(n, -1)}
    if cotangent is None:
        sums = chunked.chunked_sums(lambda c: chunk_sums(student_head, None, c), init,
                                    {**xs, **frozen}, chunk_size)
    else:
        sums = chunked.fused_chunked_sums(chunk_sums, init, student_head, None, xs, frozen,
                                          {name: cotangent[name] for name, _ in spec.terms},
                                          chunk_size)
    return kd.finalize(sums, kd.token_count(w_x), spec)
