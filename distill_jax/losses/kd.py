"""Same-vocabulary distillation losses: pure functions of logits, fp32 inside, masked.

Every divergence has the signature::

    fn(student_logits_xV, teacher_logits_xV, mask_x, *, temperature=1.0, **options)
        -> (loss, metrics)

``x`` is any leading shape (typically ``B, T``) and ``V`` the vocabulary. Logits may be any float
dtype; they are cast to fp32, divided by the temperature ``T`` and turned into log-probabilities
with ``log_softmax``. The per-token divergence is multiplied by ``T**2`` (so gradient magnitudes
do not shrink as ``T`` grows), weighted by ``mask`` (bool or float weights), summed, and divided
by the number of unmasked tokens (the sum of the weights; the loss is 0 when there are none).
``metrics`` holds the mean (``distill/<name>``), the weighted sum (``distill/<name>_sum``) and the
token count (``distill/tokens``), so a multi-host average is ``sum(sums) / sum(tokens)`` exactly.

Notation: ``p_T`` is the teacher distribution, ``p_S`` the student's, both at temperature T.

- ``forward_kl``:      KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)
- ``reverse_kl``:      KL(p_S || p_T)
- ``jsd`` (``beta``):  the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024),
  numerically TRL's ``GKDTrainer.generalized_jsd_loss`` (times ``T**2``, as every divergence
  here), endpoints included::

      jsd_beta = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m),   m = beta p_T + (1 - beta) p_S
      jsd_0    = KL(p_T || p_S)  (forward KL),   jsd_1 = KL(p_S || p_T)  (reverse KL).

  As TRL does, the endpoints are defined separately: the interior formula itself vanishes at
  both ends (``jsd_beta = beta KL(p_T || p_S) + O(beta**2)``), so the family jumps there. At
  beta = 1/2 it is the usual Jensen-Shannon divergence (bounded by ``log 2``), and weights and
  ``beta`` values carry over from TRL / GKD recipes unchanged.
- ``jsd_scaled`` (``beta``): ``jsd_beta / (beta (1 - beta))`` for 0 < beta < 1, with the same
  endpoints (Nielsen's scaled skew Jensen-Shannon divergence): continuous in beta, the two KLs
  being its limits; at beta = 1/2 it is four times ``jsd``. The gradient direction is that of
  ``jsd``; only its scale differs, by the constant ``1 / (beta (1 - beta))``.
- ``tvd``:             total variation 0.5 * sum_v |p_T - p_S|
- ``skew_kl`` (``alpha``):          KL(p_T || alpha p_T + (1 - alpha) p_S)   (DistiLLM's SKL)
- ``skew_reverse_kl`` (``alpha``):  KL(p_S || alpha p_S + (1 - alpha) p_T)   (DistiLLM's SRKL)
  alpha = 0 gives the plain KL; alpha = 1 gives 0.

``cross_entropy(student_logits, labels, mask)`` is next-token cross-entropy on integer labels
(already shifted by the caller), never temperature-scaled.

Numerics: ``0 * log 0 = 0`` everywhere, so vocabulary entries with ``-inf`` logits on both sides
(padded vocabularies) contribute exactly 0 to the loss and to the gradients. Logits at masked
positions are replaced by zeros before anything is computed, so whatever they hold (even ``nan``
or ``-inf``) changes neither the loss nor the gradients. Mask weights <= 0 mean "masked". Mixture
log-ratios log(w_c + w q/p) use ``log1p(w expm1(.))`` (``logaddexp`` far out), with w and 1 - w
formed in double precision, so ``jsd`` and ``jsd_scaled`` keep their fp32 accuracy as beta
approaches 0 or 1 (~1e-7 relative against float64 at beta = 1e-5 and 1 - 1e-5; a naive form
loses ~1e-8 / beta). The skew KLs with alpha very close to 1 are O((1 - alpha)**2) and lose
relative (not absolute) accuracy there.

``LossSpec`` + ``combined_loss`` sum weighted terms (what the run config builds from YAML:
``loss: {terms: {forward_kl: 1.0, cross_entropy: 0.1}, temperature: 2.0, jsd_beta: 0.5}``);
``distill_jax.losses.chunked.chunked_loss`` computes the same thing from hidden states without
ever materialising the full logits.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

PREFIX = "distill/"
FORWARD_KL = "forward_kl"
REVERSE_KL = "reverse_kl"
JSD = "jsd"
JSD_SCALED = "jsd_scaled"
TVD = "tvd"
SKEW_KL = "skew_kl"
SKEW_REVERSE_KL = "skew_reverse_kl"
CROSS_ENTROPY = "cross_entropy"

DIVERGENCE_TERMS = (FORWARD_KL, REVERSE_KL, JSD, JSD_SCALED, TVD, SKEW_KL, SKEW_REVERSE_KL)
TERMS = DIVERGENCE_TERMS + (CROSS_ENTROPY,)

TOKENS = PREFIX + "tokens"          # number (sum of weights) of unmasked tokens
LOSS = PREFIX + "loss"              # the weighted total of a combined loss
LOSS_SUM = PREFIX + "loss_sum"


def metric_key(term: str) -> str:
    """Metric name of a term's mean, e.g. ``distill/forward_kl``."""
    return PREFIX + term


