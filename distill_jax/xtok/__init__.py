"""Cross-tokenizer distillation: aligning two tokenizations of the same text by byte spans.

:func:`align_tokens` gives each token (as a prediction target) of both tokenizations the id of
its *chunk*, the smallest spans of text both tokenizations cover exactly; the data pipeline
stores the ids per document and writes row-local ``chunk_ids`` / ``teacher_chunk_ids`` into
cross-tokenizer batches (see :mod:`distill_jax.data`).
"""

from distill_jax.xtok.align import Alignment, align_tokens, special_token_ids, token_bytes

__all__ = ["Alignment", "align_tokens", "special_token_ids", "token_bytes"]
