"""Cross-tokenizer loss terms on one packed batch: ALM, its companion ``sft``, and the baselines.

A cross-tokenizer batch holds the student's rows and the teacher's rows of the same bytes, with
``chunk_ids`` / ``teacher_chunk_ids`` saying which aligned chunk each position's target belongs to
(``distill_jax.xtok``). The terms:

* ``alm``: approximate likelihood matching of aligned chunks (``distill_jax.losses.alm``),
  normalised by the number of (merged) chunks of the whole global batch;
* ``sft``: the student's next-token cross-entropy on its own tokens, normalised by tokens;
* ``uld``, ``mined``: the token-level baselines (``distill_jax.losses.xtok_baselines``) on the
  pairs of positions that start the same chunk on both sides, normalised by pairs;
* ``alm_latents``: the student's final hidden states after each aligned chunk (the position
  whose input is the chunk's last token, on both sides the state after reading the same bytes)
  matched to the teacher's by squared error, through a linear projector when the widths differ
  (or when asked), normalised by the teacher's squared norm over the same chunks;
* ``dskd``: dual-space knowledge distillation with cross-model attention
  (``distill_jax.losses.dskd``), its student-space parts normalised by trained student tokens
  and its teacher-space part by teacher positions in trained chunks.

The teacher side of ``alm`` needs only two numbers per teacher token (the actual next token's
log-prob and the log-mass of next tokens that start a word), so it comes either from the live
teacher or from a cache. Each term is a masked *sum*; the normaliser of each term is a function
of the batch and the teacher alone (:func:`normalisers`), computed over the whole global batch
before any micro-batch, which keeps gradient accumulation and multi-host averaging exact.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from distill_jax.losses import alm, kd

Array = jax.Array

ALM = "alm"
SFT = "sft"
ULD = "uld"
MINED = "mined"
LATENTS = "alm_latents"
DSKD = "dskd"
TERMS = (ALM, SFT, ULD, MINED, LATENTS, DSKD)
DISTANCES = ("binary_ce", "abs", "reverse_binary_kl")
BALANCES = ("none", "gradmag")

CHUNKS = kd.PREFIX + "alm_chunks"   # number of (merged) chunks ALM averages over
PAIRS = kd.PREFIX + "aligned_pairs"  # number of chunk-start pairs the baselines average over
LATENT_PAIRS = kd.PREFIX + "latent_pairs"  # number of chunk-end pairs alm_latents compares
# sum over those pairs of the teacher's squared hidden-state norm: alm_latents' normaliser
LATENT_SCALE = kd.PREFIX + "latent_scale"
DSKD_STUDENT = kd.PREFIX + "dskd_student_tokens"  # student positions DSKD averages over
DSKD_TEACHER = kd.PREFIX + "dskd_teacher_tokens"  # teacher positions its teacher space averages over
DSKD_TEACHER_SUM = kd.PREFIX + "dskd_teacher_sum"  # the teacher-space part's sum
DSKD_T2S_CORRECT = kd.PREFIX + "dskd_t2s_correct"  # student positions its student-space KL covers
# every whole-batch normaliser
NORMS = (kd.TOKENS, CHUNKS, PAIRS, LATENT_PAIRS, LATENT_SCALE, DSKD_STUDENT, DSKD_TEACHER)


@dataclasses.dataclass(frozen=True)
class XtokSpec:
    """Weighted cross-tokenizer loss terms and their options (hashable: a static jit argument).

    Attributes:
      terms: term name (``alm``, ``sft``, ``uld``, ``mined``) -> weight; stored sorted.
      distance: ALM's distance between binarised chunk likelihoods (``binary_ce``, ``abs``,
        ``reverse_binary_kl``).
      tau: ALM's binarisation temperature (chunk probabilities are raised to ``1/tau``).
      append_space: ALM's boundary debias (score "these bytes, then a word boundary").
      merge_threshold: merge consecutive chunks until the teacher's boundary probability exceeds
        this (None: no merging).
      temperature: softmax temperature of the baselines' distributions.
      uld_top_k: truncate ULD's sorted probability vectors to their top k (None: exact).
      balance: ``none`` (the configured weights) or ``gradmag`` (weights set every step so each
        term's gradient at the last layer's output has a size proportional to its weight;
        see :func:`balance_weights`).
      latents_projector: for ``alm_latents``, whether the student's hidden states pass through a
        trained linear projector to the teacher's width: None (only when the widths differ),
        True (always), False (never; the widths must be equal).
    """

    terms: Any = ((ALM, 1.0),)
    distance: str = "binary_ce"
    tau: float = 100.0
    append_space: bool = True
    merge_threshold: float | None = 0.1
    temperature: float = 1.0
    uld_top_k: int | None = None
    balance: str = "none"
    latents_projector: bool | None = None

    def __post_init__(self):
        items = self.terms.items() if isinstance(self.terms, Mapping) else self.terms
        terms = tuple(sorted((str(k), float(v)) for k, v in items))
        if not terms:
            raise ValueError("a cross-tokenizer loss needs at least one term, e.g. {alm: 1.0}")
        for name, _ in terms:
            if name not in TERMS:
                close = difflib.get_close_matches(name, TERMS + kd.TERMS, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"loss term {name!r} is not a cross-tokenizer term.{hint} The teacher and the "
                    f"student have different tokenizers, so the terms are {', '.join(TERMS)} "
                    "(same-vocabulary divergences need one tokenizer).")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown ALM distance {self.distance!r}; known: {', '.join(DISTANCES)}")
        if self.balance not in BALANCES:
            raise ValueError(f"unknown loss balance {self.balance!r}; known: {', '.join(BALANCES)}")
        if not self.tau > 0:
            raise ValueError(f"the ALM binarisation temperature tau must be > 0, got {self.tau}")
        if self.merge_threshold is not None and not 0.0 < self.merge_threshold < 1.0:
            raise ValueError(f"merge_threshold must be in (0, 1) or null, got {self.merge_threshold}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "temperature", float(self.temperature))

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.terms)

    @property
    def needs_teacher_logits(self) -> bool:
        """Whether a term needs the teacher's full distributions (the baselines), not just the
        two per-token numbers ALM uses."""
        return any(name in (ULD, MINED) for name, _ in self.terms)

    @property
    def needs_teacher_hidden(self) -> bool:
        """Whether a term reads the live teacher's final hidden states (baselines, latents,
        DSKD)."""
        return self.needs_teacher_logits or LATENTS in self.weights or DSKD in self.weights

    @property
    def needs_teacher(self) -> bool:
        return any(name != SFT for name, _ in self.terms)

    def uses_projector(self, student_width: int, teacher_width: int) -> bool:
        """Whether ``alm_latents`` trains a projector between these hidden widths (raises when
        it is turned off but the widths differ)."""
        if LATENTS not in self.weights:
            return False
        if self.latents_projector is None:
            return student_width != teacher_width
        if not self.latents_projector and student_width != teacher_width:
            raise ValueError(
                f"alm_latents compares hidden states of width {student_width} (student) and "
                f"{teacher_width} (teacher): it needs a projector; set "
                "loss.latents_projector=null (or true)")
        return bool(self.latents_projector)


def trained_chunks(chunk_ids: Array, teacher_chunk_ids: Array, loss_mask: Array,
                   teacher_valid: Array | None = None) -> tuple[Array, Array]:
    """Chunk ids with every chunk dropped (set to -1 on both sides) that has an untrained
    student position (``loss_mask == 0``: a prompt token, say) or an invalid teacher position
    (``teacher_valid == 0``: a token a cache does not cover)."""
    B, L = chunk_ids.shape
    Lt = teacher_chunk_ids.shape[1]
    n = max(L, Lt)

    def bad_counts(ids, bad):
        seg = jnp.where(ids >= 0, ids, n)
        return jax.vmap(lambda s, b: jax.ops.segment_sum(b, s, num_segments=n + 1))(seg, bad)

    bad = bad_counts(chunk_ids, ((loss_mask <= 0) & (chunk_ids >= 0)).astype(jnp.int32))
    if teacher_valid is not None:
        bad = bad + bad_counts(teacher_chunk_ids,
                               ((teacher_valid <= 0) & (teacher_chunk_ids >= 0)).astype(jnp.int32))

    def drop(ids):
        hit = jnp.take_along_axis(bad, jnp.where(ids >= 0, ids, n), axis=1) > 0
        return jnp.where((ids >= 0) & ~hit, ids, -1)

    return drop(chunk_ids), drop(teacher_chunk_ids)


def normalisers(spec: XtokSpec, batch: Mapping[str, Array], teacher_boundary: Array | None,
                teacher_hidden: Array | None = None) -> dict[str, Array]:
    """The count each term's sum is divided by, from the whole (global) batch: trained student
    tokens (``sft``), merged chunks (``alm``; needs the teacher's boundary log-mass), aligned
    chunk-start pairs (``uld``, ``mined``), and for ``alm_latents`` the teacher's squared
    hidden-state norm summed over the chunk-end pairs (needs its final hidden states)."""
    out = {kd.TOKENS: jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)}
    if ALM in spec.weights:
        groups = alm.alm_groups(teacher_boundary, batch["teacher_chunk_ids"],
                                batch["teacher_segment_ids"], student_chunk_ids=batch["chunk_ids"],
                                merge_threshold=spec.merge_threshold)
        out[CHUNKS] = jnp.asarray(groups["count"], jnp.float32)
    if spec.needs_teacher_logits:
        from distill_jax.losses import xtok_baselines
        _, _, mask = xtok_baselines.aligned_pairs(batch["chunk_ids"], batch["teacher_chunk_ids"])
        out[PAIRS] = jnp.sum(mask).astype(jnp.float32)
    if LATENTS in spec.weights:
        _, tpos, mask = chunk_end_pairs(batch["chunk_ids"], batch["segment_ids"],
                                        batch["teacher_chunk_ids"], batch["teacher_segment_ids"])
        ht = _gather_rows(jax.lax.stop_gradient(teacher_hidden), tpos).astype(jnp.float32)
        out[LATENT_PAIRS] = jnp.sum(mask).astype(jnp.float32)
        out[LATENT_SCALE] = jnp.sum(jnp.where(mask, jnp.sum(jnp.square(ht), axis=-1), 0.0))
    if DSKD in spec.weights:
        from distill_jax.losses import dskd
        counts = dskd.dskd_counts(targets=batch["targets"], loss_mask=batch["loss_mask"],
                                  segment_ids=batch["segment_ids"],
                                  teacher_segment_ids=batch["teacher_segment_ids"],
                                  teacher_mask=dskd_teacher_mask(batch))
        out[DSKD_STUDENT] = counts[dskd.STUDENT_TOKENS]
        out[DSKD_TEACHER] = counts[dskd.TEACHER_TOKENS]
    return out


def dskd_teacher_mask(batch: Mapping[str, Array]) -> Array:
    """The teacher positions DSKD's teacher-space KL covers: those whose target lies in a
    trained chunk (after :func:`trained_chunks`)."""
    return batch["teacher_chunk_ids"] >= 0


def _norm_key(name: str) -> str:
    return {ALM: CHUNKS, SFT: kd.TOKENS, LATENTS: LATENT_SCALE, DSKD: DSKD_STUDENT}.get(name, PAIRS)


def _normalise(sums: Mapping[str, Array], norms: Mapping[str, Array], name: str) -> Array:
    """A term's (micro-)batch sum over its whole-batch normaliser: a count, for
    ``alm_latents`` a sum of squares (0 gives 0, not a division by zero), and for ``dskd`` its
    student-space sum over student positions plus its teacher-space sum over teacher ones."""
    total = sums[kd.sum_key(name)]
    norm = norms[_norm_key(name)]
    if name == LATENTS:
        return total / jnp.where(norm > 0, norm, 1.0)
    if name == DSKD:
        return (total / jnp.maximum(norm, 1.0)
                + sums[DSKD_TEACHER_SUM] / jnp.maximum(norms[DSKD_TEACHER], 1.0))
    return total / jnp.maximum(norm, 1.0)


def chunk_ends(chunk_ids_BL: Array, segment_ids_BL: Array, num_chunks: int
               ) -> tuple[Array, Array]:
    """Per chunk id, the position *after* the chunk's last target: its input is the chunk's
    last token, so its hidden state has read exactly the bytes up to the chunk's end. Valid
    where the chunk occurs and that position exists in the same document of the row."""
    from distill_jax.losses.xtok_baselines import last_positions
    length = chunk_ids_BL.shape[1]
    last_BC, valid_BC = last_positions(chunk_ids_BL, num_chunks)
    end_BC = last_BC + 1
    inside = end_BC < length
    end_BC = jnp.where(inside, end_BC, 0)
    seg_last = jnp.take_along_axis(segment_ids_BL, last_BC, axis=1)
    seg_end = jnp.take_along_axis(segment_ids_BL, end_BC, axis=1)
    valid_BC = valid_BC & inside & (seg_last > 0) & (seg_end == seg_last)
    return jnp.where(valid_BC, end_BC, 0), valid_BC


def chunk_end_pairs(chunk_ids_BL: Array, segment_ids_BL: Array, teacher_chunk_ids_BLt: Array,
                    teacher_segment_ids_BLt: Array) -> tuple[Array, Array, Array]:
    """``(student_pos_BC, teacher_pos_BC, mask_BC)``: per chunk id (C = L slots), the student
    and teacher positions that have just read the chunk (:func:`chunk_ends`), and whether both
    exist. Positions are 0 where masked."""
    num_chunks = chunk_ids_BL.shape[1]
    spos, svalid = chunk_ends(chunk_ids_BL, segment_ids_BL, num_chunks)
    tpos, tvalid = chunk_ends(teacher_chunk_ids_BLt, teacher_segment_ids_BLt, num_chunks)
    mask = svalid & tvalid
    return jnp.where(mask, spos, 0), jnp.where(mask, tpos, 0), mask


def latents_sums(student_h: Array, teacher_h: Array, batch: Mapping[str, Array],
                 projector: Mapping[str, Array] | None = None) -> Array:
    """``alm_latents``' sum over the chunk-end pairs of ``||P(h_student) - h_teacher||^2`` (fp32),
    with ``P(x) = x @ kernel + bias`` when a ``projector`` is given, else the identity."""
    spos, tpos, mask = chunk_end_pairs(batch["chunk_ids"], batch["segment_ids"],
                                       batch["teacher_chunk_ids"], batch["teacher_segment_ids"])
    hs = _gather_rows(student_h, spos).astype(jnp.float32)
    ht = _gather_rows(jax.lax.stop_gradient(teacher_h), tpos).astype(jnp.float32)
    if projector is not None:
        hs = hs @ projector["kernel"].astype(jnp.float32) + projector["bias"].astype(jnp.float32)
    if hs.shape[-1] != ht.shape[-1]:
        raise ValueError(f"alm_latents compares student hidden states of width {hs.shape[-1]} "
                         f"with the teacher's of width {ht.shape[-1]}: it needs a projector "
                         "(train.step.add_latents_projector)")
    return jnp.sum(jnp.where(mask, jnp.sum(jnp.square(hs - ht), axis=-1), 0.0))


def init_projector(key: Array, student_width: int, teacher_width: int,
                   dtype: Any = jnp.float32) -> dict[str, Array]:
    """A fresh ``alm_latents`` projector: kernel (student_width, teacher_width) with entries
    N(0, 1/student_width) (so it keeps the scale of its input), bias zero."""
    kernel = jax.random.normal(key, (student_width, teacher_width), jnp.float32)
    return {"kernel": (kernel / jnp.sqrt(float(student_width))).astype(dtype),
            "bias": jnp.zeros((teacher_width,), dtype)}


def _gather_rows(x_BLD: Array, pos_BC: Array) -> Array:
    return jnp.take_along_axis(x_BLD, pos_BC[..., None], axis=1)


def _pair_sums(spec: XtokSpec, name: str, hs_BCD: Array, head_s: Array, ht_BCD: Array,
               head_t: Array, w_BC: Array, *, student_softcap, teacher_softcap, chunk_size: int,
               mined_map: Array | None) -> Array:
    """A baseline's sum over aligned pairs, computing both sides' logits in pair chunks."""
    from distill_jax.losses import xtok_baselines
    from distill_jax.losses.chunked import _chunks, logits_from_hidden

    n = hs_BCD.shape[0] * hs_BCD.shape[1]
    size = max(1, min(chunk_size, n))
    k = -(-n // size)
    xs = {"hs": _chunks(hs_BCD.reshape(n, -1), k, size), "ht": _chunks(ht_BCD.reshape(n, -1), k, size),
          "w": _chunks(w_BC.reshape(n).astype(jnp.float32), k, size)}

    def body(total, c):
        zs = logits_from_hidden(c["hs"], head_s, student_softcap)
        zt = jax.lax.stop_gradient(logits_from_hidden(c["ht"], head_t, teacher_softcap))
        if name == ULD:
            out = xtok_baselines.uld_sums(zs, zt, c["w"], temperature=spec.temperature,
                                          top_k=spec.uld_top_k)
        else:
            out = xtok_baselines.mined_sums(zs, zt, mined_map, c["w"], temperature=spec.temperature)
        return total + out["sum"], None

    total, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), jnp.zeros((), jnp.float32), xs)
    return total


def term_sums(spec: XtokSpec, batch: Mapping[str, Array], *, student_h: Array, student_head: Array,
              student_word_start: Array, teacher_logp: Array | None, teacher_boundary: Array | None,
              teacher_h: Array | None = None, teacher_head: Array | None = None,
              student_softcap: float | None = None, teacher_softcap: float | None = None,
              mined_map: Array | None = None, chunk_size: int = 512,
              projector: Mapping[str, Array] | None = None,
              dskd_params: Mapping[str, Array] | None = None, student_embed: Array | None = None,
              teacher_embed: Array | None = None) -> dict[str, Array]:
    """Each term's sum over one (micro-)batch, keyed by ``kd.sum_key(term)``.

    ``student_h`` are the student's final hidden states (B, L, D) and ``student_head`` its (D, V)
    projection; ``teacher_logp`` / ``teacher_boundary`` (B, Lt) the teacher's per-token numbers
    (for ``alm``); ``teacher_h`` / ``teacher_head`` its hidden states and head (for the baselines;
    ``alm_latents`` needs ``teacher_h``, and ``projector`` when the widths differ; ``dskd``
    needs ``teacher_h``, ``teacher_head``, both embedding tables, the teacher's tokens and
    targets in ``batch``, and its ``dskd_params``).
    """
    w = spec.weights
    sums: dict[str, Array] = {}
    logp, boundary = alm.token_stats(student_h, student_head, batch["targets"], student_word_start,
                                     softcap=student_softcap, chunk_size=chunk_size)
    if SFT in w:
        sums[kd.sum_key(SFT)] = -jnp.sum(jnp.where(batch["loss_mask"] > 0, logp, 0.0))
    if ALM in w:
        out = alm.alm_sums(logp, boundary, batch["chunk_ids"], batch["segment_ids"],
                           jax.lax.stop_gradient(teacher_logp), jax.lax.stop_gradient(teacher_boundary),
                           batch["teacher_chunk_ids"], batch["teacher_segment_ids"],
                           append_space=spec.append_space, merge_threshold=spec.merge_threshold,
                           distance=spec.distance, tau=spec.tau)
        sums[kd.sum_key(ALM)] = out["sum"]
    if spec.needs_teacher_logits:
        from distill_jax.losses import xtok_baselines
        spos, tpos, mask = xtok_baselines.aligned_pairs(batch["chunk_ids"], batch["teacher_chunk_ids"])
        hs = _gather_rows(student_h, spos)
        ht = _gather_rows(jax.lax.stop_gradient(teacher_h), tpos)
        for name in (ULD, MINED):
            if name in w:
                sums[kd.sum_key(name)] = _pair_sums(
                    spec, name, hs, student_head, ht, jax.lax.stop_gradient(teacher_head), mask,
                    student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                    chunk_size=chunk_size, mined_map=mined_map)
    if LATENTS in w:
        if teacher_h is None:
            raise ValueError("alm_latents needs the live teacher's hidden states (teacher_h)")
        sums[kd.sum_key(LATENTS)] = latents_sums(student_h, teacher_h, batch, projector)
    if DSKD in w:
        from distill_jax.losses import dskd
        if dskd_params is None or teacher_h is None or teacher_head is None \
                or student_embed is None or teacher_embed is None:
            raise ValueError("dskd needs the live teacher's hidden states, head and embeddings, "
                             "the student's embeddings, and its projectors (dskd_params; see "
                             "train.step.add_aux_params)")
        out = dskd.dskd_sums(
            h_s=student_h, head_s=student_head, emb_s=student_embed, tokens=batch["tokens"],
            targets=batch["targets"], loss_mask=batch["loss_mask"],
            segment_ids=batch["segment_ids"], h_t=teacher_h, head_t=teacher_head,
            emb_t=teacher_embed, teacher_tokens=batch["teacher_tokens"],
            teacher_targets=batch["teacher_targets"],
            teacher_segment_ids=batch["teacher_segment_ids"],
            teacher_mask=dskd_teacher_mask(batch), params=dskd_params,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            chunk_size=chunk_size)
        sums[kd.sum_key(DSKD)] = out[dskd.CE_T2S] + out[dskd.KD_STUDENT]
        sums[DSKD_TEACHER_SUM] = out[dskd.KD_TEACHER]
        sums[DSKD_T2S_CORRECT] = out[dskd.T2S_CORRECT]
    return sums


def weight_key(term: str) -> str:
    """Metric name of a term's effective weight (GradMag changes it every step)."""
    return f"{kd.PREFIX}weight_{term}"


def normalised_terms(spec: XtokSpec, sums: Mapping[str, Array], norms: Mapping[str, Array]
                     ) -> dict[str, Array]:
    """Each term's (micro-)batch sum divided by its whole-batch count, keyed by term name."""
    return {name: _normalise(sums, norms, name) for name, _ in spec.terms}


def balance_weights(spec: XtokSpec, normed: Mapping[str, Array], vjp) -> dict[str, Array]:
    """The weight of every term in the gradient. ``balance="none"``: the configured weights.
    ``balance="gradmag"`` (GradMag): weights proportional to configured weight / ||g_t||, where
    g_t is the gradient of the term at the student's last-layer output (the final hidden
    states), rescaled to the configured weights' total, so every term moves the last layer by
    an amount proportional to its configured weight. ``vjp`` maps a cotangent per term (a dict
    like ``normed``) to the gradients w.r.t. (hidden states, lm_head); the weights carry no
    gradient. With gradient accumulation they are set per micro-batch."""
    configured = spec.weights
    if spec.balance == "none" or len(configured) == 1:
        return {k: jnp.asarray(configured[k], jnp.float32) for k in normed}
    raw = {}
    for name in normed:
        onehot = {k: jnp.asarray(1.0 if k == name else 0.0, jnp.float32) for k in normed}
        g_h = vjp(onehot)[0]
        raw[name] = configured[name] / (jnp.sqrt(jnp.sum(jnp.square(g_h.astype(jnp.float32))))
                                        + 1e-12)
    total = sum(configured.values())
    scale = total / jnp.maximum(sum(raw.values()), 1e-12)
    return {k: jax.lax.stop_gradient(v * scale) for k, v in raw.items()}


def objective(spec: XtokSpec, sums: Mapping[str, Array], norms: Mapping[str, Array]) -> Array:
    """The weighted loss of a (micro-)batch's sums: sum_t w_t * sum_t / count_t, with the counts
    of the whole global batch (so micro-batch objectives add up to the batch's loss)."""
    total = jnp.zeros((), jnp.float32)
    for name, weight in spec.terms:
        total = total + weight * _normalise(sums, norms, name)
    return total


def summarize(spec: XtokSpec, sums: Mapping[str, Array], norms: Mapping[str, Array]) -> dict[str, Array]:
    """Metrics: each term's sum and mean, the counts, and the weighted total ``distill/loss``."""
    out = dict(sums)
    out.update(norms)
    for name, _ in spec.terms:
        out[kd.metric_key(name)] = _normalise(sums, norms, name)
    out[kd.LOSS] = objective(spec, sums, norms)
    return out
