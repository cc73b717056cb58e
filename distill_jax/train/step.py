"""The training state and one pure step ``(state, teacher_params, batch) -> (state, metrics)``.

The teacher runs inside the same jitted step and is frozen by construction: its params are a
separate argument (never donated, never in the optimiser, never checkpointed) and its hidden
states and lm_head pass through ``stop_gradient``. The lm_head and the loss are computed
together in token chunks (``distill_jax.losses.chunked_loss``), so full (batch, length, vocab)
logits never exist. Gradient accumulation runs over micro-batches inside the step and divides
by the token count of the whole batch, so it is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import losses
from distill_jax.losses import terms
from distill_jax.models import Model, ModelConfig, hidden_states, lm_head

Array = jax.Array
BATCH_KEYS, CACHE_KEYS = terms.BATCH_KEYS, terms.CACHE_KEYS
XTOK_KEYS, XTOK_LIVE_KEYS, XTOK_CACHE_KEYS = \
    terms.XTOK_KEYS, terms.XTOK_LIVE_KEYS, terms.XTOK_CACHE_KEYS
# The state's params: ``{MODEL: the student's params, LOSS: {term name: that term's params}}``.
# The loss terms' params (the alm_latents projector, DSKD's projectors) are trained and
# checkpointed with the student but are not part of the model: export and eval read MODEL only.
MODEL, LOSS = "model", "loss"


def batch_keys(cached: bool, xtok: bool = False) -> tuple[str, ...]:
    """The batch arrays a step reads: those of its teacher signal (same tokenizer, live or
    cached top-k; or cross-tokenizer, live rows or the cached per-token numbers)."""
    return terms.signal_for(terms.ALIGNED if xtok else terms.SHARED, cached).batch_keys


GRAD_NORM = "train/grad_norm"
LEARNING_RATE = "train/lr"
PARAM_NORM = "train/param_norm"


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "params", "opt_state", "rng"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a checkpoint holds for the student: step, params, optimiser state, RNG."""

    step: Array
    params: Any
    opt_state: Any
    rng: Array

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int = 0,
               loss_params: dict[str, Any] | None = None) -> TrainState:
    """A fresh state for the student's ``params`` and the loss terms' ``loss_params`` (see
    :func:`init_loss_params`); the optimiser state is created with the params' shardings."""
    sharding = jax.tree.leaves(params)[0].sharding
    params = {MODEL: params, LOSS: dict(loss_params or {})}
    if isinstance(sharding, NamedSharding):  # scalars replicated on the params' mesh
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    # Moments follow their params' shardings; counters etc. are replicated on the same mesh.
    opt_state = jax.tree.map(
        lambda x: x if x.sharding.device_set == sharding.device_set else jax.device_put(x, sharding),
        jax.jit(optimizer.init)(params))
    step = jax.device_put(jnp.zeros((), jnp.int32), sharding)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), sharding)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


def _split_micro(batch: dict[str, Array], n: int) -> dict[str, Array]:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} micro-batches")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def teacher_view(teacher_cfg: ModelConfig | None, spec: losses.LossSpec, teacher_params: Any,
                 batch: dict[str, Array], cached: bool) -> tuple[Array, Array] | None:
    """The frozen live teacher's (hidden states, lm_head) of a same-tokenizer batch, or None
    when the loss needs no teacher or it comes from a cache."""
    if cached or not spec.needs_teacher:
        return None
    teacher = Model(teacher_cfg, jax.lax.stop_gradient(teacher_params))
    h_t = jax.lax.stop_gradient(hidden_states(teacher, batch["tokens"],
                                              positions=batch["positions"],
                                              segment_ids=batch["segment_ids"]))
    return h_t, jax.lax.stop_gradient(lm_head(teacher))


