"""Loss terms and teacher signals: the protocol, and the one registry of terms.

A **term** declares:

* ``name`` (its key in ``loss.terms`` and in the metrics: ``distill/<name>``);
* ``needs``: what it reads from the teacher signal, as capabilities (``TOKEN_DIST``: the
  teacher's next-token distribution over the student's vocabulary; ``TEACHER_LOGITS``: the live
  teacher's own logits; ``TEACHER_HIDDEN``: its final hidden states; ``TOKEN_SCALARS``: per
  teacher token the actual token's log-prob and the word-boundary log-mass; ``ALIGNMENT``: the
  byte alignment of two tokenizations; ``VOCAB_MAP``: a student -> teacher vocabulary map) —
  an empty set means it needs no teacher;
* ``vocabulary``: ``"shared"`` (compares distributions over one vocabulary: the teacher must
  use the student's tokenizer) or ``"aligned"`` (works across tokenizers through the chunk
  alignment); one run uses terms of one kind;
* its own params, if any (``init_params(key, student_width, teacher_width, spec)``; a
  projector, say), trained and checkpointed with the student but never part of the model;
* its normaliser: ``counts(spec, batch)``, counts over the whole global batch (computed before
  any micro-batch, so accumulation is exact), and ``normalise(sums, counts)``;
* its sums: ``sums(inputs)``, masked sums over one (micro-)batch (:class:`HeadInputs`).

A **teacher signal** (:class:`Signal`) declares the capabilities it provides and the batch keys
it brings: a live teacher with the student's tokenizer, a live teacher over aligned text (any
tokenizer), a cached top-k distribution, or cached cross-tokenizer per-token scalars. A run can
use a cache exactly when its terms' needs are a subset of what the cache provides
(:func:`check_signal`); every refusal and "did you mean" comes from these declarations. A
signal also declares its preparation, ``prepare(ctx, student_params, teacher_params, batch,
rng) -> batch``, run by the step over the whole global batch before anything else (the live
teacher's forward; for a future signal, say, sampling the student's own rows with ``rng``).

Add a term with :func:`register_term` (from any module, a test included), a signal by
declaring a :class:`Signal` and passing it to ``distill_jax.train.step.make_step``; the step
reads everything it needs from the declarations.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import zlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from distill_jax.losses import alm, chunked, dskd, kd, pld, redi, sparse, xtok, xtok_baselines

Array = jax.Array

# ---------------------------------------------------------------------------------------------
# Capabilities of a teacher signal
# ---------------------------------------------------------------------------------------------

TOKEN_DIST = "the teacher's next-token distribution over the student's vocabulary"
TEACHER_LOGITS = "the teacher's full next-token distributions"
TEACHER_HIDDEN = "the teacher's hidden states"
TOKEN_SCALARS = "the teacher's per-token log-probs and word-boundary mass"
ALIGNMENT = "the byte alignment of the two tokenizations"
VOCAB_MAP = "a student -> teacher vocabulary mapping"

# the order capabilities are named in messages
CAPABILITIES = (TEACHER_HIDDEN, TEACHER_LOGITS, TOKEN_DIST, TOKEN_SCALARS, ALIGNMENT, VOCAB_MAP)

SHARED, ALIGNED = "shared", "aligned"

# ---------------------------------------------------------------------------------------------
# Teacher signals
# ---------------------------------------------------------------------------------------------

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
CACHE_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logmass")
XTOK_KEYS = ("chunk_ids", "teacher_chunk_ids", "teacher_segment_ids")
XTOK_LIVE_KEYS = ("teacher_tokens", "teacher_positions", "teacher_targets")
XTOK_CACHE_KEYS = ("teacher_actual_logprob", "teacher_boundary_logmass", "teacher_valid")


@dataclasses.dataclass(frozen=True)
class Signal:
    """Where the teacher's side of the loss comes from: what it ``provides`` (capabilities),
    the ``batch_keys`` a batch carries for it, whether it is ``cached`` (no teacher runs), the
    ``vocabulary`` kind of the terms it serves, and its preparation hook.

    ``prepare(ctx, student_params, teacher_params, batch, rng) -> batch`` runs once per step
    over the whole global batch, before the normalisers are counted and before any
    micro-batch: it returns the batch the terms read (e.g. with the live teacher's hidden
    states or per-token numbers added). ``ctx`` is the step's context
    (``distill_jax.train.step.StepContext``: the model configs, the ``spec``, the terms'
    ``needs``, ``micro_batches``, ``chunk_size``, and helpers that run the frozen teacher over
    the batch's rows in row groups); ``student_params`` are the student model's current params
    (under ``stop_gradient``), ``rng`` a fresh key every step. None: the batch as it comes.

    ``metrics(batch) -> {name: scalar}``, if given, reports on the prepared batch (e.g. the
    rollout's lengths); the step adds them to its metrics. ``batch_ranks`` names the batch keys
    whose arrays are not (rows, length), with their rank (e.g. ``(("prompt_lengths", 1),)``);
    every batch array is sharded over its first (row) axis."""

    name: str
    provides: frozenset
    batch_keys: tuple[str, ...]
    cached: bool
    vocabulary: str
    prepare: Callable[..., Mapping[str, Array]] | None = None
    metrics: Callable[[Mapping[str, Array]], Mapping[str, Array]] | None = None
    batch_ranks: tuple[tuple[str, int], ...] = ()

    def rank(self, key: str) -> int:
        """The rank of the batch array ``key`` (2 unless ``batch_ranks`` says otherwise)."""
        return dict(self.batch_ranks).get(key, 2)


def _prepare_live_same(ctx, student_params, teacher_params, batch, rng):
    """The frozen teacher's final hidden states for every row (its lm_head is applied chunk by
    chunk inside the loss scan, so (batch, length, vocab) teacher logits never exist)."""
    if not ctx.needs:
        return batch
    return {**batch, "teacher_hidden": ctx.teacher_hidden(teacher_params, batch)}


def _prepare_aligned(ctx, batch, cached: bool):
    batch = dict(batch)
    chunk_ids, teacher_chunk_ids = xtok.trained_chunks(
        batch["chunk_ids"], batch["teacher_chunk_ids"], batch["loss_mask"],
        batch["teacher_valid"] if cached else None)
    batch["chunk_ids"], batch["teacher_chunk_ids"] = chunk_ids, teacher_chunk_ids
    return batch


def _prepare_live_aligned(ctx, student_params, teacher_params, batch, rng):
    """The frozen teacher over its rows (per-token numbers, and hidden states where a term needs
    them), then the chunks that train (:func:`xtok.trained_chunks`)."""
    batch = dict(batch)
    if ctx.needs:
        batch.update(ctx.teacher_token_stats(teacher_params, batch,
                                             keep_hidden=TEACHER_HIDDEN in ctx.needs))
    return _prepare_aligned(ctx, batch, cached=False)


def _prepare_cached_scalars(ctx, student_params, teacher_params, batch, rng):
    """The chunks that train, dropping those the cache marks invalid."""
    return _prepare_aligned(ctx, batch, cached=True)


LIVE_SAME = Signal("a live teacher with the student's tokenizer",
                   frozenset({TOKEN_DIST, TEACHER_LOGITS, TEACHER_HIDDEN}), BATCH_KEYS,
                   False, SHARED, _prepare_live_same)
LIVE_ALIGNED = Signal("a live teacher over aligned text",
                      frozenset({TEACHER_LOGITS, TEACHER_HIDDEN, TOKEN_SCALARS, ALIGNMENT,
                                 VOCAB_MAP}),
                      BATCH_KEYS + XTOK_KEYS + XTOK_LIVE_KEYS, False, ALIGNED,
                      _prepare_live_aligned)
CACHED_TOPK = Signal("a teacher cache (top-k log-probs per token)", frozenset({TOKEN_DIST}),
                     BATCH_KEYS + CACHE_KEYS, True, SHARED)
CACHED_SCALARS = Signal("a teacher cache (two numbers per teacher token)",
                        frozenset({TOKEN_SCALARS, ALIGNMENT}),
                        BATCH_KEYS + XTOK_KEYS + XTOK_CACHE_KEYS, True, ALIGNED,
                        _prepare_cached_scalars)
SIGNALS = (LIVE_SAME, LIVE_ALIGNED, CACHED_TOPK, CACHED_SCALARS)
# Pair records of a teacher's verified and rejected traces (``data.record: pairs``, written by
# ``distill-jax traces``): the teacher's signal is in the data itself, so no teacher runs.
TRACES = Signal("teacher traces (pair records)", frozenset(), BATCH_KEYS, False, ALIGNED)


def signal_for(vocabulary: str, cached: bool) -> Signal:
    """The built-in signal of a run whose terms are of ``vocabulary`` kind, live or
    ``cached``."""
    for s in SIGNALS:
        if s.vocabulary == vocabulary and s.cached == cached:
            return s
    raise ValueError(f"no teacher signal for {vocabulary} terms (cached={cached})")


# ---------------------------------------------------------------------------------------------
# Terms
# ---------------------------------------------------------------------------------------------


class HeadInputs:
    """What a term's ``sums`` reads for one (micro-)batch: the batch (with the teacher signal's
    arrays), the student's final hidden states and head, the frozen teacher's head and
    embeddings where a term needs them, the run's options (``spec``) and the terms' own params
    (``params[term]``). Shared intermediates (the student's per-token log-probs) are computed
    once, on first use."""

    def __init__(self, spec: Any, batch: Mapping[str, Array], *, student_h: Array,
                 student_head: Array, student_embed: Array | None = None,
                 teacher_head: Array | None = None, teacher_embed: Array | None = None,
                 student_word_start: Array | None = None, mined_map: Array | None = None,
                 student_softcap: float | None = None, teacher_softcap: float | None = None,
                 chunk_size: int = 512, params: Mapping[str, Any] | None = None,
                 tail: str = "bucket", shared_cotangent: Mapping[str, Array] | None = None):
        self.spec, self.batch = spec, batch
        self.student_h, self.student_head = student_h, student_head
        self.student_embed = student_embed
        self.teacher_head, self.teacher_embed = teacher_head, teacher_embed
        self.student_word_start, self.mined_map = student_word_start, mined_map
        self.student_softcap, self.teacher_softcap = student_softcap, teacher_softcap
        self.chunk_size = chunk_size
        self.params = dict(params or {})
        self.tail = tail
        # {term: the cotangent its sum will receive}: given (a training step whose loss is a
        # fixed combination of shared-vocabulary terms), the fused scan computes the gradient
        # in its forward pass instead of recomputing the lm_heads (chunked.fused_chunked_sums)
        self.shared_cotangent = shared_cotangent

    @functools.cached_property
    def student_token_stats(self) -> tuple[Array, Array]:
        """(log-prob of each target, log-mass of word-starting next tokens), per student token."""
        return alm.token_stats(self.student_h, self.student_head, self.batch["targets"],
                               self.student_word_start, softcap=self.student_softcap,
                               chunk_size=self.chunk_size)

    @functools.cached_property
    def shared_sums(self) -> dict[str, Array]:
        """The sums of every shared-vocabulary term of the spec, from one fused scan of the
        lm_head and the loss over token chunks: against the live teacher (``teacher_hidden`` in
        the batch, ``teacher_head``), the cached top-k (``teacher_topk_ids`` etc. in the batch,
        ``tail``), or no teacher."""
        b, spec = self.batch, self.spec
        if "teacher_topk_ids" in b:
            _, metrics = sparse.sparse_chunked_loss(
                self.student_h, self.student_head, b["teacher_topk_ids"],
                b["teacher_topk_logprobs"], b["teacher_tail_logmass"], b["targets"],
                b["loss_mask"], spec=spec, chunk_size=self.chunk_size,
                student_softcap=self.student_softcap, tail=self.tail,
                cotangent=self.shared_cotangent)
        else:
            _, metrics = chunked.chunked_loss(
                self.student_h, self.student_head, b.get("teacher_hidden"), self.teacher_head,
                b["targets"], b["loss_mask"], spec=spec, chunk_size=self.chunk_size,
                student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
                cotangent=self.shared_cotangent)
        return {kd.sum_key(name): metrics[kd.sum_key(name)] for name, _ in spec.terms}


def _tokens(spec, batch) -> dict[str, Array]:
    return {kd.TOKENS: jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)}


def _over(count_key: str) -> Callable:
    """``normalise``: the term's sum over one whole-batch count (at least 1)."""
    def normalise(name: str, sums: Mapping[str, Array], counts: Mapping[str, Array]) -> Array:
        return sums[kd.sum_key(name)] / jnp.maximum(counts[count_key], 1.0)
    return normalise


_TOKEN_MEAN = _over(kd.TOKENS)


@dataclasses.dataclass(frozen=True)
class Term:
    """A loss term's declaration (see the module docstring). ``sums`` is None for the
    shared-vocabulary terms the fused lm_head + loss scan computes (:func:`term_sums` reads
    them from ``HeadInputs.shared_sums``; ``per_token`` names their
    per-token math there, and ``chunk_sums(student_logits, teacher, labels, w, spec)`` a
    further shared-vocabulary term's sum over one chunk of tokens, ``teacher`` being the live
    teacher's logits or the cache's top-k; see ``kd.LossSpec.chunk_terms``).
    ``init_params(key, student_width, teacher_width, spec, dtype)`` returns the term's fresh
    params (or None: none this run); its key is the run's loss key
    folded with ``params_salt`` (default: a hash of the name), so it does not depend on the
    other terms of the run."""

    name: str
    needs: frozenset = frozenset()
    vocabulary: str = ALIGNED
    doc: str = ""
    sums: Callable[[HeadInputs], dict[str, Array]] | None = None
    counts: Callable[[Any, Mapping[str, Array]], dict[str, Array]] = _tokens
    normalise: Callable[[str, Mapping[str, Array], Mapping[str, Array]], Array] = \
        _TOKEN_MEAN
    init_params: Callable[..., Any] | None = None
    params_salt: int | None = None
    per_token: Callable | None = None
    chunk_sums: Callable | None = None
    batch_keys: tuple[str, ...] = ()  # batch arrays the term reads beyond its signal's

    def __post_init__(self):
        if self.vocabulary not in (SHARED, ALIGNED):
            raise ValueError(f"term {self.name!r}: vocabulary must be {SHARED!r} or {ALIGNED!r}")
        object.__setattr__(self, "needs", frozenset(self.needs))

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs)