def sum_key(term: str) -> str:
    """Metric name of a term's masked sum, e.g. ``distill/forward_kl_sum``."""
    return PREFIX + term + "_sum"


# ---------------------------------------------------------------------------------------------
# Per-token math on log-probabilities (fp32, last axis is the vocabulary)
# ---------------------------------------------------------------------------------------------


def kl_divergence(logp_xV: Array, logq_xV: Array) -> Array:
    """KL(p || q) per token, with 0 log 0 = 0 (entries where p = 0 contribute nothing)."""
    live = logp_xV > -jnp.inf
    diff = jnp.where(live, logp_xV - logq_xV, 0.0)
    return jnp.sum(jnp.exp(logp_xV) * diff, axis=-1)


_EXP_SAFE = 80.0  # e^80 ~ 5.5e34: expm1 of anything below cannot overflow fp32


def _log_mix_ratio(w: float, w_c: float, x: Array) -> Array:
    """log(w_c + w e^x) with w_c = 1 - w, 0 < w < 1, x in [-inf, inf], accurately.

    Mostly log1p(w expm1(x)): accurate to a few ulps whenever its argument is >= -1/2, which
    keeps the relative accuracy of results near 0 (close distributions, or a small weight w).
    Below that (x very negative, w near 1) log1p would amplify the rounding of 1 + y, and above
    x = 80 expm1 would overflow; there logaddexp(log w_c, log w + x) is used, accurate in
    absolute terms while the result is at least log 2 in magnitude. Each branch gets safe
    inputs, so neither leaks an inf or nan into the gradient. ``w`` and ``w_c`` are Python floats
    formed in double precision, so a weight near 1 keeps its small complement exactly
    (fl32(1 - fl32(w)) would not).
    """
    y = w * jnp.expm1(jnp.minimum(x, _EXP_SAFE))
    near = (y >= -0.5) & (x <= _EXP_SAFE)
    close = jnp.log1p(jnp.where(near, y, 0.0))
    far = jnp.logaddexp(jnp.float32(math.log(w_c)),
                        jnp.float32(math.log(w)) + jnp.where(near, 0.0, x))
    return jnp.where(near, close, far)


def _kl_to_mixture(logp_xV: Array, logq_xV: Array, w: float) -> Array:
    """KL(p || w p + (1 - w) q) per token, for 0 <= w <= 1 (w = 0 is the plain KL(p || q)).

    log(p / m) = -log(w + (1 - w) q / p) = -_log_mix_ratio(1 - w, w, log q - log p).
    """
    if w == 0.0:
        return kl_divergence(logp_xV, logq_xV)
    if w == 1.0:
        return jnp.zeros(logp_xV.shape[:-1], jnp.float32)
    live = logp_xV > -jnp.inf
    x = jnp.where(live, logq_xV - logp_xV, 0.0)
    return -jnp.sum(jnp.exp(logp_xV) * _log_mix_ratio(1.0 - w, w, x), axis=-1)