def head_sums(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, spec: losses.LossSpec,
              chunk_size: int, h_s: Array, head_s: Array, teacher: tuple | None,
              batch: dict[str, Array], tail: str | None = None) -> dict[str, Array]:
    """Summed loss terms and the token count from the student's final hidden states and
    lm_head: the chunked lm_head + loss, against the live teacher's (hidden states, head) or,
    with ``tail`` set, the cached top-k distribution in the batch (``CACHE_KEYS``)."""
    if tail is not None:
        from distill_jax.losses import sparse
        _, metrics = sparse.sparse_chunked_loss(
            h_s, head_s, batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
            batch["teacher_tail_logmass"], batch["targets"], batch["loss_mask"], spec=spec,
            chunk_size=chunk_size, student_softcap=student_cfg.final_logit_softcap, tail=tail)
        return {k: v for k, v in metrics.items() if k.endswith("_sum") or k == losses.TOKENS}
    h_t, head_t = teacher if teacher is not None else (None, None)
    _, metrics = losses.chunked_loss(
        h_s, head_s, h_t, head_t, batch["targets"], batch["loss_mask"], spec=spec,
        chunk_size=chunk_size, student_softcap=student_cfg.final_logit_softcap,
        teacher_softcap=teacher_cfg.final_logit_softcap if teacher_cfg else None)
    return {k: v for k, v in metrics.items() if k.endswith("_sum") or k == losses.TOKENS}


def _trunk(student_cfg: ModelConfig, model_params: Any, batch: dict[str, Array]):
    """The student's final hidden states and lm_head."""
    student = Model(student_cfg, model_params)
    h = hidden_states(student, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
    return h, lm_head(student)


def loss_sums(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, spec: losses.LossSpec,
              chunk_size: int, params: Any, teacher_params: Any,
              batch: dict[str, Array], tail: str | None = None) -> dict[str, Array]:
    """Summed loss terms and the token count of one (micro-)batch: the teacher forward (frozen),
    the student forward, and the chunked lm_head + loss. With ``tail`` set, the teacher is the
    cached top-k distribution in the batch (``CACHE_KEYS``) and no teacher runs."""
    teacher = teacher_view(teacher_cfg, spec, teacher_params, batch, tail is not None)
    h_s, head_s = _trunk(student_cfg, params[MODEL], batch)
    return head_sums(student_cfg, teacher_cfg, spec, chunk_size, h_s, head_s, teacher, batch,
                     tail)


def make_eval_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None,
                   spec: losses.LossSpec, *, chunk_size: int = 512,
                   cache_tail: str | None = None) -> Callable:
    """``(params, teacher_params, batch) -> sums`` of the loss terms, without an update
    (``params``: the state's params)."""
    keys = batch_keys(cache_tail is not None)

    def step(params, teacher_params, batch):
        return loss_sums(student_cfg, teacher_cfg, spec, chunk_size, params, teacher_params,
                         {k: batch[k] for k in keys}, cache_tail)
    return step


