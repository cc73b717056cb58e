"""The lm_head and the loss together, over token chunks, so full logits never exist.

With a 151,936-token vocabulary a (1, 4096) batch has 2.3 GiB of fp32 logits per model, and
autodiff of a naive loss holds several such arrays at once (logits, log-probs, probabilities,
their cotangents). ``chunked_loss`` flattens the tokens, splits them into chunks of
``chunk_size`` and runs one ``jax.lax.scan`` step per chunk: the step computes that chunk's
student and teacher logits (h @ head in fp32 accumulation, then the optional softcap), the
per-term masked sums, and adds them to the carry. The step is under ``jax.checkpoint``, so the
forward pass keeps only the chunk inputs and the backward pass recomputes one chunk's logits at a
time: peak memory is a few (chunk_size, V) arrays, independent of the sequence length. The price is
computing both lm_head matmuls twice (once forward, once in the backward recompute).

Measured with ``benchmarks/loss_memory.py`` (XLA buffer assignment, forward + backward, B=1,
T=4096, V=151,936, student D=896, teacher D=1536, bf16 hidden states, fp32 heads): full logits
need 20.9 GiB of temporaries, ``chunk_size=512`` 3.2 GiB (about 1.35 GiB of it fixed: bf16 copies
of both heads and the fp32 head-gradient accumulator, plus ~6 fp32 (chunk_size, V) arrays), and
the chunked figure is the same at T=1024 as at T=4096.

The sums are the same quantities ``combined_loss`` reduces, so the result is the unchunked
``combined_loss`` up to floating-point summation order; the teacher side is under
``stop_gradient`` (no gradient ever reaches the teacher's hidden states or head).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from distill_jax.losses import kd
# fp32 logits h @ head (fp32 accumulation) then the optional softcap: the model's own head.
from distill_jax.models.transformer import head_logits as logits_from_hidden

Array = jax.Array


def _chunks(x_N: Array, n_chunks: int, chunk_size: int) -> Array:
    """(N, ...) -> (n_chunks, chunk_size, ...), zero-padded at the end."""
    pad = n_chunks * chunk_size - x_N.shape[0]
    if pad:
        x_N = jnp.pad(x_N, [(0, pad)] + [(0, 0)] * (x_N.ndim - 1))
    return x_N.reshape((n_chunks, chunk_size) + x_N.shape[1:])


def chunked_scan(step: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs_N: Any,
                 chunk_size: int) -> tuple[Any, Any]:
    """``jax.lax.scan(step, init, chunks)`` over chunks of ``chunk_size`` tokens, each step under
    ``jax.checkpoint`` (so a backward pass recomputes one chunk at a time).

    ``xs_N`` is a pytree of (N, ...) arrays; the chunk size is ``min(chunk_size, N)`` (at least
    1) and the last chunk is zero-padded, so padding must carry zero weight in ``step``. Returns
    ``(carry, ys)`` with ``ys`` stacked per chunk, (n_chunks, ...) (see :func:`unchunk`)."""
    n = jax.tree.leaves(xs_N)[0].shape[0]
    size = max(1, min(chunk_size, n))
    n_chunks = max(1, -(-n // size))
    chunks = jax.tree.map(lambda x: _chunks(x, n_chunks, size), xs_N)
    return jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, chunks)


def chunked_sums(fn: Callable[[Any], Any], init: Any, xs_N: Any, chunk_size: int) -> Any:
    """The sum over token chunks of ``fn(chunk)`` (a pytree shaped like ``init``, fp32 scalars
    for the losses), accumulated in the scan's carry: :func:`chunked_scan` without outputs."""

    def step(carry, c):
        return jax.tree.map(lambda a, b: a + b, carry, fn(c)), None

    return chunked_scan(step, init, xs_N, chunk_size)[0]


def _pick(leaves: list, mask: list[bool]) -> list:
    """The leaves where ``mask`` is set."""
    return [leaf for leaf, on in zip(leaves, mask) if on]