def _jsd(logs_xV: Array, logt_xV: Array, beta: float, scaled: bool = False) -> Array:
    """GKD's generalised JSD(beta) per token (TRL's endpoints), or with ``scaled`` that
    divided by beta (1 - beta)."""
    if beta == 0.0:
        return kl_divergence(logt_xV, logs_xV)
    if beta == 1.0:
        return kl_divergence(logs_xV, logt_xV)
    js = beta * _kl_to_mixture(logt_xV, logs_xV, beta) \
        + (1.0 - beta) * _kl_to_mixture(logs_xV, logt_xV, 1.0 - beta)
    return js / (beta * (1.0 - beta)) if scaled else js


def _tvd(logs_xV: Array, logt_xV: Array) -> Array:
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logt_xV) - jnp.exp(logs_xV)), axis=-1)


# Per-token divergence of every divergence term: ``fn(logs_xV, logt_xV, beta, alpha)`` from
# student and teacher log-probs (the one table the dense and sparse losses dispatch on).
PER_TOKEN: dict[str, Callable[[Array, Array, float, float], Array]] = {
    FORWARD_KL: lambda logs, logt, beta, alpha: kl_divergence(logt, logs),
    REVERSE_KL: lambda logs, logt, beta, alpha: kl_divergence(logs, logt),
    JSD: lambda logs, logt, beta, alpha: _jsd(logs, logt, beta),
    JSD_SCALED: lambda logs, logt, beta, alpha: _jsd(logs, logt, beta, scaled=True),
    TVD: lambda logs, logt, beta, alpha: _tvd(logs, logt),
    SKEW_KL: lambda logs, logt, beta, alpha: _kl_to_mixture(logt, logs, alpha),
    SKEW_REVERSE_KL: lambda logs, logt, beta, alpha: _kl_to_mixture(logs, logt, alpha),
}


def divergence(name: str, logs_xV: Array, logt_xV: Array, *, beta: float, alpha: float) -> Array:
    """Per-token divergence ``name`` from student and teacher log-probs."""
    if name not in PER_TOKEN:
        raise ValueError(unknown_message(name, DIVERGENCE_TERMS, "divergence"))
    return PER_TOKEN[name](logs_xV, logt_xV, beta, alpha)