# -- shared vocabulary (computed by the fused lm_head + loss scan) ----------------------------

def _divergence(name: str, doc: str) -> Term:
    return Term(name, {TOKEN_DIST}, SHARED, doc, per_token=kd.PER_TOKEN[name])


_SHARED_TERMS = (
    _divergence(kd.FORWARD_KL, "KL(teacher || student)"),
    _divergence(kd.REVERSE_KL, "KL(student || teacher)"),
    _divergence(kd.JSD, "GKD's generalised JSD(jsd_beta)"),
    _divergence(kd.JSD_SCALED, "JSD(jsd_beta) / (beta (1 - beta))"),
    _divergence(kd.TVD, "total variation distance"),
    _divergence(kd.SKEW_KL, "KL(teacher || skew mixture)"),
    _divergence(kd.SKEW_REVERSE_KL, "KL(student || skew mixture)"),
    Term(kd.CROSS_ENTROPY, frozenset(), SHARED, "next-token cross-entropy on the data"),
)


def _pld_chunk(student_logits, teacher, labels, w, spec) -> Array:
    if "logits" in teacher:
        return pld.pld_sums_from_logits(student_logits, labels, teacher["logits"], w,
                                        temperature=spec.temperature)
    return pld.pld_sums(student_logits, labels, teacher["topk_ids"], teacher["topk_logprobs"],
                        teacher["tail_logmass"], w, temperature=spec.temperature)


