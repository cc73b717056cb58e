"""Token-level cross-tokenizer baselines: ULD and MinED, on chunk-aligned position pairs.

Teacher and student tokenize the same text differently, so their next-token distributions live
on different vocabularies and their positions do not correspond one to one. Both baselines use
the project's chunk alignment (the smallest spans covering identical bytes in both
tokenizations) to pair positions, then compare the two distributions at each pair.

Pairing. In a packed batch, position ``i`` predicts ``targets[i]``; ``chunk_ids`` (B, L) and
``teacher_chunk_ids`` (B, Lt) give the row-local id of the chunk each position's *target* belongs
to (-1: none); equal ids on the two sides cover the same bytes. Per chunk we pair the student
position and the teacher position of the chunk's *first* target: both distributions then
condition on the same byte prefix and predict the start of the same bytes.
``aligned_pairs(chunk_ids, teacher_chunk_ids)`` returns the two positions and a mask per chunk
slot (C = L slots per row); ``take_positions`` gathers logits (or anything per position) at them.

Losses. Pure functions of the paired logits, fp32 inside, weighted by ``w_x`` (bool or float;
weights <= 0 are masked, and logits at masked pairs are replaced by zeros first, so whatever they
hold, even nan, changes neither the loss nor its gradient). Each returns the masked sum and the
count (sum of positive weights), ``{"sum": ..., "count": ...}``, so a mean over micro-batches or
hosts is ``sum(sums) / sum(counts)`` exactly. The teacher side is under ``stop_gradient``.

- ``uld_sums`` (Universal Logit Distillation, Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss"): per pair, the L1 distance between the
  student's and the teacher's probability vectors, each sorted in descending order, the shorter
  zero-padded to the longer vocabulary::

      uld = sum_i | sort_desc(p_S)_i - sort_desc(p_T)_i |        (in [0, 2])

  It is the closed form of a Wasserstein distance under a cost that ignores token identity, so it
  needs no vocabulary mapping, and it is 0 exactly when the two distributions are permutations of
  each other. ``top_k`` truncates both sorted vectors to their k largest entries (an approximation
  that ignores the tails and is a lower bound of the exact value; sorting 150k-entry vectors per
  position is the cost it avoids). Probabilities are ``softmax(logits / T)``; the result is not
  rescaled by T (the distance is bounded and the paper uses T = 1).
- ``mined_sums`` (MinED vocabulary mapping, Wan et al. 2024, "Knowledge Fusion of Large Language
  Models", FuseLLM): each student token ``v`` is mapped to the teacher token ``mapping[v]`` whose
  bytes are closest in edit distance (``mined_mapping``); the teacher's logits are projected onto
  the student vocabulary, ``z_proj[v] = z_T[mapping[v]]`` (``-inf`` where ``mapping[v] = -1``, a
  student id without a teacher counterpart), renormalised over the student vocabulary, and the
  loss is the forward KL, as in ``distill_jax.losses.kd.forward_kl``::

      mined = T^2 * KL( softmax(z_proj / T) || softmax(z_S / T) )

  With an identity mapping and equal vocabularies it is ``kd.forward_kl``'s sum.

``mined_mapping`` runs on the host, once per tokenizer pair. Tokens are compared as the bytes
they stand for (byte-level BPE symbols decoded to bytes, SentencePiece ``▁`` as a space,
``<0xNN>`` byte-fallback tokens as that byte), so e.g. ``▁the`` and ``Ġthe`` are the same token.
An exact byte match always wins; otherwise the teacher token at minimal Levenshtein distance
(unit-cost byte insertions, deletions and substitutions), ties broken by the lowest teacher id.
Special tokens are matched among special tokens only: same content first, then the same role
(bos, eos, pad, unk), else -1.

The search is exact and needs no C edit-distance library (none is a dependency): an exact-match
table; then a symmetric-deletion index (every teacher token within distance 1 of a query shares
a string obtained by deleting at most one byte from each), whose candidates get exact distances
from a dynamic programme vectorised over all pairs of the same lengths; then, for the tokens left
(nearest distance >= 2), a search restricted to the teacher tokens whose length is within an
upper bound of the query's (the query minus its longest teacher substring) and pruned by a
lower bound from the bytes the two strings share, computed for a block of queries against all
candidates as one matrix product. ``mined_mapping`` wall time on 2 CPU cores shared with other
work (load average ~9): Mistral 7B v0.1 (32,000 SentencePiece tokens) to SmolLM2 (49,152
byte-level tokens) about 7 s, the reverse direction about 13 s, SmolLM2 to the 259-token byte
tokenizer about 2 s.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses import kd

Array = jax.Array

SUM = "sum"
COUNT = "count"
NO_MATCH = -1          # mapping entry of a student id with no teacher counterpart

_SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
_DP_BLOCK = 1 << 22    # dynamic-programme cells per vectorised block (bounds host memory)


# ---------------------------------------------------------------------------------------------
# Pairing positions through the chunk alignment
# ---------------------------------------------------------------------------------------------


def first_positions(chunk_ids_BL: Array, num_chunks: int) -> tuple[Array, Array]:
    """Per chunk id ``c`` in ``[0, num_chunks)``, the first position whose target is in chunk c.

    Args:
      chunk_ids_BL: (B, L) int row-local chunk id of each position's target; -1 (or any id
        outside ``[0, num_chunks)``) means none.
      num_chunks: C, the number of chunk slots (static).

    Returns:
      ``(pos_BC, valid_BC)``: int32 positions (0 where the chunk does not occur) and whether
      chunk c occurs in the row.
    """
    return _chunk_positions(chunk_ids_BL, num_chunks, last=False)


def last_positions(chunk_ids_BL: Array, num_chunks: int) -> tuple[Array, Array]:
    """Per chunk id, the *last* position whose target is in the chunk; as :func:`first_positions`."""
    return _chunk_positions(chunk_ids_BL, num_chunks, last=True)


def _chunk_positions(chunk_ids_BL: Array, num_chunks: int, *, last: bool) -> tuple[Array, Array]:
    chunk_ids_BL = jnp.asarray(chunk_ids_BL)
    if chunk_ids_BL.ndim != 2:
        raise ValueError(f"chunk_ids must be (batch, length), got shape {chunk_ids_BL.shape}")
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    batch, length = chunk_ids_BL.shape
    ids_BL = chunk_ids_BL.astype(jnp.int32)
    ids_BL = jnp.where((ids_BL >= 0) & (ids_BL < num_chunks), ids_BL, num_chunks)  # dropped
    iota_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    rows_BL = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.int32)[:, None], (batch, length))
    missing = -1 if last else length
    pos_BC = jnp.full((batch, num_chunks), missing, jnp.int32)
    at = pos_BC.at[rows_BL, ids_BL]
    pos_BC = at.max(iota_BL, mode="drop") if last else at.min(iota_BL, mode="drop")
    valid_BC = pos_BC != missing
    return jnp.where(valid_BC, pos_BC, 0), valid_BC


def aligned_pairs(chunk_ids_BL: Array, teacher_chunk_ids_BLt: Array) -> tuple[Array, Array, Array]:
    """Pair, per chunk, the student and teacher positions predicting the chunk's first target.

    Args:
      chunk_ids_BL: (B, L) student chunk id of each position's target (-1: none).
      teacher_chunk_ids_BLt: (B, Lt) the same for the teacher rows; equal ids in a row cover the
        same bytes.

    Returns:
      ``(student_pos_BC, teacher_pos_BC, mask_BC)`` with C = L chunk slots (every chunk holds at
      least one student target, so a row has at most L chunks); slot c is chunk id c, and
      ``mask_BC`` is true where the chunk occurs on both sides. Positions are 0 where masked.
    """
    chunk_ids_BL = jnp.asarray(chunk_ids_BL)
    teacher_chunk_ids_BLt = jnp.asarray(teacher_chunk_ids_BLt)
    if chunk_ids_BL.ndim != 2 or teacher_chunk_ids_BLt.ndim != 2 \
            or chunk_ids_BL.shape[0] != teacher_chunk_ids_BLt.shape[0]:
        raise ValueError(f"chunk ids must be (batch, length) with the same batch on both sides, "
                         f"got student {chunk_ids_BL.shape} and teacher "
                         f"{teacher_chunk_ids_BLt.shape}")
    num_chunks = chunk_ids_BL.shape[1]
    student_pos_BC, student_valid_BC = first_positions(chunk_ids_BL, num_chunks)
    teacher_pos_BC, teacher_valid_BC = first_positions(teacher_chunk_ids_BLt, num_chunks)
    mask_BC = student_valid_BC & teacher_valid_BC
    return (jnp.where(mask_BC, student_pos_BC, 0), jnp.where(mask_BC, teacher_pos_BC, 0), mask_BC)


def take_positions(x_BL_: Array, pos_BC: Array) -> Array:
    """``x[b, pos[b, c], ...]``: gather per-position values (e.g. (B, L, V) logits) at pairs."""
    if x_BL_.ndim < 2 or pos_BC.ndim != 2 or x_BL_.shape[0] != pos_BC.shape[0]:
        raise ValueError(f"expected x of shape (B, L, ...) and positions (B, C), got "
                         f"{x_BL_.shape} and {pos_BC.shape}")
    idx = pos_BC.astype(jnp.int32).reshape(pos_BC.shape + (1,) * (x_BL_.ndim - 2))
    return jnp.take_along_axis(x_BL_, idx, axis=1)


# ---------------------------------------------------------------------------------------------
# Losses on paired logits
# ---------------------------------------------------------------------------------------------


def _pair_weights(student_logits_xV: Array, teacher_logits_xW: Array, w_x: Array) -> Array:
    if student_logits_xV.shape[:-1] != teacher_logits_xW.shape[:-1]:
        raise ValueError(f"student logits {student_logits_xV.shape} and teacher logits "
                         f"{teacher_logits_xW.shape} must pair up on every axis but the last "
                         "(gather both at aligned_pairs' positions with take_positions)")
    return kd.token_weights(w_x, student_logits_xV.shape[:-1])


def _sums(per_pair_x: Array, w_x: Array) -> dict[str, Array]:
    return {SUM: kd.masked_sum(per_pair_x, w_x), COUNT: kd.token_count(w_x)}


def _sorted_probs(logits_xV: Array, w_x: Array, temperature: float, k: int | None) -> Array:
    """Descending probabilities, all of them (k None) or the k largest, zero-padded to k."""
    p_xV = jnp.exp(kd.log_probs(logits_xV, w_x, temperature))
    vocab = p_xV.shape[-1]
    if k is None:
        return -jnp.sort(-p_xV, axis=-1)
    top_xK = jax.lax.top_k(p_xV, min(k, vocab))[0]
    if k > vocab:
        top_xK = jnp.pad(top_xK, [(0, 0)] * (top_xK.ndim - 1) + [(0, k - vocab)])
    return top_xK


def uld_sums(student_logits_xV: Array, teacher_logits_xW: Array, w_x: Array, *,
             temperature: float = 1.0, top_k: int | None = None) -> dict[str, Array]:
    """Masked sum and count of the ULD distance between paired distributions.

    Per pair: ``sum_i |sort_desc(p_S)_i - sort_desc(p_T)_i|`` with the shorter sorted vector
    zero-padded to max(V, W) and ``p = softmax(logits / T)`` (not rescaled by T).

    Args:
      student_logits_xV: (..., V) student logits at the paired positions.
      teacher_logits_xW: (..., W) teacher logits at the same pairs (any vocabulary size W).
      w_x: (...) bool or float pair weights (e.g. ``aligned_pairs``' mask).
      temperature: T > 0.
      top_k: None for the exact distance (a full sort of both vectors); an int k compares only
        the k largest probabilities of each side (zero-padded when a vocabulary is smaller than
        k): an approximation that drops the tails, never above the exact value.

    Returns:
      ``{"sum": ..., "count": ...}`` fp32 scalars.
    """
    kd.check_temperature(temperature)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive number of probabilities or None, got {top_k}")
    w_x = _pair_weights(student_logits_xV, teacher_logits_xW, w_x)
    teacher_logits_xW = jax.lax.stop_gradient(teacher_logits_xW)
    ps_xK = _sorted_probs(student_logits_xV, w_x, temperature, top_k)
    pt_xK = _sorted_probs(teacher_logits_xW, w_x, temperature, top_k)
    size = max(ps_xK.shape[-1], pt_xK.shape[-1])
    pad = lambda p: jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, size - p.shape[-1])])
    per_pair = jnp.sum(jnp.abs(pad(ps_xK) - pad(pt_xK)), axis=-1)
    return _sums(per_pair, w_x)


def project_teacher_logits(teacher_logits_xW: Array, mapping_V: Array) -> Array:
    """Teacher logits on the student vocabulary: ``z[..., v] = z_T[..., mapping[v]]``, and
    ``-inf`` where ``mapping[v] < 0`` (no teacher counterpart)."""
    mapping_V = jnp.asarray(mapping_V).astype(jnp.int32)
    if mapping_V.ndim != 1:
        raise ValueError(f"mapping must be (student_vocab,), got shape {mapping_V.shape}")
    z_xV = jnp.take(teacher_logits_xW, jnp.maximum(mapping_V, 0), axis=-1)
    return jnp.where(mapping_V >= 0, z_xV.astype(jnp.float32), -jnp.inf)


def mined_sums(student_logits_xV: Array, teacher_logits_xW: Array, mapping_V: Array, w_x: Array,
               *, temperature: float = 1.0, bucket: bool = False) -> dict[str, Array]:
    """Masked sum and count of ``T^2 KL(p_T projected || p_S)`` through a MinED mapping.

    Args:
      student_logits_xV: (..., V) student logits at the paired positions.
      teacher_logits_xW: (..., W) teacher logits at the same pairs.
      mapping_V: (V,) int teacher id of each student id (``mined_mapping``), -1 for none; at
        least one entry must be >= 0. Every entry must be < W.
      w_x: (...) bool or float pair weights.
      temperature: T > 0; both sides use ``softmax(logits / T)`` and the KL is scaled by T^2.
      bucket: the exact-match form (``mined_mapping(..., exact=True)``, an injective map):
        no renormalisation; each side's distribution over the matched tokens plus one bucket
        holding the rest of its own mass (the teacher's on tokens outside the map's image,
        the student's on unmatched ids), and the KL over those outcomes, as the cache's tail
        bucket does for a top-k teacher.

    Returns:
      ``{"sum": ..., "count": ...}`` fp32 scalars.
    """
    kd.check_temperature(temperature)
    if bucket:
        return _mined_bucket_sums(student_logits_xV, teacher_logits_xW, mapping_V, w_x,
                                  temperature)
    w_x = _pair_weights(student_logits_xV, teacher_logits_xW, w_x)
    if jnp.shape(mapping_V) != (student_logits_xV.shape[-1],):
        raise ValueError(f"mapping has shape {jnp.shape(mapping_V)} but the student vocabulary "
                         f"is {student_logits_xV.shape[-1]}; build it with mined_mapping(..., "
                         f"student_vocab_size={student_logits_xV.shape[-1]})")
    if isinstance(mapping_V, np.ndarray):
        if mapping_V.max(initial=-1) < 0 or mapping_V.max() >= teacher_logits_xW.shape[-1]:
            raise ValueError(f"mapping entries must lie in [-1, {teacher_logits_xW.shape[-1]}) "
                             "with at least one >= 0; build it from the teacher's tokenizer")
    logs_xV = kd.log_probs(student_logits_xV, w_x, temperature)
    zt_xW = kd.masked_logits(jax.lax.stop_gradient(teacher_logits_xW), w_x)
    zt_xV = project_teacher_logits(zt_xW, mapping_V)
    if temperature != 1.0:
        zt_xV = zt_xV / temperature
    logt_xV = jax.nn.log_softmax(zt_xV, axis=-1)
    per_pair = kd.kl_divergence(logt_xV, logs_xV) * temperature ** 2
    return _sums(per_pair, w_x)


def _mined_bucket_sums(student_logits_xV: Array, teacher_logits_xW: Array, mapping_V: Array,
                       w_x: Array, temperature: float) -> dict[str, Array]:
    from distill_jax.losses.sparse import safe_logsumexp
    w_x = _pair_weights(student_logits_xV, teacher_logits_xW, w_x)
    mapping_V = jnp.asarray(mapping_V).astype(jnp.int32)
    if mapping_V.shape != (student_logits_xV.shape[-1],):
        raise ValueError(f"mapping has shape {mapping_V.shape} but the student vocabulary is "
                         f"{student_logits_xV.shape[-1]}; build it with mined_mapping(..., "
                         f"exact=True, student_vocab_size={student_logits_xV.shape[-1]})")
    matched_V = mapping_V >= 0
    width = teacher_logits_xW.shape[-1]
    in_image_W = jnp.zeros((width,), bool).at[jnp.where(matched_V, mapping_V, width)].set(
        True, mode="drop")
    logs_xV = kd.log_probs(student_logits_xV, w_x, temperature)
    zt_xW = kd.masked_logits(jax.lax.stop_gradient(teacher_logits_xW), w_x)
    logt_xW = jax.nn.log_softmax(zt_xW.astype(jnp.float32) / temperature, axis=-1)
    logt_xV = jnp.where(matched_V, jnp.take(logt_xW, jnp.maximum(mapping_V, 0), axis=-1),
                        -jnp.inf)
    logs_m_xV = jnp.where(matched_V, logs_xV, -jnp.inf)
    rest_t = safe_logsumexp(jnp.where(in_image_W, -jnp.inf, logt_xW))
    rest_s = safe_logsumexp(jnp.where(matched_V, -jnp.inf, logs_xV))
    logp = jnp.concatenate([logt_xV, rest_t[..., None]], axis=-1)
    logq = jnp.concatenate([logs_m_xV, rest_s[..., None]], axis=-1)
    per_pair = kd.kl_divergence(logp, logq) * temperature ** 2
    return _sums(per_pair, w_x)


# ---------------------------------------------------------------------------------------------
# MinED vocabulary mapping (host side)
# ---------------------------------------------------------------------------------------------


def token_byte_strings(tokenizer) -> tuple[list[bytes | None], frozenset[int]]:
    """Each id's bytes (None for ids without a token) and the set of special-token ids.

    Byte-level BPE symbols are decoded to their bytes, SentencePiece ``▁`` becomes a space and
    ``<0xNN>`` byte-fallback tokens become that byte (the normalisation the chunk alignment
    uses); a piece the tokenizer does not spell as bytes is taken as its UTF-8 text with ``▁`` as
    a space. Special tokens are the tokenizer's ``all_special_ids`` and added tokens marked
    special; their entry is their content's UTF-8 bytes.
    """
    from distill_jax.tokens import tokenizer_info

    table = list(tokenizer_info(tokenizer).token_bytes or [])
    pieces = tokenizer.get_vocab()
    size = max(len(table), max(pieces.values(), default=-1) + 1, len(tokenizer))
    table += [None] * (size - len(table))
    for piece, i in pieces.items():
        if table[i] is None:
            table[i] = piece.replace("▁", " ").encode("utf-8")
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
            table[i] = added.content.encode("utf-8")
    return table, frozenset(i for i in special if 0 <= i < size)


def mined_mapping(student_tokenizer, teacher_tokenizer, *,
                  student_vocab_size: int | None = None, exact: bool = False) -> np.ndarray:
    """The MinED map: for every student id, the teacher id of the closest token (see module doc).

    Regular tokens: an exact byte match, else minimal Levenshtein distance over bytes, ties to the
    lowest teacher id (``nearest_tokens``). Special tokens map to the teacher's special token with
    the same content, else the same role (bos, eos, pad, unk), else -1.

    Args:
      student_tokenizer, teacher_tokenizer: Hugging Face tokenizers (or anything
        ``distill_jax.tokenizer.load_tokenizer`` returns).
      student_vocab_size: the student's logit width V when it is padded beyond the tokenizer;
        ids without a token map to -1. Default: the tokenizer's size.
      exact: only exact byte matches (and special tokens by content or role); every other
        student id maps to -1, and the map is made injective (of several student ids with the
        same teacher id, the lowest keeps it), as ``mined_sums(..., bucket=True)`` needs.

    Returns:
      (V,) int32 teacher ids, -1 where a student id has no counterpart.
    """
    s_bytes, s_special = token_byte_strings(student_tokenizer)
    t_bytes, t_special = token_byte_strings(teacher_tokenizer)
    size = len(s_bytes) if student_vocab_size is None else int(student_vocab_size)
    if size < len(s_bytes):
        raise ValueError(f"student_vocab_size={size} is smaller than the student tokenizer "
                         f"({len(s_bytes)} ids); pass the student's logit width or None")
    mapping = np.full((size,), NO_MATCH, np.int32)
    s_regular = [None if i in s_special else b for i, b in enumerate(s_bytes)]
    t_regular = [None if i in t_special else b for i, b in enumerate(t_bytes)]
    mapping[:len(s_bytes)] = nearest_tokens(s_regular, t_regular, exact_only=exact)
    t_by_content = {}
    for i in sorted(t_special):
        t_by_content.setdefault(t_bytes[i], i)
    for i in sorted(s_special):
        target = t_by_content.get(s_bytes[i], NO_MATCH)
        if target == NO_MATCH:
            for role in _SPECIAL_ROLES:
                t_role = getattr(teacher_tokenizer, role, None)
                if getattr(student_tokenizer, role, None) == i and t_role in t_special:
                    target = t_role
                    break
        mapping[i] = target
    if exact:  # injective: the first student id keeps a shared teacher id
        seen: set[int] = set()
        for i, t in enumerate(mapping.tolist()):
            if t >= 0:
                if t in seen:
                    mapping[i] = NO_MATCH
                seen.add(t)
    return mapping


def nearest_tokens(student_tokens: Sequence[bytes | None],
                   teacher_tokens: Sequence[bytes | None], *, exact_only: bool = False
                   ) -> np.ndarray:
    """For each student byte string, the index of the nearest teacher byte string.

    Exact matches first; otherwise minimal Levenshtein distance (unit-cost insertion, deletion and
    substitution of bytes), ties broken by the lowest teacher index (``exact_only``: -1 instead). None entries are not tokens:
    a None student entry maps to -1 and a None teacher entry is never chosen.

    Returns:
      (len(student_tokens),) int32 teacher indices (-1 for None entries, or when the teacher list
      has no tokens).
    """
    out = np.full((len(student_tokens),), NO_MATCH, np.int32)
    cand_ids = np.array([i for i, b in enumerate(teacher_tokens) if b is not None], np.int64)
    if cand_ids.size == 0:
        return out
    cands = [bytes(teacher_tokens[i]) for i in cand_ids]
    exact: dict[bytes, int] = {}
    for pos, b in enumerate(cands):
        exact.setdefault(b, pos)
    queries, query_rows = [], []
    for row, b in enumerate(student_tokens):
        if b is None:
            continue
        pos = exact.get(bytes(b))
        if pos is not None:
            out[row] = cand_ids[pos]
        else:
            queries.append(bytes(b))
            query_rows.append(row)
    if queries and not exact_only:
        out[np.array(query_rows)] = cand_ids[_nearest_by_edit_distance(queries, cands)]
    return out


def _as_matrix(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as a zero-padded (N, max_len) uint8 matrix and their lengths."""
    lens = np.fromiter((len(s) for s in strings), np.int64, len(strings))
    mat = np.zeros((len(strings), max(int(lens.max(initial=0)), 1)), np.uint8)
    flat = np.frombuffer(b"".join(strings), np.uint8)
    rows = np.repeat(np.arange(len(strings)), lens)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
    mat[rows, cols] = flat
    return mat, lens


def _levenshtein(a_MP: np.ndarray, b_NP: np.ndarray) -> np.ndarray:
    """Levenshtein distances of P pairs of byte strings, all pairs of lengths (m, n).

    ``a_MP`` (m, P) and ``b_NP`` (n, P) uint8 hold the strings as columns. One vectorised row of
    the dynamic programme per byte of ``a``; the in-row dependency
    ``D[i, j] = min(t_j, D[i, j-1] + 1)`` is a running minimum of ``t_j - j`` along the row, so
    no loop runs over ``b``. Rows are laid out (n + 1, P) so every operation is a contiguous
    vector over the pairs.
    """
    m, n = a_MP.shape[0], b_NP.shape[0]
    dtype = np.int16 if max(m, n) < 16_000 else np.int32
    j_N1 = np.arange(n + 1, dtype=dtype)[:, None]
    row = np.broadcast_to(j_N1, (n + 1, b_NP.shape[1]))
    new = np.empty(row.shape, dtype)
    for i in range(1, m + 1):
        new[0] = i
        np.minimum(row[1:] + 1, row[:-1] + (a_MP[i - 1] != b_NP), out=new[1:])
        new -= j_N1
        np.minimum.accumulate(new, axis=0, out=new)
        new += j_N1
        row, new = new, (np.empty_like(new) if i == 1 else row)
    return row[n].astype(np.int32)


def _pair_distances(q_mat, q_lens, c_mat, c_lens, q_idx, c_idx) -> np.ndarray:
    """Distances of the pairs (queries[q_idx[p]], candidates[c_idx[p]]), grouped by lengths."""
    dist = np.empty(q_idx.shape, np.int32)
    if dist.size == 0:
        return dist
    m_P, n_P = q_lens[q_idx], c_lens[c_idx]
    order = np.lexsort((n_P, m_P))
    key = m_P[order] * (c_lens.max() + 1) + n_P[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], order.size]):
        group = order[lo:hi]
        m, n = int(m_P[group[0]]), int(n_P[group[0]])
        step = max(1, _DP_BLOCK // (n + 1))
        for s in range(0, group.size, step):
            g = group[s:s + step]
            dist[g] = _levenshtein(q_mat[q_idx[g], :m].T, c_mat[c_idx[g], :n].T)
    return dist


def _delete_one(strings: set[bytes]) -> set[bytes]:
    """Every distinct string obtained by deleting one byte of one of ``strings``."""
    return {x[:p] + x[p + 1:] for x in strings for p in range(len(x))}


class _DeletionIndex:
    """Candidates by their deletion variants: ``level(j)[key]`` lists the candidates from which
    deleting exactly j bytes gives ``key`` (built one level at a time, on demand)."""

    def __init__(self, cands: Sequence[bytes]):
        self._by_count: list[dict[bytes, list[int]]] = []
        self._variants: list[set[bytes]] = [{c} for c in cands]

    def level(self, j: int) -> dict[bytes, list[int]]:
        while len(self._by_count) <= j:
            if self._by_count:
                self._variants = [_delete_one(v) for v in self._variants]
            index: dict[bytes, list[int]] = {}
            for pos, variants in enumerate(self._variants):
                for key in variants:
                    index.setdefault(key, []).append(pos)
            self._by_count.append(index)
        return self._by_count[j]


def _nearest_by_edit_distance(queries: Sequence[bytes], cands: Sequence[bytes], *,
                              radius: int = 1) -> np.ndarray:
    """Index into ``cands`` of each query's nearest candidate (min distance, then lowest index).

    Queries must not occur in ``cands`` (exact matches are resolved before). Stage 1, for
    r = 1..radius: the candidates sharing a deletion variant with a query (at most r bytes deleted
    on each side) include every candidate within distance r of it; their exact distances settle
    the queries whose best is <= r. Stage 2 (``_scan``): the remaining queries against every
    candidate, restricted and pruned by bounds. Radius 1 was the fastest setting on real
    vocabularies (Mistral 7B v0.1 against SmolLM2, both directions): most tokens without an exact
    match are one edit from a teacher token, and a radius-2 index costs about as much to build
    as the scan it saves.
    """
    q_mat, q_lens = _as_matrix(queries)
    c_mat, c_lens = _as_matrix(cands)
    n_cands = len(cands)
    best = np.full((len(queries),), np.iinfo(np.int32).max, np.int64)
    best_pos = np.zeros((len(queries),), np.int64)
    open_q = np.arange(len(queries))
    index = _DeletionIndex(cands)
    q_levels: dict[int, list[set[bytes]]] = {}
    for r in range(1, radius + 1):
        if open_q.size == 0:
            break
        tables = [index.level(j) for j in range(r + 1)]
        q_found: list[int] = []
        c_found: list[int] = []
        for q in open_q.tolist():
            levels = q_levels.setdefault(q, [{queries[q]}])
            while len(levels) <= r:
                levels.append(_delete_one(levels[-1]))
            start = len(c_found)
            for i in range(r + 1):       # pairs (i, j) of deletion counts new at radius r
                for key in levels[i]:
                    for j in (range(r + 1) if i == r else (r,)):
                        hit = tables[j].get(key)
                        if hit:
                            c_found.extend(hit)
            q_found.extend([q] * (len(c_found) - start))
        if c_found:
            pair = np.unique(np.array(q_found, np.int64) * n_cands + np.array(c_found, np.int64))
            q_idx, c_idx = pair // n_cands, pair % n_cands
            dist = _pair_distances(q_mat, q_lens, c_mat, c_lens, q_idx, c_idx)
            _update_best(best, best_pos, q_idx, c_idx, dist)
        open_q = open_q[best[open_q] > r]
    if open_q.size:
        _scan(best, best_pos, open_q, queries, cands, q_mat, q_lens, c_mat, c_lens)
    return best_pos


def _update_best(best, best_pos, q_idx, c_idx, dist) -> None:
    """Lower ``best``/``best_pos`` with the pairs' (distance, candidate) minima, in place."""
    if q_idx.size == 0:
        return
    order = np.lexsort((c_idx, dist, q_idx))
    q_sorted = q_idx[order]
    first = order[np.r_[True, q_sorted[1:] != q_sorted[:-1]]]
    q, d, c = q_idx[first], dist[first], c_idx[first]
    better = (d < best[q]) | ((d == best[q]) & (c < best_pos[q]))
    best[q[better]] = d[better]
    best_pos[q[better]] = c[better]


def _byte_counts(c_mat: np.ndarray, c_lens: np.ndarray) -> np.ndarray:
    """(256, N) uint8: how often each byte occurs in each candidate (capped at 255)."""
    n = c_mat.shape[0]
    live = np.arange(c_mat.shape[1]) < c_lens[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], c_mat.shape)[live]
    counts = np.bincount(c_mat[live].astype(np.int64) * n + rows, minlength=256 * n)
    return np.minimum(counts, 255).astype(np.uint8).reshape(256, n)