def _cross_entropy(logp_xV: Array, labels_x: Array) -> Array:
    return -jnp.take_along_axis(logp_xV, labels_x[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ---------------------------------------------------------------------------------------------
# Masking and reduction
# ---------------------------------------------------------------------------------------------


def token_weights(mask_x: Array, shape: tuple[int, ...]) -> Array:
    """fp32 token weights from a bool or numeric mask, checked against the tokens' shape."""
    w = jnp.asarray(mask_x).astype(jnp.float32)
    if w.shape != shape:
        raise ValueError(f"mask has shape {w.shape} but the logits' leading shape is {shape}; "
                         "pass one mask entry (bool or weight) per token")
    return w


def masked_logits(logits_xV: Array, w_x: Array) -> Array:
    """fp32 logits with masked positions zeroed (so they are inert, even if they hold nan)."""
    return jnp.where((w_x > 0)[..., None], logits_xV.astype(jnp.float32), 0.0)


def log_probs(logits_xV: Array, w_x: Array, temperature: float) -> Array:
    """fp32 log-softmax of ``logits / temperature`` over the vocabulary, masked positions inert."""
    z = masked_logits(logits_xV, w_x)
    if temperature != 1.0:
        z = z / temperature
    return jax.nn.log_softmax(z, axis=-1)


def masked_sum(values_x: Array, w_x: Array) -> Array:
    """The sum of ``values_x`` weighted by ``w_x`` (masked entries contribute 0, even nan)."""
    return jnp.sum(jnp.where(w_x > 0, w_x * values_x, 0.0))


def token_count(w_x: Array) -> Array:
    """Number of unmasked tokens: the sum of the positive weights."""
    return jnp.sum(jnp.where(w_x > 0, w_x, 0.0))


def _mean(total: Array, tokens: Array) -> Array:
    return jnp.where(tokens > 0, total / jnp.where(tokens > 0, tokens, 1.0), 0.0)


def single_term(name: str, total: Array, tokens: Array) -> tuple[Array, Metrics]:
    """``(loss, metrics)`` of one term from its masked sum and the token count."""
    loss = _mean(total, tokens)
    return loss, {metric_key(name): loss, sum_key(name): total, TOKENS: tokens}


def _check_pair(student_logits_xV: Array, teacher_logits_xV: Array) -> None:
    if student_logits_xV.shape != teacher_logits_xV.shape:
        raise ValueError(
            f"student logits {student_logits_xV.shape} and teacher logits "
            f"{teacher_logits_xV.shape} differ; same-vocabulary losses need equal shapes (for a "
            "padded vocabulary, slice both to the tokenizer's common size first)")


def check_temperature(temperature: float) -> None:
    """Refuse a temperature that is not positive."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _divergence_loss(name: str, student_logits_xV: Array, teacher_logits_xV: Array,
                     mask_x: Array, temperature: float, beta: float = 0.5,
                     alpha: float = 0.1) -> tuple[Array, Metrics]:
    _check_pair(student_logits_xV, teacher_logits_xV)
    check_temperature(temperature)
    w_x = token_weights(mask_x, student_logits_xV.shape[:-1])
    logs = log_probs(student_logits_xV, w_x, temperature)
    logt = log_probs(jax.lax.stop_gradient(teacher_logits_xV), w_x, temperature)
    per_token = divergence(name, logs, logt, beta=beta, alpha=alpha) * temperature ** 2
    return single_term(name, masked_sum(per_token, w_x), token_count(w_x))


# ---------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------


def forward_kl(student_logits: Array, teacher_logits: Array, mask: Array, *,
               temperature: float = 1.0) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_T || p_S) * T^2 (mode-covering; the classic KD loss)."""
    return _divergence_loss(FORWARD_KL, student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits: Array, teacher_logits: Array, mask: Array, *,
               temperature: float = 1.0) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_S || p_T) * T^2 (mode-seeking)."""
    return _divergence_loss(REVERSE_KL, student_logits, teacher_logits, mask, temperature)


def jsd(student_logits: Array, teacher_logits: Array, mask: Array, *, temperature: float = 1.0,
        beta: float = 0.5) -> tuple[Array, Metrics]:
    """Masked mean of GKD's generalised JSD(beta) * T^2 (see the module docstring): TRL's
    ``generalized_jsd_loss`` with the same beta.

    jsd_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m) with m = beta p_T + (1 - beta) p_S;
    beta = 0 is forward KL, beta = 1 reverse KL, beta = 0.5 the usual Jensen-Shannon divergence.
    """
    _check_beta(beta)
    return _divergence_loss(JSD, student_logits, teacher_logits, mask, temperature, beta=beta)


def jsd_scaled(student_logits: Array, teacher_logits: Array, mask: Array, *,
               temperature: float = 1.0, beta: float = 0.5) -> tuple[Array, Metrics]:
    """Masked mean of JSD(beta) / (beta (1 - beta)) * T^2: continuous in beta, forward KL at
    beta = 0 and reverse KL at beta = 1 as its limits, 4x ``jsd`` at beta = 0.5."""
    _check_beta(beta)
    return _divergence_loss(JSD_SCALED, student_logits, teacher_logits, mask, temperature,
                            beta=beta)


def tvd(student_logits: Array, teacher_logits: Array, mask: Array, *,
        temperature: float = 1.0) -> tuple[Array, Metrics]:
    """Masked mean of the total variation distance 0.5 sum |p_T - p_S| * T^2."""
    return _divergence_loss(TVD, student_logits, teacher_logits, mask, temperature)


def skew_kl(student_logits: Array, teacher_logits: Array, mask: Array, *,
            temperature: float = 1.0, alpha: float = 0.1) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_T || alpha p_T + (1 - alpha) p_S) * T^2 (alpha = 0: forward KL)."""
    _check_alpha(alpha)
    return _divergence_loss(SKEW_KL, student_logits, teacher_logits, mask, temperature,
                            alpha=alpha)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, mask: Array, *,
                    temperature: float = 1.0, alpha: float = 0.1) -> tuple[Array, Metrics]:
    """Masked mean of KL(p_S || alpha p_S + (1 - alpha) p_T) * T^2 (alpha = 0: reverse KL)."""
    _check_alpha(alpha)
    return _divergence_loss(SKEW_REVERSE_KL, student_logits, teacher_logits, mask, temperature,
                            alpha=alpha)