_SHARED_TERMS += (
    Term(pld.PLD, {TOKEN_DIST}, SHARED, "Plackett-Luce distillation: the label, then the "
         "teacher's ranking, weighted by its confidence", chunk_sums=_pld_chunk),
)


# -- aligned (cross-tokenizer) ----------------------------------------------------------------

def _sft_sums(x: HeadInputs) -> dict[str, Array]:
    logp, _ = x.student_token_stats
    return {kd.sum_key(xtok.SFT): -jnp.sum(jnp.where(x.batch["loss_mask"] > 0, logp, 0.0))}


def _alm_sums(x: HeadInputs) -> dict[str, Array]:
    b, s = x.batch, x.spec
    logp, boundary = x.student_token_stats
    out = alm.alm_sums(logp, boundary, b["chunk_ids"], b["segment_ids"],
                       jax.lax.stop_gradient(b["teacher_actual_logprob"]),
                       jax.lax.stop_gradient(b["teacher_boundary_logmass"]),
                       b["teacher_chunk_ids"], b["teacher_segment_ids"],
                       append_space=s.append_space, merge_threshold=s.merge_threshold,
                       distance=s.distance, tau=s.tau)
    return {kd.sum_key(xtok.ALM): out["sum"]}


def _alm_counts(spec, batch) -> dict[str, Array]:
    groups = alm.alm_groups(batch["teacher_boundary_logmass"], batch["teacher_chunk_ids"],
                            batch["teacher_segment_ids"], student_chunk_ids=batch["chunk_ids"],
                            merge_threshold=spec.merge_threshold)
    return {**_tokens(spec, batch), xtok.CHUNKS: jnp.asarray(groups["count"], jnp.float32)}