def _substring_bounds(queries: Sequence[bytes], open_q: np.ndarray, cands: Sequence[bytes]
                      ) -> np.ndarray:
    """Upper bounds of each query's distance to its nearest candidate: ``len(q) - len(t)`` for
    the longest candidate t that is a substring of q (delete the rest), or, when there is none,
    ``max(len(q), n)`` for a shortest candidate of length n (substitute, then insert or delete)."""
    present = set(cands)
    longest = max(map(len, cands))
    shortest = min(map(len, cands))
    ub = np.empty(open_q.shape, np.int64)
    for row, qi in enumerate(open_q.tolist()):
        q = queries[qi]
        m, best = len(q), 0
        for size in range(min(m, longest), 0, -1):
            if any(q[i:i + size] in present for i in range(m - size + 1)):
                best = size
                break
        ub[row] = m - best if best else max(m, shortest)
    return ub


def _scan(best, best_pos, open_q, queries, cands, q_mat, q_lens, c_mat, c_lens) -> None:
    """Exhaustive search for ``open_q``, restricted by length and pruned by a lower bound.

    A query of length m whose distance is at most u (``_substring_bounds``) has its nearest
    candidates among those of length in [m - u, m + u] (a candidate of length n is at distance
    >= |n - m|); queries are grouped by (m, u) and each group is searched in that length band
    by ``_scan_band``.
    """
    counts_BN = _byte_counts(c_mat, c_lens)
    by_len = np.argsort(c_lens, kind="stable")
    sorted_lens = c_lens[by_len]
    ub = _substring_bounds(queries, open_q, cands)
    m_all = q_lens[open_q]
    keys = np.unique(np.stack([m_all, ub], axis=1), axis=0)
    for m, u in keys.tolist():
        group = open_q[(m_all == m) & (ub == u)]
        cols = by_len[np.searchsorted(sorted_lens, m - u, "left"):
                      np.searchsorted(sorted_lens, m + u, "right")]
        _scan_band(best, best_pos, group, u, q_mat, q_lens, c_mat, c_lens, counts_BN, cols)