def make_train_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None,
                    spec: losses.LossSpec, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, *, grad_accum: int = 1,
                    chunk_size: int = 512, cache_tail: str | None = None) -> Callable:
    """Build the (unjitted) step. ``teacher_cfg`` may be None when the loss needs no teacher
    or when the teacher comes from a cache (``cache_tail`` = "bucket" or "renormalize")."""
    cached = cache_tail is not None
    terms.check_signal(dict(spec.terms), terms.signal_for(terms.SHARED, cached))
    if spec.needs_teacher and teacher_cfg is None and not cached:
        raise ValueError("the loss has distillation terms but no teacher model is configured")
    if spec.needs_teacher and not cached and teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ValueError(
            f"teacher vocab {teacher_cfg.vocab_size} != student vocab {student_cfg.vocab_size}: "
            "same-vocabulary losses need one tokenizer (use cross-tokenizer losses otherwise)")

    keys = batch_keys(cached)

    def step(state: TrainState, teacher_params: Any, batch: dict[str, Array]):
        from distill_jax.losses import xtok
        batch = {k: batch[k] for k in keys}
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32), 1.0)

        def grad_fn(params, mb):
            # One trunk backward with per-term head vjps, as in the cross-tokenizer step: the
            # trunk (params -> final hidden states and lm_head), every term's mean from them,
            # the terms' weights (GradMag or the configured ones), then the trunk once.
            teacher = teacher_view(teacher_cfg, spec, teacher_params, mb, cached)
            (h, head), trunk_vjp = jax.vjp(lambda p: _trunk(student_cfg, p, mb), params[MODEL])

            def head_terms(h, head):
                sums = head_sums(student_cfg, teacher_cfg, spec, chunk_size, h, head, teacher,
                                 mb, cache_tail)
                return {n: sums[losses.sum_key(n)] / total_tokens for n, _ in spec.terms}, sums

            normed, terms_vjp, sums = jax.vjp(head_terms, h, head, has_aux=True)
            weights = xtok.balance_weights(spec, normed, terms_vjp)
            g_h, g_head = terms_vjp({k: jnp.asarray(weights[k], jnp.float32) for k in normed})
            (grads,) = trunk_vjp((g_h, g_head))
            sums = dict(sums)
            sums.update({xtok.weight_key(k): w for k, w in weights.items()})
            return {MODEL: grads, LOSS: jax.tree.map(jnp.zeros_like, params[LOSS])}, sums

        grads, sums = _accumulate(grad_fn, state.params, batch, grad_accum)
        metrics = summarize(sums, spec)
        for name, _ in spec.terms:  # mean weight over micro-batches
            metrics[xtok.weight_key(name)] = sums[xtok.weight_key(name)] / grad_accum
        return _apply_update(state, grads, metrics, optimizer, schedule)

    return step