def _pair_counts(spec, batch) -> dict[str, Array]:
    _, _, mask = xtok_baselines.aligned_pairs(batch["chunk_ids"], batch["teacher_chunk_ids"])
    return {**_tokens(spec, batch), xtok.PAIRS: jnp.sum(mask).astype(jnp.float32)}


def _baseline_sums(name: str) -> Callable[[HeadInputs], dict[str, Array]]:
    def sums(x: HeadInputs) -> dict[str, Array]:
        b = x.batch
        spos, tpos, mask = xtok_baselines.aligned_pairs(b["chunk_ids"], b["teacher_chunk_ids"])
        hs = xtok.gather_rows(x.student_h, spos)
        ht = xtok.gather_rows(jax.lax.stop_gradient(b["teacher_hidden"]), tpos)
        total = xtok.pair_sums(x.spec, name, hs, x.student_head, ht,
                               jax.lax.stop_gradient(x.teacher_head), mask,
                               student_softcap=x.student_softcap,
                               teacher_softcap=x.teacher_softcap, chunk_size=x.chunk_size,
                               mined_map=x.mined_map)
        return {kd.sum_key(name): total}
    return sums


def _latents_sums(x: HeadInputs) -> dict[str, Array]:
    total = xtok.latents_sums(x.student_h, x.batch["teacher_hidden"], x.batch,
                              x.params.get(xtok.LATENTS))
    return {kd.sum_key(xtok.LATENTS): total}