def _merge(mask: list[bool], picked: list, rest: list) -> list:
    """``rest`` with the entries where ``mask`` is set replaced, in order, by ``picked``."""
    it = iter(picked)
    return [next(it) if on else r for on, r in zip(mask, rest)]


# A host function called whenever a fused scan's backward pass recomputes its chunks (the
# cotangent was not the one announced); None: no callback is traced in. For tests and profiling.
on_recompute: Callable[[], None] | None = None


def fused_chunked_sums(fn: Callable[[Any, Any, Any], Any], init: Any, params: Any, frozen: Any,
                       xs_N: Any, frozen_N: Any, cotangent: Any, chunk_size: int) -> Any:
    """:func:`chunked_sums` of ``fn(params, frozen, chunk)`` whose gradient is computed in the
    forward scan, chunk by chunk, for a cotangent known in advance: no recomputation.

    ``chunked_sums`` under ``jax.vjp`` runs every chunk twice (the backward pass recomputes each
    chunk's logits, since storing them is what chunking avoids). When the caller already knows
    the cotangent its sums will receive -- a training step whose loss is a fixed linear
    combination of the sums -- each chunk's backward can run right after its forward, while its
    logits are at hand: that saves one forward of every lm_head the chunk computes (for
    same-vocabulary KD with a live teacher, a student and a teacher head matmul per token).

    Args:
      fn: ``fn(params, frozen, chunk) -> sums`` (a pytree shaped like ``init``), where ``chunk``
        is ``{**x, **f}`` for one chunk ``x`` of ``xs_N`` and ``f`` of ``frozen_N``.
      params: arrays every chunk reads and that receive gradients (the student's head).
      frozen: arrays every chunk reads that receive none (the teacher's head).
      xs_N: a dict of (N, ...) per-token arrays that receive gradients (hidden states).
      frozen_N: a dict of (N, ...) per-token arrays that receive none (teacher hidden states,
        labels, token weights).
      cotangent: a pytree shaped like ``init``: the cotangent the sums are expected to receive.

    Returns the sums. Differentiating them with a cotangent equal to ``cotangent`` returns the
    gradients computed in the forward scan; with any other cotangent (GradMag's per-term probes,
    say), the backward recomputes every chunk as :func:`chunked_sums` does, so the result is
    always the exact vjp.
    """

    def primal(params, xs_N, frozen, frozen_N):
        return chunked_sums(lambda c: fn(params, frozen, c), init,
                            {**xs_N, **frozen_N}, chunk_size)

    def fwd_scan(params, xs_N, frozen, frozen_N, ct, p_on, x_on):
        """The sums, and the gradients of <ct, sums> w.r.t. the leaves of ``params`` and
        ``xs_N`` that are differentiated (``p_on`` / ``x_on``: one bool per leaf)."""
        p_leaves, p_def = jax.tree.flatten(params)
        x_keys = sorted(xs_N)
        xs = {"diff": {k: xs_N[k] for k, on in zip(x_keys, x_on) if on},
              "fixed": {**frozen_N, **{k: xs_N[k] for k, on in zip(x_keys, x_on) if not on}}}

        def step(carry, c):
            sums, g_params = carry
            out, vjp = jax.vjp(
                lambda p, x: fn(p_def.unflatten(_merge(p_on, p, p_leaves)), frozen,
                                {**x, **c["fixed"]}), _pick(p_leaves, p_on), c["diff"])
            g_p, g_x = vjp(ct)
            carry = (jax.tree.map(jnp.add, sums, out), jax.tree.map(jnp.add, g_params, g_p))
            return carry, g_x

        zeros = [jnp.zeros(leaf.shape, jnp.float32) for leaf in _pick(p_leaves, p_on)]
        (sums, g_params), g_x = chunked_scan(step, (init, zeros), xs, chunk_size)
        n = jax.tree.leaves(xs_N)[0].shape[0]
        g_x = {k: g.astype(xs_N[k].dtype) for k, g in unchunk(g_x, n).items()}
        g_params = [g.astype(leaf.dtype) for g, leaf in zip(g_params, _pick(p_leaves, p_on))]
        return sums, (g_params, g_x)

    @jax.custom_vjp
    def sums_of(params, xs_N, frozen, frozen_N, ct):
        return primal(params, xs_N, frozen, frozen_N)

    def differentiable(primal):
        return primal.perturbed and jnp.issubdtype(primal.value.dtype, jnp.inexact)

    def sums_fwd(params, xs_N, frozen, frozen_N, ct):
        # symbolic zeros: each leaf says whether it is differentiated (a LoRA student's frozen
        # head is not: its gradient is then never computed)
        is_primal = lambda c: hasattr(c, "perturbed")  # noqa: E731
        p_on = [differentiable(c) for c in jax.tree.leaves(params, is_leaf=is_primal)]
        x_on = [differentiable(xs_N[k]) for k in sorted(xs_N)]
        value = lambda t: jax.tree.map(lambda c: c.value, t, is_leaf=is_primal)  # noqa: E731
        params, xs_N, frozen, frozen_N, ct = map(value, (params, xs_N, frozen, frozen_N, ct))
        sums, grads = fwd_scan(params, xs_N, frozen, frozen_N, ct, p_on, x_on)
        return sums, (params, xs_N, frozen, frozen_N, ct, grads, p_on, x_on)

    def sums_bwd(res, g_sums):
        params, xs_N, frozen, frozen_N, ct, grads, p_on, x_on = res
        g_sums = jax.tree.map(
            lambda g, c: jnp.zeros(c.shape, c.dtype) if type(g).__name__ == "SymbolicZero"
            else g, g_sums, ct, is_leaf=lambda g: type(g).__name__ == "SymbolicZero")
        same = jnp.all(jnp.stack([jnp.all(a == b) for a, b in
                                  zip(jax.tree.leaves(g_sums), jax.tree.leaves(ct))]))
        p_leaves, p_def = jax.tree.flatten(params)
        x_keys = sorted(xs_N)

        def recompute():
            if on_recompute is not None:  # traced in: a host callback when this branch runs
                jax.debug.callback(on_recompute)
            x_diff = {k: xs_N[k] for k, on in zip(x_keys, x_on) if on}

            def f(p_diff, x_diff):
                p = p_def.unflatten(_merge(p_on, p_diff, p_leaves))
                return primal(p, {**xs_N, **x_diff}, frozen, frozen_N)
            return tuple(jax.vjp(f, _pick(p_leaves, p_on), x_diff)[1](g_sums))

        g_params, g_x = jax.lax.cond(same, lambda: grads, recompute)
        # per-leaf cotangents: the computed ones, None (zero) for the leaves not differentiated
        g_params = p_def.unflatten(_merge(p_on, g_params, [None] * len(p_on)))
        g_x = {k: g_x[k] if on else None for k, on in zip(x_keys, x_on)}
        # nothing reaches the frozen inputs or the cotangent
        return g_params, g_x, None, None, None

    sums_of.defvjp(sums_fwd, sums_bwd, symbolic_zeros=True)
    cotangent = jax.tree.map(lambda c, i: jnp.asarray(c, i.dtype), cotangent, init)
    frozen, frozen_N = jax.lax.stop_gradient((frozen, frozen_N))
    return sums_of(params, xs_N, frozen, frozen_N, jax.lax.stop_gradient(cotangent))