def _apply_update(state: TrainState, grads: Any, metrics: dict[str, Array],
                  optimizer: optax.GradientTransformation, schedule: optax.Schedule | None):
    """The optimiser update shared by every step: new state, plus norms and learning rate."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics[GRAD_NORM] = optax.tree.norm(grads)
    metrics[PARAM_NORM] = optax.tree.norm(params)
    if schedule is not None:
        metrics[LEARNING_RATE] = jnp.asarray(schedule(state.step), jnp.float32)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def _accumulate(grad_fn: Callable, params: Any, batch: dict[str, Array], grad_accum: int):
    """Gradients and summed metrics of ``grad_fn(params, micro_batch)`` over ``grad_accum``
    micro-batches (added up: each micro objective is already divided by whole-batch counts)."""
    if grad_accum == 1:
        return grad_fn(params, batch)
    micro = _split_micro(batch, grad_accum)

    def body(carry, mb):
        g, s = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (g, s)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums


# ---------------------------------------------------------------------------------------------
# Cross-tokenizer step

def init_loss_params(spec: Any, student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                     like: Any, seed: int = 0) -> dict[str, Any]:
    """Fresh params of the loss terms of ``spec`` that train some (``{term: params}``; empty
    when none does), replicated on the devices of the params ``like`` (width x width
    matrices, small next to the model)."""
    key = jax.random.fold_in(jax.random.key(seed), 0x1A7E)
    out = terms.init_params(spec, key, student_cfg.hidden_size, teacher_cfg.hidden_size,
                            jnp.dtype(student_cfg.param_dtype))
    sharding = jax.tree.leaves(like)[0].sharding
    if out and isinstance(sharding, NamedSharding):
        out = jax.device_put(out, NamedSharding(sharding.mesh, PartitionSpec()))
    return out


def teacher_token_stats(teacher_cfg: ModelConfig, teacher_params: Any, batch: dict[str, Array],
                        word_start: Array, *, chunk_size: int = 512, micro_batches: int = 1,
                        keep_hidden: bool = False) -> dict[str, Array]:
    """The live teacher over its rows of a cross-tokenizer batch (frozen): per teacher token the
    actual next token's log-prob and the log-mass of next tokens that start a word, and with
    ``keep_hidden`` its final hidden states. Runs ``micro_batches`` row groups one after the
    other, bounding activation memory as gradient accumulation does."""
    from distill_jax.losses import alm
    teacher = Model(teacher_cfg, jax.lax.stop_gradient(teacher_params))
    head = jax.lax.stop_gradient(lm_head(teacher))

    def one(mb):
        h = jax.lax.stop_gradient(hidden_states(
            teacher, mb["teacher_tokens"], positions=mb["teacher_positions"],
            segment_ids=mb["teacher_segment_ids"]))
        logp, boundary = alm.token_stats(h, head, mb["teacher_targets"], word_start,
                                         softcap=teacher_cfg.final_logit_softcap,
                                         chunk_size=chunk_size)
        out = {"teacher_actual_logprob": logp, "teacher_boundary_logmass": boundary}
        if keep_hidden:
            out["teacher_hidden"] = h
        return jax.lax.stop_gradient(out)

    keys = ("teacher_tokens", "teacher_positions", "teacher_segment_ids", "teacher_targets")
    sub = {k: batch[k] for k in keys}
    if micro_batches == 1:
        return one(sub)
    out = jax.lax.map(one, _split_micro(sub, micro_batches))
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), out)


def make_xtok_train_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, spec: Any,
                         optimizer: optax.GradientTransformation,
                         schedule: optax.Schedule | None = None, *, student_word_start: Any,
                         teacher_word_start: Any = None, mined_map: Any = None,
                         grad_accum: int = 1, chunk_size: int = 512, cached: bool = False,
                         eval_only: bool = False) -> Callable:
    """The cross-tokenizer step ``(state, teacher_params, batch) -> (state, metrics)``.

    ``spec`` is a :class:`distill_jax.losses.xtok.XtokSpec`. The teacher signal comes first for
    the whole batch: the live teacher over its rows (``teacher_token_stats``), or the cached
    per-token numbers in the batch (``cached``). Then the normalisers of every term are counted
    over the whole batch, and the student's micro-batches are differentiated one by one, each
    divided by those counts, so gradient accumulation is exact. With ``eval_only`` the function
    is ``(params, teacher_params, batch) -> metrics`` and no update happens.
    """
    from distill_jax.losses import xtok
    names = dict(spec.terms)
    terms.check_signal(names, terms.signal_for(terms.ALIGNED, cached))
    needs = terms.needs(names)
    if needs and not cached and teacher_cfg is None:
        raise ValueError("the cross-tokenizer loss needs a teacher model (or teacher.cache for alm)")
    if terms.VOCAB_MAP in needs and mined_map is None:
        raise ValueError("the mined term needs the student->teacher vocabulary mapping")
    s_word = jnp.asarray(student_word_start)
    t_word = None if teacher_word_start is None else jnp.asarray(teacher_word_start)
    keys = batch_keys(cached, xtok=True)
    live = bool(needs) and not cached

    def prepare(teacher_params, batch):
        batch = dict(batch)
        if live:
            batch.update(teacher_token_stats(
                teacher_cfg, teacher_params, batch, t_word, chunk_size=chunk_size,
                micro_batches=grad_accum, keep_hidden=terms.TEACHER_HIDDEN in needs))
        chunk_ids, teacher_chunk_ids = xtok.trained_chunks(
            batch["chunk_ids"], batch["teacher_chunk_ids"], batch["loss_mask"],
            batch["teacher_valid"] if cached else None)
        batch["chunk_ids"], batch["teacher_chunk_ids"] = chunk_ids, teacher_chunk_ids
        return batch, terms.counts(spec, batch)

    def teacher_parts(teacher_params):
        """The teacher's (lm_head, embedding table) where a term needs them, else None."""
        if terms.TEACHER_LOGITS not in needs:
            return None
        teacher = Model(teacher_cfg, jax.lax.stop_gradient(teacher_params))
        return lm_head(teacher), teacher.params["embed"]

    def trunk(params, mb):
        student = Model(student_cfg, params)
        h = hidden_states(student, mb["tokens"], positions=mb["positions"],
                          segment_ids=mb["segment_ids"])
        return h, lm_head(student)

    def head_sums(h, head, loss_params, embed, mb, teacher):
        head_t, embed_t = (None, None) if teacher is None else teacher
        return terms.term_sums(terms.HeadInputs(
            spec, mb, student_h=h, student_head=head, student_embed=embed,
            teacher_head=head_t, teacher_embed=embed_t, student_word_start=s_word,
            mined_map=None if mined_map is None else jnp.asarray(mined_map),
            student_softcap=student_cfg.final_logit_softcap,
            teacher_softcap=teacher_cfg.final_logit_softcap if teacher_cfg else None,
            chunk_size=chunk_size, params=loss_params))

    if eval_only:
        def evaluate(params, teacher_params, batch):
            """``(sums, counts)`` of the batch (:func:`terms.summarize` makes the means)."""
            batch, norms = prepare(teacher_params, {k: batch[k] for k in keys})
            model_p = params[MODEL]
            sums = head_sums(*trunk(model_p, batch), params[LOSS], model_p["embed"], batch,
                             teacher_parts(teacher_params))
            return sums, norms
        return evaluate

    def step(state: TrainState, teacher_params: Any, batch: dict[str, Array]):
        batch, norms = prepare(teacher_params, {k: batch[k] for k in keys})
        teacher = teacher_parts(teacher_params)

        def grad_fn(params, mb):
            # Forward once: the trunk (params -> final hidden states and lm_head), then every
            # term from them. Backward: each term's cotangent through the head region (one per
            # term with GradMag, which weighs terms by their gradient magnitude at the last
            # layer's output), then the trunk once with the weighted sum. The loss terms'
            # params (alm_latents / DSKD projectors) live in the head region.
            model_p, loss_p = params[MODEL], params[LOSS]
            (h, head), trunk_vjp = jax.vjp(lambda p: trunk(p, mb), model_p)
            embed = jax.lax.stop_gradient(model_p["embed"])  # read by DSKD's queries (frozen)

            def head_terms(h, head, loss_p):
                sums = head_sums(h, head, loss_p, embed, mb, teacher)
                return terms.normalised_terms(spec, sums, norms), sums

            normed, terms_vjp, sums = jax.vjp(head_terms, h, head, loss_p, has_aux=True)
            weights = xtok.balance_weights(spec, normed, terms_vjp)
            g_h, g_head, g_loss = terms_vjp(
                {k: jnp.asarray(weights[k], jnp.float32) for k in normed})
            (grads,) = trunk_vjp((g_h, g_head))
            sums = dict(sums)
            sums.update({xtok.weight_key(k): w for k, w in weights.items()})
            return {MODEL: grads, LOSS: g_loss}, sums

        grads, sums = _accumulate(grad_fn, state.params, batch, grad_accum)
        metrics = terms.summarize(spec, sums, norms)
        for name, _ in spec.terms:  # mean weight over micro-batches
            metrics[xtok.weight_key(name)] = sums[xtok.weight_key(name)] / grad_accum
        return _apply_update(state, grads, metrics, optimizer, schedule)

    return step


def summarize(sums: dict[str, Array], spec: losses.LossSpec) -> dict[str, Array]:
    """Means from summed metrics (sums and the token count are kept for exact averaging)."""
    tokens = sums[losses.TOKENS]
    out = dict(sums)
    for name, _ in spec.terms:
        out[losses.metric_key(name)] = sums[losses.sum_key(name)] / jnp.maximum(tokens, 1.0)
    out[losses.LOSS] = sums[losses.LOSS_SUM] / jnp.maximum(tokens, 1.0)
    return out


def jit_train_step(step: Callable, state: TrainState, teacher_params: Any, batch_sharding: Any,
                   keys: tuple[str, ...] = BATCH_KEYS):
    """``jax.jit`` with explicit in/out shardings taken from the live state, and the state
    donated. ``batch_sharding`` applies to every batch array (``keys``)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_params)
    batch_sh = {k: batch_sharding for k in keys}
    return jax.jit(step, in_shardings=(state_sh, teacher_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