def _latents_counts(spec, batch) -> dict[str, Array]:
    return {**_tokens(spec, batch), **xtok.latents_counts(batch)}


def _latents_normalise(name, sums, counts) -> Array:
    """Over the teacher's squared norm (a sum of squares: 0 gives 0, not a division by 0)."""
    norm = counts[xtok.LATENT_SCALE]
    return sums[kd.sum_key(name)] / jnp.where(norm > 0, norm, 1.0)


def _latents_init(key, student_width: int, teacher_width: int, spec, dtype) -> Any:
    if not spec.uses_projector(student_width, teacher_width):
        return None
    return xtok.init_projector(key, student_width, teacher_width, dtype)


def _dskd_sums(x: HeadInputs) -> dict[str, Array]:
    b = x.batch
    out = dskd.dskd_sums(
        h_s=x.student_h, head_s=x.student_head, emb_s=x.student_embed, tokens=b["tokens"],
        targets=b["targets"], loss_mask=b["loss_mask"], segment_ids=b["segment_ids"],
        h_t=b["teacher_hidden"], head_t=x.teacher_head, emb_t=x.teacher_embed,
        teacher_tokens=b["teacher_tokens"], teacher_targets=b["teacher_targets"],
        teacher_segment_ids=b["teacher_segment_ids"], teacher_mask=xtok.dskd_teacher_mask(b),
        params=x.params[xtok.DSKD], student_softcap=x.student_softcap,
        teacher_softcap=x.teacher_softcap, chunk_size=x.chunk_size)
    return {kd.sum_key(xtok.DSKD): out[dskd.CE_T2S] + out[dskd.KD_STUDENT],
            xtok.DSKD_TEACHER_SUM: out[dskd.KD_TEACHER],
            xtok.DSKD_T2S_CORRECT: out[dskd.T2S_CORRECT]}


