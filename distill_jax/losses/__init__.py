"""Distillation losses: pure, masked, fp32 functions returning ``(loss, metrics)``."""

from distill_jax.losses.alm import (
    ALM_CHUNKS,
    ALM_DISTANCES,
    ChunkScores,
    alm_groups,
    alm_loss,
    alm_sums,
    chunk_scores,
    token_stats,
)
from distill_jax.losses.chunked import chunked_loss, logits_from_hidden
from distill_jax.losses.kd import (
    CROSS_ENTROPY,
    DIVERGENCE_TERMS,
    DIVERGENCES,
    FORWARD_KL,
    JSD,
    JSD_SCALED,
    LOSS,
    LOSS_SUM,
    REVERSE_KL,
    SKEW_KL,
    SKEW_REVERSE_KL,
    TERMS,
    TOKENS,
    TVD,
    LossSpec,
    combined_loss,
    cross_entropy,
    finalize,
    forward_kl,
    jsd,
    jsd_scaled,
    metric_key,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sum_key,
    term_sums,
    tvd,
)

__all__ = [
    "ALM_CHUNKS", "ALM_DISTANCES", "ChunkScores", "alm_groups", "alm_loss", "alm_sums",
    "chunk_scores", "token_stats",
    "CROSS_ENTROPY", "DIVERGENCE_TERMS", "DIVERGENCES", "FORWARD_KL", "JSD", "JSD_SCALED",
    "LOSS", "LOSS_SUM", "REVERSE_KL", "SKEW_KL", "SKEW_REVERSE_KL", "TERMS", "TOKENS", "TVD",
    "LossSpec", "chunked_loss", "combined_loss", "cross_entropy", "finalize", "forward_kl", "jsd",
    "jsd_scaled",
    "logits_from_hidden", "metric_key", "reverse_kl", "skew_kl", "skew_reverse_kl", "sum_key",
    "term_sums", "tvd",
]