def unchunk(ys: Any, n: int) -> Any:
    """Per-token outputs of :func:`chunked_scan`, (n_chunks, chunk, ...) -> (n, ...)."""
    return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], ys)


def check_student_inputs(student_h: Array, student_head: Array, labels: Array | None,
                         spec: kd.LossSpec) -> None:
    """Shape checks shared by the chunked losses (dense and cached teacher)."""
    if student_head.shape[0] != student_h.shape[-1]:
        raise ValueError(f"student_head {student_head.shape} does not match hidden size "
                         f"{student_h.shape[-1]}; pass the (D, V) projection")
    if spec.needs_labels:
        if labels is None:
            raise ValueError("this loss has a cross_entropy term but no labels were given")
        if labels.shape != student_h.shape[:-1]:
            raise ValueError(f"labels have shape {labels.shape}, expected {student_h.shape[:-1]}")


def chunked_loss(student_h: Array, student_head: Array, teacher_h: Array | None,
                 teacher_head: Array | None, labels: Array | None, mask: Array, *,
                 spec: kd.LossSpec, chunk_size: int = 512, student_softcap: float | None = None,
                 teacher_softcap: float | None = None,
                 cotangent: dict[str, Array] | None = None) -> tuple[Array, kd.Metrics]:
    """``combined_loss(h_S @ head_S, h_T @ head_T, labels, mask, spec)`` without full logits.

    Args:
      student_h: (..., D_S) final student hidden states (after the final norm), e.g. (B, T, D).
      student_head: (D_S, V) student output projection (``models.lm_head(model)``).
      teacher_h: (..., D_T) teacher hidden states, or None when ``spec`` has no divergence terms.
      teacher_head: (D_T, V) teacher output projection, or None likewise.
      labels: (...) integer next-token labels, or None when ``spec`` has no cross_entropy.
      mask: (...) bool or float token weights.
      spec: the loss terms, their weights and options.
      chunk_size: tokens per chunk (of the flattened leading dims); the token count need not be
        divisible, the last chunk is padded with masked tokens.
      student_softcap, teacher_softcap: final-logit softcaps (``ModelConfig.final_logit_softcap``).
      cotangent: ``{term name: scalar}``, the cotangent each term's sum will receive when the
        caller differentiates (a training step knows it in advance: the term's weight over its
        count); given, each chunk's backward runs in the forward scan
        (:func:`fused_chunked_sums`), which saves recomputing the lm_heads. The values and
        gradients are the same either way.

    Returns:
      (loss, metrics), as ``kd.combined_loss``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    lead = student_h.shape[:-1]
    w_x = kd.token_weights(mask, lead)
    n = math.prod(lead)
    vocab = student_head.shape[-1]
    check_student_inputs(student_h, student_head, labels, spec)
    use_teacher = spec.needs_teacher
    if use_teacher:
        if teacher_h is None or teacher_head is None:
            raise ValueError("this loss has distillation terms; pass teacher_h and teacher_head")
        if teacher_h.shape[:-1] != lead or teacher_head.shape[0] != teacher_h.shape[-1]:
            raise ValueError(f"teacher_h {teacher_h.shape} / teacher_head {teacher_head.shape} "
                             f"do not match student tokens {lead}")
        if teacher_head.shape[-1] != vocab:
            raise ValueError(f"teacher vocabulary {teacher_head.shape[-1]} != student {vocab}; "
                             "same-vocabulary losses need equal sizes (slice a padded head to "
                             "the common tokenizer size first)")

    frozen_xs = {"w": w_x.reshape(n)}
    if use_teacher:
        teacher_head = jax.lax.stop_gradient(teacher_head)
        frozen_xs["ht"] = jax.lax.stop_gradient(teacher_h).reshape(n, -1)
    if spec.needs_labels:
        frozen_xs["labels"] = labels.reshape(n)

    def chunk_sums(head_s, head_t, c):
        zs_CV = logits_from_hidden(c["h"], head_s, student_softcap)
        zt_CV = logits_from_hidden(c["ht"], head_t, teacher_softcap) if use_teacher else None
        sums = kd.term_sums(zs_CV, zt_CV, c.get("labels"), c["w"], spec)
        return {name: sums[name] for name, _ in spec.terms}

    init = {name: jnp.zeros((), jnp.float32) for name, _ in spec.terms}
    xs = {"h": student_h.reshape(n, -1)}
    if cotangent is None:
        sums = chunked_sums(lambda c: chunk_sums(student_head, teacher_head, c), init,
                            {**xs, **frozen_xs}, chunk_size)
    else:
        sums = fused_chunked_sums(chunk_sums, init, student_head, teacher_head, xs, frozen_xs,
                                  {name: cotangent[name] for name, _ in spec.terms}, chunk_size)
    return kd.finalize(sums, kd.token_count(w_x), spec)