def _dskd_counts(spec, batch) -> dict[str, Array]:
    counts = dskd.dskd_counts(targets=batch["targets"], loss_mask=batch["loss_mask"],
                              segment_ids=batch["segment_ids"],
                              teacher_segment_ids=batch["teacher_segment_ids"],
                              teacher_mask=xtok.dskd_teacher_mask(batch))
    return {**_tokens(spec, batch), xtok.DSKD_STUDENT: counts[dskd.STUDENT_TOKENS],
            xtok.DSKD_TEACHER: counts[dskd.TEACHER_TOKENS]}


def _dskd_normalise(name, sums, counts) -> Array:
    """Student-space sum over student positions plus teacher-space sum over teacher ones."""
    return (sums[kd.sum_key(name)] / jnp.maximum(counts[xtok.DSKD_STUDENT], 1.0)
            + sums[xtok.DSKD_TEACHER_SUM] / jnp.maximum(counts[xtok.DSKD_TEACHER], 1.0))


def _dskd_init(key, student_width: int, teacher_width: int, spec, dtype) -> Any:
    return dskd.init_dskd_params(key, student_width, teacher_width, dtype)


_ALIGNED_TERMS = (
    Term(xtok.SFT, frozenset(), ALIGNED, "the student's next-token cross-entropy",
         sums=_sft_sums),
    Term(xtok.ALM, {TOKEN_SCALARS, ALIGNMENT}, ALIGNED,
         "approximate likelihood matching of aligned chunks", sums=_alm_sums,
         counts=_alm_counts, normalise=_over(xtok.CHUNKS)),
    Term(xtok.ULD, {TEACHER_LOGITS, TEACHER_HIDDEN, ALIGNMENT}, ALIGNED,
         "universal logit distillation at aligned chunk starts", sums=_baseline_sums(xtok.ULD),
         counts=_pair_counts, normalise=_over(xtok.PAIRS)),
    Term(xtok.MINED, {TEACHER_LOGITS, TEACHER_HIDDEN, ALIGNMENT, VOCAB_MAP}, ALIGNED,
         "KL over a mined student -> teacher vocabulary map", sums=_baseline_sums(xtok.MINED),
         counts=_pair_counts, normalise=_over(xtok.PAIRS)),
    Term(xtok.LATENTS, {TEACHER_HIDDEN, ALIGNMENT}, ALIGNED,
         "hidden states after aligned chunks, relative squared error", sums=_latents_sums,
         counts=_latents_counts, normalise=_latents_normalise, init_params=_latents_init,
         params_salt=0),
    Term(xtok.DSKD, {TEACHER_LOGITS, TEACHER_HIDDEN, ALIGNMENT}, ALIGNED,
         "dual-space KD with cross-model attention", sums=_dskd_sums, counts=_dskd_counts,
         normalise=_dskd_normalise, init_params=_dskd_init, params_salt=1),
)


def _redi_sums(x: HeadInputs) -> dict[str, Array]:
    if x.student_word_start is not None:
        logp, _ = x.student_token_stats
    else:
        none_V = jnp.zeros((x.student_head.shape[-1],), bool)
        logp, _ = alm.token_stats(x.student_h, x.student_head, x.batch["targets"], none_V,
                                  softcap=x.student_softcap, chunk_size=x.chunk_size)
    return {kd.sum_key(redi.REDI): redi.redi_sums(logp, x.batch[redi.SEQUENCE_WEIGHT],
                                                  x.spec.redi_alpha)}


def _redi_counts(spec, batch) -> dict[str, Array]:
    return {**_tokens(spec, batch), redi.PAIRS: redi.pair_count(batch[redi.SEQUENCE_WEIGHT])}


_ALIGNED_TERMS += (
    Term(redi.REDI, frozenset(), ALIGNED, "REDI: length-normalised likelihood of verified "
         "teacher traces up, of rejected ones down (alpha), per pair", sums=_redi_sums,
         counts=_redi_counts, normalise=_over(redi.PAIRS), batch_keys=(redi.SEQUENCE_WEIGHT,)),
)

