"""The training state and one step factory for training and evaluation.

:func:`make_step` builds ``(state, teacher_params, batch) -> (state, metrics)`` (with an
optimizer) or the evaluation function ``(params, teacher_params, batch) -> (sums, counts)``
(without one: the same objective, no update). Every run, whatever its terms and teacher signal,
goes through the same four stages:

1. **Prepare the signal** over the whole global batch: ``signal.prepare(ctx, student_params,
   teacher_params, batch, rng)`` (:class:`distill_jax.losses.terms.Signal`). The live teacher
   runs here, frozen, in row groups of ``grad_accum`` (bounding its activation memory as
   gradient accumulation bounds the student's): with the student's tokenizer its final hidden
   states, across tokenizers its per-token numbers; a cache needs nothing more. A new signal
   (e.g. the student's own samples) is a new ``Signal`` with its own ``prepare``; the step does
   not change.
2. **Count the normalisers** of every term over the whole batch (``terms.counts``), before any
   micro-batch, so each micro-batch's objective is divided by whole-batch counts and gradient
   accumulation is exact.
3. **Per micro-batch**: the student's trunk forward once (params -> final hidden states and
   lm_head), every term's sums from them (``terms.term_sums``: aligned terms by their own
   ``sums``, same-vocabulary terms by one fused scan of the lm_head and the loss over token
   chunks, so (batch, length, vocab) logits never exist), each term's cotangent through the
   head region (one vjp per term under GradMag), then one trunk backward with the weighted sum.
4. **Update** (training only): the optimiser, the norms, the learning rate, the next RNG.

The teacher is frozen by construction: its params are a separate argument (never donated,
never in the optimiser, never checkpointed) and everything read from it passes through
``stop_gradient``. A LoRA student (``student_cfg.lora``) is frozen the same way except for its
adapters: the state's model params are the adapters only (so gradients, optimiser state and
checkpoints hold nothing else), and the frozen argument is ``{TEACHER: the teacher's params,
STUDENT_BASE: the student's base params}`` (:func:`frozen_inputs`); the step joins base and
adapters for every forward and differentiates with respect to the adapters alone. Metrics are
``terms.summarize`` of the summed terms and counts, for training and evaluation alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax.losses import alm, terms, xtok
from distill_jax.models import Model, ModelConfig, hidden_states, lm_head, lora, quant

Array = jax.Array
BATCH_KEYS, CACHE_KEYS = terms.BATCH_KEYS, terms.CACHE_KEYS
XTOK_KEYS, XTOK_LIVE_KEYS, XTOK_CACHE_KEYS = \
    terms.XTOK_KEYS, terms.XTOK_LIVE_KEYS, terms.XTOK_CACHE_KEYS
# The state's params: ``{MODEL: the student's params, LOSS: {term name: that term's params}}``.
# The loss terms' params (the alm_latents projector, DSKD's projectors) are trained and
# checkpointed with the student but are not part of the model: export and eval read MODEL only.
MODEL, LOSS = "model", "loss"
# The frozen argument of a LoRA student's step: the teacher's params and the student's base.
TEACHER, STUDENT_BASE = "teacher", "student_base"
# folded into the state's key for the signal's preparation (sampling, say)
SIGNAL_SALT = 0x5167
LORA_DROPOUT_SALT = 0x10D5  # ... and for a LoRA student's adapter dropout
LORA_KEYS = "lora_dropout_keys"  # per-row dropout key data, added to the batch in training

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


def row_groups(fn: Callable[[dict[str, Array]], Any], batch: dict[str, Array],
               groups: int) -> Any:
    """``fn`` over ``groups`` equal groups of the batch's rows, one after the other, the
    outputs put back together row by row (``groups=1``: ``fn(batch)``)."""
    if groups == 1:
        return fn(batch)
    out = jax.lax.map(fn, _split_micro(batch, groups))
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), out)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a signal's ``prepare`` may read (see :class:`distill_jax.losses.terms.Signal`): the
    model configs, the loss ``spec``, the terms' ``needs`` (capabilities), ``micro_batches``
    (row groups to run a model in, as gradient accumulation does), ``chunk_size``, the word-start
    masks, and helpers that run the frozen teacher."""

    student_cfg: ModelConfig
    teacher_cfg: ModelConfig | None
    spec: Any
    needs: frozenset
    micro_batches: int = 1
    chunk_size: int = 512
    student_word_start: Array | None = None
    teacher_word_start: Array | None = None

    def teacher_hidden(self, teacher_params: Any, batch: dict[str, Array]) -> Array:
        """The frozen teacher's final hidden states over the batch's (student-tokenized) rows."""
        teacher = Model(self.teacher_cfg, jax.lax.stop_gradient(teacher_params))

        def one(mb):
            return jax.lax.stop_gradient(hidden_states(
                teacher, mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"]))
        keys = ("tokens", "positions", "segment_ids")
        return row_groups(one, {k: batch[k] for k in keys}, self.micro_batches)

    def teacher_token_stats(self, teacher_params: Any, batch: dict[str, Array], *,
                            keep_hidden: bool = False) -> dict[str, Array]:
        """:func:`teacher_token_stats` over the batch's teacher rows, in row groups."""
        return teacher_token_stats(self.teacher_cfg, teacher_params, batch,
                                   self.teacher_word_start, chunk_size=self.chunk_size,
                                   micro_batches=self.micro_batches, keep_hidden=keep_hidden)


def frozen_inputs(student_cfg: ModelConfig, teacher_params: Any, student_base: Any = None) -> Any:
    """The step's frozen argument: ``teacher_params`` itself, or for a LoRA student
    ``{TEACHER: teacher_params, STUDENT_BASE: student_base}``."""
    if student_cfg.lora is None:
        return teacher_params
    if student_base is None:
        raise ValueError("a LoRA student's step needs its frozen base params (student_base)")
    return {TEACHER: teacher_params, STUDENT_BASE: student_base}


def _unfreeze(student_cfg: ModelConfig, frozen: Any) -> tuple[Any, Any]:
    """``(teacher_params, student_base or None)`` from :func:`frozen_inputs`' argument."""
    if student_cfg.lora is None:
        return frozen, None
    return frozen[TEACHER], jax.lax.stop_gradient(frozen[STUDENT_BASE])


def _trunk(student_cfg: ModelConfig, model_params: Any, batch: dict[str, Array]):
    """The student's final hidden states and lm_head (a LoRA student's adapter dropout is on
    when the batch carries its keys)."""
    student = Model(student_cfg, model_params)
    h = hidden_states(student, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], lora_keys=batch.get(LORA_KEYS))
    return h, lm_head(student)


def _dropout_keys(student_cfg: ModelConfig, rng: Array, rows: int) -> Array | None:
    """Per-row key data for a LoRA student's adapter dropout (None: no dropout). One key per
    global row, so micro-batching does not change the masks."""
    spec = student_cfg.lora
    if spec is None or spec.dropout == 0:
        return None
    return jax.random.key_data(jax.random.split(jax.random.fold_in(rng, LORA_DROPOUT_SALT), rows))


def _check(student_cfg, teacher_cfg, spec, signal, needs, mined_map, student_word_start):
    names = dict(spec.terms)
    if terms.vocabulary_of(names) != signal.vocabulary:
        raise ValueError(f"the loss terms {sorted(names)} are {terms.vocabulary_of(names)}-"
                         f"vocabulary terms but the teacher signal ({signal.name}) serves "
                         f"{signal.vocabulary}-vocabulary ones")
    terms.check_signal(names, signal)
    if needs and not signal.cached and teacher_cfg is None:
        if signal.vocabulary == terms.ALIGNED:
            raise ValueError("the cross-tokenizer loss needs a teacher model (or teacher.cache "
                             "for alm)")
        raise ValueError("the loss has distillation terms but no teacher model is configured")
    if (signal.vocabulary == terms.SHARED and needs and not signal.cached
            and teacher_cfg.vocab_size != student_cfg.vocab_size):
        raise ValueError(
            f"teacher vocab {teacher_cfg.vocab_size} != student vocab {student_cfg.vocab_size}: "
            "same-vocabulary losses need one tokenizer (use cross-tokenizer losses otherwise)")
    if terms.VOCAB_MAP in needs and mined_map is None:
        raise ValueError("the mined term needs the student->teacher vocabulary mapping")
    if signal.vocabulary == terms.ALIGNED and student_word_start is None:
        raise ValueError("cross-tokenizer terms need the student's word-start mask "
                         "(student_word_start=tokens.word_start_mask(tokenizer, vocab_size))")


def make_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, spec: Any,
              signal: terms.Signal, optimizer: optax.GradientTransformation | None = None,
              schedule: optax.Schedule | None = None, *, grad_accum: int = 1,
              chunk_size: int = 512, tail: str = "bucket", student_word_start: Any = None,
              teacher_word_start: Any = None, mined_map: Any = None) -> Callable:
    """The one step of every run (see the module docstring), unjitted.

    With ``optimizer``: ``step(state, teacher_params, batch) -> (state, metrics)`` (for a LoRA
    student, ``teacher_params`` is :func:`frozen_inputs`' bundle and the state's model params
    are its adapters). Without:
    ``evaluate(params, teacher_params, batch, rng=None) -> (sums, counts)`` of the same
    objective (``params``: the state's params; ``rng``: the signal's key, default a fixed one;
    the signal's metrics join the sums; :func:`summarize` makes the metrics, after adding sums
    and counts over batches). ``spec``: a ``kd.LossSpec`` or ``xtok.XtokSpec``;
    ``signal``: the teacher signal (``terms.signal_for(vocabulary, cached)`` for the built-in
    ones); ``teacher_cfg`` may be None when no teacher runs. ``tail``: a cached top-k's tail
    convention. Cross-tokenizer terms need ``student_word_start`` (and a live teacher its
    ``teacher_word_start``), the mined term ``mined_map``."""
    needs = terms.needs(dict(spec.terms))
    _check(student_cfg, teacher_cfg, spec, signal, needs, mined_map, student_word_start)
    s_word = None if student_word_start is None else jnp.asarray(student_word_start)
    t_word = None if teacher_word_start is None else jnp.asarray(teacher_word_start)
    mined = None if mined_map is None else jnp.asarray(mined_map)
    live_logits = (not signal.cached and teacher_cfg is not None
                   and bool(needs & {terms.TOKEN_DIST, terms.TEACHER_LOGITS}))
    train = optimizer is not None
    ctx = StepContext(student_cfg, teacher_cfg, spec, needs,
                      micro_batches=grad_accum if train else 1, chunk_size=chunk_size,
                      student_word_start=s_word, teacher_word_start=t_word)

    def prepare(model_params, teacher_params, batch, rng):
        """The signal over the whole batch, and every term's whole-batch normalisers."""
        batch = {k: batch[k] for k in terms.batch_keys(signal, dict(spec.terms))}
        if signal.prepare is not None:
            batch = dict(signal.prepare(ctx, jax.lax.stop_gradient(model_params),
                                        teacher_params, batch, rng))
        return batch, terms.counts(spec, batch)

    def signal_metrics(batch):
        """The signal's report on the prepared batch (none for the built-in teachers)."""
        if signal.metrics is None:
            return {}
        return {k: jnp.asarray(v, jnp.float32) for k, v in signal.metrics(batch).items()}

    def teacher_parts(teacher_params):
        """The live teacher's (lm_head, embedding table) where a term reads them, else None."""
        if not live_logits:
            return None
        teacher = Model(teacher_cfg, jax.lax.stop_gradient(teacher_params))
        return jax.lax.stop_gradient(lm_head(teacher)), quant.value(teacher.params["embed"])

    def head_sums(h, head, loss_params, embed, mb, teacher, cotangent=None):
        head_t, embed_t = (None, None) if teacher is None else teacher
        return terms.term_sums(terms.HeadInputs(
            spec, mb, student_h=h, student_head=head, student_embed=embed,
            teacher_head=head_t, teacher_embed=embed_t, student_word_start=s_word,
            mined_map=mined, student_softcap=student_cfg.final_logit_softcap,
            teacher_softcap=teacher_cfg.final_logit_softcap if teacher_cfg else None,
            chunk_size=chunk_size, params=loss_params, tail=tail, shared_cotangent=cotangent))

    if not train:
        def evaluate(params, teacher_params, batch, rng=None):
            """``(sums, counts)`` of the batch (:func:`summarize` makes the metrics); the
            signal's metrics join the sums (a signal evaluated over several batches reports
            additive numbers there, e.g. ``onpolicy.eval_signal``'s)."""
            rng = jax.random.key(0) if rng is None else rng
            teacher_params, base = _unfreeze(student_cfg, teacher_params)
            model_p = lora.join(base, params[MODEL])
            batch, norms = prepare(model_p, teacher_params, batch, rng)
            sums = dict(head_sums(*_trunk(student_cfg, model_p, batch), params[LOSS],
                                  model_p["embed"], batch, teacher_parts(teacher_params)))
            sums.update(signal_metrics(batch))
            return sums, norms
        return evaluate

    def step(state: TrainState, teacher_params: Any, batch: dict[str, Array]):
        state_rng = jax.random.wrap_key_data(state.rng)
        rng = jax.random.fold_in(state_rng, SIGNAL_SALT)
        teacher_params, base = _unfreeze(student_cfg, teacher_params)
        batch, norms = prepare(lora.join(base, state.params[MODEL]), teacher_params, batch, rng)
        teacher = teacher_parts(teacher_params)
        # known in advance for fixed weights (whole-batch counts, so every micro-batch's): the
        # lm_head + loss scan then computes its gradient in the forward pass
        cotangent = terms.fused_cotangent(spec, norms)
        keys = _dropout_keys(student_cfg, state_rng, batch["tokens"].shape[0])
        if keys is not None:
            batch = {**batch, LORA_KEYS: keys}

        def grad_fn(params, mb):
            # Forward once: the trunk (params -> final hidden states and lm_head), then every
            # term from them. Backward: each term's cotangent through the head region (one per
            # term with GradMag, which weighs terms by their gradient magnitude at the last
            # layer's output), then the trunk once with the weighted sum. The loss terms'
            # params (alm_latents / DSKD projectors) live in the head region.
            # (a LoRA student: ``params[MODEL]`` are the adapters, joined with the frozen base)
            model_p, loss_p = params[MODEL], params[LOSS]
            (h, head), trunk_vjp = jax.vjp(
                lambda p: _trunk(student_cfg, lora.join(base, p), mb), model_p)
            # read by DSKD's queries (frozen)
            embed = jax.lax.stop_gradient(lora.join(base, model_p)["embed"])

            def head_terms(h, head, loss_p):
                sums = head_sums(h, head, loss_p, embed, mb, teacher, cotangent)
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
        metrics = summarize(spec, sums, norms)
        metrics.update(signal_metrics(batch))
        for name, _ in spec.terms:  # mean weight over micro-batches
            metrics[xtok.weight_key(name)] = sums[xtok.weight_key(name)] / grad_accum
        return _apply_update(state, grads, metrics, optimizer, schedule)

    return step


summarize = terms.summarize


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
    return row_groups(one, {k: batch[k] for k in keys}, micro_batches)


def rank_sharding(sharding: Any, ndim: int) -> Any:
    """A (rows, length) batch ``sharding`` for an array of rank ``ndim``: the same row axes,
    nothing else sharded."""
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) == ndim:
        return sharding
    spec = tuple(sharding.spec)[:1] + (None,) * (ndim - 1)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def jit_train_step(step: Callable, state: TrainState, teacher_params: Any, batch_sharding: Any,
                   keys: tuple[str, ...] = BATCH_KEYS, ranks: Any = None):
    """``jax.jit`` with explicit in/out shardings taken from the live state, and the state
    donated. ``batch_sharding`` applies to every batch array (``keys``), over its rows;
    ``ranks`` (``{key: rank}``) names the arrays that are not (rows, length)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_params)
    ranks = dict(ranks or {})
    batch_sh = {k: rank_sharding(batch_sharding, ranks.get(k, 2)) for k in keys}
    return jax.jit(step, in_shardings=(state_sh, teacher_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