def cross_entropy(student_logits: Array, labels: Array, mask: Array) -> tuple[Array, Metrics]:
    """Masked mean of -log p_S(label) on integer labels (shifted to next tokens by the caller)."""
    w_x = token_weights(mask, student_logits.shape[:-1])
    if labels.shape != w_x.shape:
        raise ValueError(f"labels have shape {labels.shape}, expected {w_x.shape}")
    logp = log_probs(student_logits, w_x, 1.0)
    total = masked_sum(_cross_entropy(logp, jnp.where(w_x > 0, labels, 0)), w_x)
    return single_term(CROSS_ENTROPY, total, token_count(w_x))


DIVERGENCES: dict[str, Callable[..., tuple[Array, Metrics]]] = {
    FORWARD_KL: forward_kl, REVERSE_KL: reverse_kl, JSD: jsd, JSD_SCALED: jsd_scaled, TVD: tvd,
    SKEW_KL: skew_kl, SKEW_REVERSE_KL: skew_reverse_kl,
}


# ---------------------------------------------------------------------------------------------
# Combined losses
# ---------------------------------------------------------------------------------------------


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1] (0: plain KL), got {alpha}")


def unknown_message(name: str, known: tuple[str, ...], what: str) -> str:
    """The message "unknown <what> <name>", with the closest known name and the known ones."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}."


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Weighted loss terms and their options; hashable, so it can be a static jit argument.

    ``terms`` maps term names (``TERMS``) to weights; a mapping is accepted and stored as a
    sorted tuple of pairs. ``temperature`` applies to every divergence (with T^2 scaling), never
    to ``cross_entropy``. ``jsd_beta`` and ``skew_alpha`` configure ``jsd`` / ``jsd_scaled``
    and the skew KLs. ``chunk_terms``: ``(name, fn)`` pairs of further terms that read the
    teacher and the labels, each ``fn(student_logits_xV, teacher, labels_x, w_x, spec) -> sum``
    where ``teacher`` is ``{"logits": ...}`` (live) or the cache's ``{"topk_ids",
    "topk_logprobs", "tail_logmass"}`` (see ``distill_jax.losses.terms``). ``balance``:
    ``none`` or ``gradmag`` (the step weighs the terms by their gradient magnitude at the
    student's final hidden states; ``distill_jax.losses.xtok.balance_weights``).
    """

    terms: Any = ((FORWARD_KL, 1.0),)
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_terms: Any = ()
    balance: str = "none"

    def __post_init__(self):
        items = self.terms.items() if isinstance(self.terms, Mapping) else self.terms
        terms = tuple(sorted((str(k), float(v)) for k, v in items))
        if not terms:
            raise ValueError("a loss needs at least one term, e.g. terms={'forward_kl': 1.0}")
        chunk_terms = tuple((str(n), fn) for n, fn in self.chunk_terms)
        known = TERMS + tuple(n for n, _ in chunk_terms)
        for name, _ in terms:
            if name not in known:
                raise ValueError(unknown_message(name, known, "loss term"))
        object.__setattr__(self, "chunk_terms", chunk_terms)
        if len({n for n, _ in terms}) != len(terms):
            raise ValueError(f"duplicate loss terms in {terms}")
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "jsd_beta", float(self.jsd_beta))
        object.__setattr__(self, "skew_alpha", float(self.skew_alpha))
        check_temperature(self.temperature)
        _check_beta(self.jsd_beta)
        _check_alpha(self.skew_alpha)
        if self.balance not in ("none", "gradmag"):
            raise ValueError(f"unknown loss balance {self.balance!r}; known: none, gradmag")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LossSpec":
        """From the YAML mapping, e.g. ``{terms: {forward_kl: 1.0}, temperature: 2.0}``."""
        fields = tuple(f.name for f in dataclasses.fields(cls))
        for key in d:
            if key not in fields:
                raise ValueError(unknown_message(key, fields, "loss option"))
        return cls(**d)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.terms)

    @property
    def needs_teacher(self) -> bool:
        return any(name in DIVERGENCE_TERMS for name, _ in self.terms) or bool(self.chunk_terms)

    @property
    def needs_labels(self) -> bool:
        return any(name == CROSS_ENTROPY for name, _ in self.terms) or bool(self.chunk_terms)