REGISTRY: dict[str, Term] = {t.name: t for t in _SHARED_TERMS + _ALIGNED_TERMS}


def register_term(term: Term, *, replace: bool = False) -> Term:
    """Add ``term`` to the registry (``replace`` to redefine a name); returns it."""
    if term.name in REGISTRY and not replace:
        raise ValueError(f"a loss term named {term.name!r} is already registered "
                         "(pass replace=True to redefine it)")
    if term.vocabulary == ALIGNED and term.sums is None:
        raise ValueError(f"term {term.name!r} needs a sums function")
    REGISTRY[term.name] = term
    return term


def get_term(name: str) -> Term:
    """The registered term ``name``; an unknown name raises with the closest known one."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss term {name!r}.{hint} Known: {', '.join(REGISTRY)}.")
    return REGISTRY[name]


def vocabulary_of(names: Iterable[str]) -> str:
    """``shared`` or ``aligned``: the kind of the terms ``names`` (checked, and not mixed)."""
    terms = [get_term(n) for n in names]
    if not terms:
        raise ValueError("a loss needs at least one term, e.g. loss.terms={forward_kl: 1.0}")
    kinds = {t.vocabulary for t in terms}
    if len(kinds) == 1:
        return kinds.pop()
    aligned = sorted(n for n in REGISTRY if REGISTRY[n].vocabulary == ALIGNED)
    shared = sorted(t.name for t in terms if t.vocabulary == SHARED)
    raise ValueError(
        f"loss term {shared[0]!r} is not a cross-tokenizer term: it compares distributions "
        "over one vocabulary, so it cannot mix with cross-tokenizer terms. The teacher and the "
        f"student have different tokenizers, so the terms are {', '.join(aligned)} (same-"
        "vocabulary divergences need one tokenizer).")


def chunk_terms(names: Iterable[str]) -> tuple:
    """``(name, chunk_sums)`` of the shared-vocabulary terms among ``names`` that declare one
    (``kd.LossSpec.chunk_terms``)."""
    return tuple((n, get_term(n).chunk_sums) for n in sorted(names)
                 if get_term(n).chunk_sums is not None)


def needs(names: Iterable[str]) -> frozenset:
    """Everything the terms ``names`` need from the teacher signal."""
    out: frozenset = frozenset()
    for n in names:
        out = out | get_term(n).needs
    return out


def batch_keys(signal: "Signal", names: Iterable[str]) -> tuple[str, ...]:
    """The batch arrays a step of the terms ``names`` reads: the signal's, then those a term
    declares beyond them (``Term.batch_keys``, e.g. REDI's per-token sequence weights), once
    each, in that order."""
    out = list(signal.batch_keys)
    for n in names:
        out += [k for k in get_term(n).batch_keys if k not in out]
    return tuple(out)


def needs_teacher(names: Iterable[str]) -> bool:
    return bool(needs(names))


def check_signal(names: Iterable[str], signal: Signal) -> None:
    """Refuse terms whose needs ``signal`` does not provide, naming what is missing and the
    fix (e.g. a term that reads hidden states, with a cache)."""
    for name in names:
        missing = get_term(name).needs - signal.provides
        if not missing:
            continue
        what = " and ".join(sorted(missing, key=lambda c: (c not in CAPABILITIES,
                                                           CAPABILITIES.index(c)
                                                           if c in CAPABILITIES else 0, c)))
        if signal.cached:
            fix = (f"Train it with a live teacher (unset teacher.cache) or drop {name} from "
                   "loss.terms")
        else:
            fix = f"Drop {name} from loss.terms"
        raise ValueError(f"{name} needs {what}, which {signal.name} does not provide. {fix}")


# ---------------------------------------------------------------------------------------------
# Sums, counts and means of a set of (aligned) terms
# ---------------------------------------------------------------------------------------------


def counts(spec: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
    """Every normaliser the terms of ``spec`` divide by, over the whole (global) batch."""
    out: dict[str, Array] = {}
    for name, _ in spec.terms:
        out.update(get_term(name).counts(spec, batch))
    return out


def term_sums(inputs: HeadInputs) -> dict[str, Array]:
    """Each term's sums over one (micro-)batch (keyed ``kd.sum_key(term)``, plus any extra sums
    a term reports)."""
    out: dict[str, Array] = {}
    for name, _ in inputs.spec.terms:
        term = get_term(name)
        if term.sums is None:  # a shared-vocabulary term of the fused lm_head + loss scan
            out[kd.sum_key(name)] = inputs.shared_sums[kd.sum_key(name)]
        else:
            out.update(term.sums(inputs))
    return out


def fused_cotangent(spec: Any, norms: Mapping[str, Array]) -> dict[str, Array] | None:
    """The cotangent each term's sum receives in a training step, when it is known before the
    terms run: every term a shared-vocabulary term of the fused lm_head + loss scan and the
    weights fixed (no GradMag). ``{term: weight / whole-batch count}``, computed by the same
    vjp the step applies, so the scan's forward-computed gradient is the one asked for; None
    otherwise (the scan then recomputes its chunks in the backward pass)."""
    names = [name for name, _ in spec.terms]
    if any(get_term(n).sums is not None for n in names):
        return None
    weights = spec.weights
    if getattr(spec, "balance", "none") != "none" and len(weights) > 1:
        return None
    zeros = {kd.sum_key(n): jnp.zeros((), jnp.float32) for n in names}
    _, vjp = jax.vjp(lambda s: normalised_terms(spec, s, norms), zeros)
    (ct,) = vjp({k: jnp.asarray(weights[k], jnp.float32) for k in names})
    return {n: ct[kd.sum_key(n)] for n in names}


def normalised_terms(spec: Any, sums: Mapping[str, Array], norms: Mapping[str, Array]
                     ) -> dict[str, Array]:
    """Each term's (micro-)batch sum divided by its whole-batch count, keyed by term name."""
    return {name: get_term(name).normalise(name, sums, norms) for name, _ in spec.terms}


