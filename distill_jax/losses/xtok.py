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
of the batch and the teacher alone, computed over the whole global batch before any
micro-batch, which keeps gradient accumulation and multi-host averaging exact. This module holds
the math; the terms' declarations (what each needs, its params, its sums and normaliser) are in
:mod:`distill_jax.losses.terms`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from distill_jax.losses import kd, redi

Array = jax.Array

ALM = "alm"
SFT = "sft"
ULD = "uld"
MINED = "mined"
LATENTS = "alm_latents"
DSKD = "dskd"
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
# every whole-batch normaliser of the built-in terms
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
      mined_exact: ``mined`` through the exact-match map with a rest bucket on each side
        (``xtok_baselines.mined_sums(..., bucket=True)``) instead of MinED's nearest-token map.
      balance: ``none`` (the configured weights) or ``gradmag`` (weights set every step so each
        term's gradient at the last layer's output has a size proportional to its weight;
        see :func:`balance_weights`).
      latents_projector: for ``alm_latents``, whether the student's hidden states pass through a
        trained linear projector to the teacher's width: None (only when the widths differ),
        True (always), False (never; the widths must be equal).
      redi_alpha: REDI's weight of the rejected traces, in ``[0, 1)``
        (:mod:`distill_jax.losses.redi`).
    """

    terms: Any = ((ALM, 1.0),)
    distance: str = "binary_ce"
    tau: float = 100.0
    append_space: bool = True
    merge_threshold: float | None = 0.1
    temperature: float = 1.0
    uld_top_k: int | None = None
    mined_exact: bool = False
    balance: str = "none"
    latents_projector: bool | None = None
    redi_alpha: float = redi.DEFAULT_ALPHA

    def __post_init__(self):
        items = self.terms.items() if isinstance(self.terms, Mapping) else self.terms
        terms = tuple(sorted((str(k), float(v)) for k, v in items))
        if not terms:
            raise ValueError("a cross-tokenizer loss needs at least one term, e.g. {alm: 1.0}")
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
        object.__setattr__(self, "redi_alpha", redi.check_alpha(self.redi_alpha))

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.terms)

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


def latents_counts(batch: Mapping[str, Array]) -> dict[str, Array]:
    """``alm_latents``' whole-batch normaliser: the chunk-end pairs it compares, and the
    teacher's squared hidden-state norm summed over them (needs ``batch["teacher_hidden"]``)."""
    _, tpos, mask = chunk_end_pairs(batch["chunk_ids"], batch["segment_ids"],
                                    batch["teacher_chunk_ids"], batch["teacher_segment_ids"])
    ht = gather_rows(jax.lax.stop_gradient(batch["teacher_hidden"]), tpos).astype(jnp.float32)
    return {LATENT_PAIRS: jnp.sum(mask).astype(jnp.float32),
            LATENT_SCALE: jnp.sum(jnp.where(mask, jnp.sum(jnp.square(ht), axis=-1), 0.0))}


def dskd_teacher_mask(batch: Mapping[str, Array]) -> Array:
    """The teacher positions DSKD's teacher-space KL covers: those whose target lies in a
    trained chunk (after :func:`trained_chunks`)."""
    return batch["teacher_chunk_ids"] >= 0


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
    hs = gather_rows(student_h, spos).astype(jnp.float32)
    ht = gather_rows(jax.lax.stop_gradient(teacher_h), tpos).astype(jnp.float32)
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


def gather_rows(x_BLD: Array, pos_BC: Array) -> Array:
    return jnp.take_along_axis(x_BLD, pos_BC[..., None], axis=1)


def pair_sums(spec: XtokSpec, name: str, hs_BCD: Array, head_s: Array, ht_BCD: Array,
               head_t: Array, w_BC: Array, *, student_softcap, teacher_softcap, chunk_size: int,
               mined_map: Array | None) -> Array:
    """A baseline's sum over aligned pairs, computing both sides' logits in pair chunks."""
    from distill_jax.losses import xtok_baselines
    from distill_jax.losses.chunked import chunked_sums, logits_from_hidden

    n = hs_BCD.shape[0] * hs_BCD.shape[1]
    xs = {"hs": hs_BCD.reshape(n, -1), "ht": ht_BCD.reshape(n, -1),
          "w": w_BC.reshape(n).astype(jnp.float32)}

    def pair_sum(c):
        zs = logits_from_hidden(c["hs"], head_s, student_softcap)
        zt = jax.lax.stop_gradient(logits_from_hidden(c["ht"], head_t, teacher_softcap))
        if name == ULD:
            out = xtok_baselines.uld_sums(zs, zt, c["w"], temperature=spec.temperature,
                                          top_k=spec.uld_top_k)
        else:
            out = xtok_baselines.mined_sums(zs, zt, mined_map, c["w"], temperature=spec.temperature,
                                            bucket=spec.mined_exact)
        return out["sum"]

    return chunked_sums(pair_sum, jnp.zeros((), jnp.float32), xs, chunk_size)


def weight_key(term: str) -> str:
    """Metric name of a term's effective weight (GradMag changes it every step)."""
    return f"{kd.PREFIX}weight_{term}"


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
