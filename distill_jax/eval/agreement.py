"""Teacher/student agreement on held-out text, for two models that share a tokenizer.

Over the scored tokens of the documents (the same windows and packing as
:mod:`distill_jax.eval.lm`), at every position both models predict the next token from the same
inputs:

* top-1 agreement: the fraction of positions where the teacher's and the student's most likely
  next tokens are the same;
* KL(teacher || student) = sum_v p_T(v) (log p_T(v) - log p_S(v)) in nats, averaged over the
  positions (fp32, temperature 1).

A vocabulary padded to a multiple (e.g. 151,936 vs 152,064 rows for one tokenizer) is compared
over the ids both models have; the padding rows are never real tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from distill_jax.eval.lm import (ScoredDoc, batch_rows, chunked_token_sums, doc_totals,
                                 pack_batches, run_batches, text_docs)
from distill_jax.models import Model, hidden_states, logits_from_hidden


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Top-1 agreement and mean KL(teacher || student) (nats per token) over ``tokens``
    positions, the summed ``kl`` and ``matches`` they come from, and the wall time and input
    tokens of the evaluation."""

    matches: float
    kl: float
    tokens: int
    wall_s: float = 0.0
    input_tokens: int = 0

    @property
    def top1(self) -> float:
        return self.matches / max(self.tokens, 1)

    @property
    def kl_per_token(self) -> float:
        return self.kl / max(self.tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        """Input tokens run through both models per second of wall time."""
        return self.input_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"top1_agreement": self.top1, "kl_teacher_student": self.kl_per_token,
                "tokens": self.tokens, "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s}


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _agreement_sums(teacher: Model, student: Model, tokens_BL, segment_ids_BL, targets_BL,
                    mask_BL, *, chunk_size: int):
    """(argmax matches, summed KL(T || S), positions) of one batch, fp32."""
    del targets_BL  # both models predict from the same inputs; the actual token is not needed
    ht_BLD = hidden_states(teacher, tokens_BL, segment_ids=segment_ids_BL)
    hs_BLD = hidden_states(student, tokens_BL, segment_ids=segment_ids_BL)
    vocab = min(teacher.config.vocab_size, student.config.vocab_size)

    def chunk(ht_CD, hs_CD, mask_C):
        logt_CV = jax.nn.log_softmax(logits_from_hidden(teacher, ht_CD[None])[0][:, :vocab], -1)
        logs_CV = jax.nn.log_softmax(logits_from_hidden(student, hs_CD[None])[0][:, :vocab], -1)
        kl_C = jnp.sum(jnp.exp(logt_CV) * (logt_CV - logs_CV), axis=-1)
        match_C = (jnp.argmax(logt_CV, -1) == jnp.argmax(logs_CV, -1)).astype(jnp.float32)
        return jnp.stack([jnp.sum(match_C * mask_C), jnp.sum(kl_C * mask_C), jnp.sum(mask_C)])

    return chunked_token_sums(
        chunk, [ht_BLD.reshape(-1, ht_BLD.shape[-1]), hs_BLD.reshape(-1, hs_BLD.shape[-1]),
                mask_BL.reshape(-1).astype(jnp.float32)], chunk_size)


def agreement_docs(teacher: Model, student: Model, docs: Sequence[ScoredDoc], *,
                   seq_len: int = 512, batch_size: int = 8, chunk_size: int = 1024,
                   sharding: Any = None, progress: bool = False) -> Agreement:
    """Top-1 agreement and KL(teacher || student) over the scored tokens of ``docs`` (token ids
    of the tokenizer both models share). ``sharding``, ``batch_size`` and ``progress`` as in
    :func:`distill_jax.eval.lm.evaluate_docs`."""
    tokens, _ = doc_totals(docs)
    batches = pack_batches(docs, seq_len, batch_rows(batch_size, sharding))
    if not batches:
        return Agreement(0.0, 0.0, 0)
    fn = functools.partial(_agreement_sums, teacher, student, chunk_size=chunk_size)
    sums, wall = run_batches(fn, batches, sharding, progress=progress, desc="agreement")
    if int(round(sums[2])) != tokens:
        raise AssertionError(f"compared {sums[2]} positions, expected {tokens}")
    return Agreement(matches=float(sums[0]), kl=float(sums[1]), tokens=tokens, wall_s=wall,
                     input_tokens=sum(b.input_tokens for b in batches))


def agreement(teacher: Model, student: Model, tokenizer: Any, texts: Sequence[str], *,
              seq_len: int = 512, batch_size: int = 8, chunk_size: int = 1024,
              progress: bool = False) -> Agreement:
    """Top-1 agreement and KL(teacher || student) of two models that share ``tokenizer``, on
    ``texts`` (each text one document, every token after the first scored)."""
    return agreement_docs(teacher, student, text_docs(tokenizer, texts), seq_len=seq_len,
                          batch_size=batch_size, chunk_size=chunk_size, progress=progress)