def objective(spec: Any, sums: Mapping[str, Array], norms: Mapping[str, Array]) -> Array:
    """The weighted loss of a (micro-)batch's sums: sum_t w_t * sum_t / count_t, with the counts
    of the whole global batch (so micro-batch objectives add up to the batch's loss)."""
    total = jnp.zeros((), jnp.float32)
    for name, weight in spec.terms:
        total = total + weight * get_term(name).normalise(name, sums, norms)
    return total


def _token_means(spec: Any) -> bool:
    """Whether every term of ``spec`` is a mean over the loss tokens (the default normaliser)."""
    return all(get_term(n).normalise is _TOKEN_MEAN for n, _ in spec.terms)


def summarize(spec: Any, sums: Mapping[str, Array], norms: Mapping[str, Array]
              ) -> dict[str, Array]:
    """Metrics: each term's sum and mean, the counts, and the weighted total ``distill/loss``.
    When every term is a mean over the loss tokens, the weighted sum ``distill/loss_sum`` is
    reported too and the total is that sum over the token count (one division, as
    ``kd.combined_loss``); otherwise the total is :func:`objective`."""
    out = dict(sums)
    out.update(norms)
    for name, _ in spec.terms:
        out[kd.metric_key(name)] = get_term(name).normalise(name, sums, norms)
    if _token_means(spec):
        total = jnp.zeros((), jnp.float32)
        for name, weight in spec.terms:
            total = total + weight * sums[kd.sum_key(name)]
        out[kd.LOSS_SUM] = total
        out[kd.LOSS] = total / jnp.maximum(norms[kd.TOKENS], 1.0)
    else:
        out[kd.LOSS] = objective(spec, sums, norms)
    return out


def init_params(spec: Any, key: Array, student_width: int, teacher_width: int,
                dtype: Any) -> dict[str, Any]:
    """Fresh params of every term of ``spec`` that has some, keyed by term name."""
    out = {}
    for name, _ in spec.terms:
        term = get_term(name)
        if term.init_params is None:
            continue
        salt = term.params_salt if term.params_salt is not None \
            else zlib.crc32(name.encode()) & 0x7FFFFFFF
        p = term.init_params(jax.random.fold_in(key, salt), student_width, teacher_width, spec,
                             dtype)
        if p is not None:
            out[name] = p
    return out