def term_sums(student_logits_xV: Array, teacher_logits_xV: Array | None, labels_x: Array | None,
              w_x: Array, spec: LossSpec) -> dict[str, Array]:
    """Masked sums of every term of ``spec`` (before weighting); the building block shared by
    ``combined_loss`` and the chunked loss. ``w_x`` are fp32 token weights."""
    temp = spec.temperature
    sums: dict[str, Array] = {}
    logs_T = None
    if spec.needs_teacher:
        if teacher_logits_xV is None:
            raise ValueError("this loss has distillation terms but no teacher was given")
        _check_pair(student_logits_xV, teacher_logits_xV)
        logs_T = log_probs(student_logits_xV, w_x, temp)
        logt_T = log_probs(jax.lax.stop_gradient(teacher_logits_xV), w_x, temp)
        for name, _ in spec.terms:
            if name in DIVERGENCE_TERMS:
                per_token = divergence(name, logs_T, logt_T, beta=spec.jsd_beta,
                                        alpha=spec.skew_alpha) * temp ** 2
                sums[name] = masked_sum(per_token, w_x)
    if spec.needs_labels:
        if labels_x is None:
            raise ValueError("this loss has a cross_entropy term but no labels were given")
        if labels_x.shape != w_x.shape:
            raise ValueError(f"labels have shape {labels_x.shape}, expected {w_x.shape}")
    if CROSS_ENTROPY in spec.weights:
        logp = logs_T if (logs_T is not None and temp == 1.0) \
            else log_probs(student_logits_xV, w_x, 1.0)
        ce = _cross_entropy(logp, jnp.where(w_x > 0, labels_x, 0))
        sums[CROSS_ENTROPY] = masked_sum(ce, w_x)
    for name, fn in spec.chunk_terms:
        if name in spec.weights:
            sums[name] = fn(student_logits_xV, {"logits": teacher_logits_xV}, labels_x, w_x, spec)
    return sums


def finalize(sums: Mapping[str, Array], tokens: Array, spec: LossSpec) -> tuple[Array, Metrics]:
    """(loss, metrics) from per-term masked sums and the token count."""
    metrics: Metrics = {TOKENS: tokens}
    total = jnp.zeros((), jnp.float32)
    for name, weight in spec.terms:
        metrics[sum_key(name)] = sums[name]
        metrics[metric_key(name)] = _mean(sums[name], tokens)
        total = total + weight * sums[name]
    loss = _mean(total, tokens)
    metrics[LOSS_SUM] = total
    metrics[LOSS] = loss
    return loss, metrics


def combined_loss(student_logits: Array, teacher_logits: Array | None, labels: Array | None,
                  mask: Array, spec: LossSpec) -> tuple[Array, Metrics]:
    """sum_i weight_i * term_i, each term masked-summed and divided by the token count.

    Metrics: every term's mean and sum, the weighted total (``distill/loss``,
    ``distill/loss_sum``) and ``distill/tokens``. ``teacher_logits`` may be None when the spec
    has no divergence terms, ``labels`` when it has no cross-entropy.
    """
    w_x = token_weights(mask, student_logits.shape[:-1])
    sums = term_sums(student_logits, teacher_logits, labels, w_x, spec)
    return finalize(sums, token_count(w_x), spec)
