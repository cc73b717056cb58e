"""REDI (Reinforcement Distillation; Xu et al., 2025): learn from a teacher's verified-correct
*and* its rejected reasoning traces.

For pairs ``(x, y+, y-)`` of one prompt, a correct completion and an incorrect one::

    L = mean over pairs [ -log pi(y+ | x) / |y+|  +  alpha * log pi(y- | x) / |y-| ]

with ``0 <= alpha < 1`` (default 0.8): the positive trace's length-normalised likelihood is
raised, the negative's lowered with a smaller weight, which keeps the unbounded negative term
from dominating (alpha = 0 is SFT on the positives, length-normalised per sequence).

Per token this is a weighted cross-entropy. The packer of pair records
(:mod:`distill_jax.data.pairs`, ``data.record: pairs``) writes a batch key ``sequence_weight``,
aligned with ``targets`` like ``loss_mask``: ``+1/|y+|`` on the tokens of ``y+``, ``-1/|y-|`` on
those of ``y-``, 0 elsewhere (prompts, padding): the length normalisation and which side a token
is on. The term applies ``alpha`` (``loss.redi_alpha``), so the data never holds a loss
setting. Then, with ``a_t = w_t`` where ``w_t > 0`` and ``alpha * w_t`` where ``w_t < 0``,

    sum   = sum_t a_t * (-log p_S(target_t))          (:func:`redi_sums`)
    pairs = round(sum_t max(w_t, 0))                   (:func:`pair_count`)

and ``L = sum / pairs``: each whole positive completion contributes exactly 1 to the count, so
the count is the number of pairs of the global batch whatever the packing (the packer never
truncates a pair). Both are sums over tokens, so the term is exact under gradient accumulation
and across hosts, like every other term. fp32 throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses import kd

Array = jax.Array
REDI = "redi"
SEQUENCE_WEIGHT = "sequence_weight"
PAIRS = "distill/redi_pairs"
DEFAULT_ALPHA = 0.8


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, refused outside ``[0, 1)`` with the fix."""
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"loss.redi_alpha must be in [0, 1) (default {DEFAULT_ALPHA}): the negative "
                         f"trace's weight must stay below the positive's; got {alpha}")
    return alpha


def pair_weights(positive_len: int, negative_len: int) -> tuple[float, float]:
    """The per-token sequence weights of one pair: ``(1/|y+|, -1/|y-|)`` (the term scales the
    negative side by ``alpha``)."""
    if positive_len < 1 or negative_len < 1:
        raise ValueError(f"a REDI pair needs non-empty completions, got lengths "
                         f"{positive_len} and {negative_len}")
    return 1.0 / positive_len, -1.0 / negative_len


def redi_sums(logp_x: Array, sequence_weight_x: Array, alpha: float = DEFAULT_ALPHA) -> Array:
    """``sum_t a_t * (-logp_t)`` with ``a_t = w_t`` on positive weights and ``alpha * w_t`` on
    negative ones, over tokens with a non-zero weight (fp32; other positions are inert, also
    when their log-prob is not finite)."""
    w = sequence_weight_x.astype(jnp.float32)
    a = jnp.where(w > 0, w, check_alpha(alpha) * w)
    return -jnp.sum(jnp.where(w != 0, a * logp_x.astype(jnp.float32), 0.0))


def pair_count(sequence_weight_x: Array) -> Array:
    """The number of pairs in a batch: the positive weights summed (1 per whole positive
    completion), rounded."""
    return jnp.round(jnp.sum(jnp.maximum(sequence_weight_x.astype(jnp.float32), 0.0)))


def redi_loss(logp_x: Array, sequence_weight_x: Array, alpha: float = DEFAULT_ALPHA
              ) -> tuple[Array, dict[str, Array]]:
    """The REDI loss of one batch from the student's per-target log-probs and the packer's
    sequence weights: ``(loss, metrics)``."""
    total = redi_sums(logp_x, sequence_weight_x, alpha)
    pairs = pair_count(sequence_weight_x)
    loss = total / jnp.maximum(pairs, 1.0)
    return loss, {kd.metric_key(REDI): loss, kd.sum_key(REDI): total, PAIRS: pairs}


__all__ = ["DEFAULT_ALPHA", "PAIRS", "REDI", "SEQUENCE_WEIGHT", "check_alpha", "pair_count",
           "pair_weights", "redi_loss", "redi_sums"]