def _occurrence(a_QM: np.ndarray) -> np.ndarray:
    """``occ[q, p]``: how many times ``a[q, p]`` occurs in ``a[q, :p + 1]`` (1 for a first)."""
    order = np.argsort(a_QM, axis=1, kind="stable")
    sorted_QM = np.take_along_axis(a_QM, order, axis=1)
    pos_M = np.arange(a_QM.shape[1])
    first_QM = np.ones(a_QM.shape, bool)
    first_QM[:, 1:] = sorted_QM[:, 1:] != sorted_QM[:, :-1]
    start_QM = np.maximum.accumulate(np.where(first_QM, pos_M, 0), axis=1)
    occ_QM = np.empty(a_QM.shape, np.int64)
    np.put_along_axis(occ_QM, order, pos_M - start_QM + 1, axis=1)
    return occ_QM


def _scan_band(best, best_pos, qs, bound, q_mat, q_lens, c_mat, c_lens, counts_BN, cols) -> None:
    """Update ``best`` of the queries ``qs`` (all of one length, each at distance <= ``bound``
    from some candidate) with the candidates ``cols``, pruned by a lower bound.

    ``distance >= max(m, n) - common``, where ``common`` is the size of the multiset intersection
    of the two strings' bytes (an edit changes at most one byte of each side). ``common`` for a
    block of queries against the candidates is one matrix product, ``G @ F`` with
    ``G[q, (b, k)] = 1`` when byte b occurs at least k times in query q and ``F[(b, k), c] = 1``
    when it occurs at least k times in candidate c. The exact distance to each query's candidate
    of smallest lower bound tightens the upper bound u; among the candidates whose lower bound is
    at most u, exact distances follow level by level of increasing lower bound, for the queries
    whose best distance so far is not below the level: every candidate at the minimal distance is
    evaluated, none whose lower bound exceeds it.
    """
    m = int(q_lens[qs[0]])
    maxlen_C = np.maximum(c_lens[cols], m).astype(np.float32)
    step = max(1, 2 * _DP_BLOCK // max(cols.size, 1))
    for s in range(0, qs.size, step):
        q = qs[s:s + step]
        a_QM = q_mat[q, :max(m, 1)].astype(np.int64)
        feature_QM = (a_QM * 256 + np.minimum(_occurrence(a_QM), 255) - 1)[:, :m]
        features, inverse = np.unique(feature_QM, return_inverse=True)
        g_QF = np.zeros((q.size, features.size), np.float32)
        g_QF[np.repeat(np.arange(q.size), m), inverse.reshape(-1)] = 1.0
        f_FC = (counts_BN[features // 256][:, cols] > (features % 256)[:, None]).astype(np.float32)
        lower_QC = g_QF @ f_FC
        np.subtract(maxlen_C, lower_QC, out=lower_QC)
        seed = cols[np.argmin(lower_QC, axis=1)].astype(np.int64)
        _update_best(best, best_pos, q, seed,
                     _pair_distances(q_mat, q_lens, c_mat, c_lens, q, seed))
        cap_Q1 = np.minimum(best[q], bound)[:, None].astype(np.float32)
        hit_r, hit_c = np.nonzero(lower_QC <= cap_Q1)
        if hit_r.size == 0:
            continue
        hit_lower = lower_QC[hit_r, hit_c].astype(np.int64)
        order = np.argsort(hit_lower, kind="stable")
        hit_r, hit_c, hit_lower = hit_r[order], hit_c[order], hit_lower[order]
        edges = np.flatnonzero(np.r_[True, hit_lower[1:] != hit_lower[:-1], True])
        for lo, hi in zip(edges[:-1], edges[1:]):
            level = hit_lower[lo]
            rows = hit_r[lo:hi]
            live = best[q[rows]] >= level
            if not live.any():
                if best[q].max() < level:
                    break
                continue
            q_idx, c_idx = q[rows[live]], cols[hit_c[lo:hi][live]].astype(np.int64)
            _update_best(best, best_pos, q_idx, c_idx,
                         _pair_distances(q_mat, q_lens, c_mat, c_lens, q_idx, c_idx))
