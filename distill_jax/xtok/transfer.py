"""Tokenizer transfer: the teacher with a new tokenizer, new embeddings initialised by FVT.

FVT (Fast Vocabulary Transfer) gives each token of the new tokenizer the mean of the teacher
embeddings of that token's teacher tokenization: the token is spelled out as its exact bytes
(byte-level BPE symbols are their bytes, SentencePiece ``▁`` is a space, ``<0xNN>`` is the byte
NN), those bytes are tokenized by the teacher tokenizer, and the teacher rows of the pieces are
averaged. A token whose bytes are exactly one teacher token's bytes gets that row unchanged.
Special tokens map by their string, else by their role: BOS to BOS, EOS to EOS, padding to
padding (else EOS), end-of-turn chat tokens (``<|im_end|>``, ``[/INST]``, ``<end_of_turn>``,
``<|eot_id|>``) to the teacher's end-of-turn token (else EOS), start-of-turn tokens to the
teacher's start-of-turn token (else BOS), unknown to unknown. Tokens that cannot be spelled
in the teacher's vocabulary, or are empty, get the mean of all teacher rows; so do the padding
rows of a vocabulary larger than the tokenizer.

An untied lm_head gets the same treatment column by column: a new token's output vector is the
mean (not the sum) of its pieces' output vectors, so its logit is the mean of the pieces'
teacher logits and stays on the teacher's logit scale.

:func:`fvt_plan` does the tokenizer work once, on the host (batch-encoded with the fast
tokenizer: seconds for a 150k vocabulary); :func:`fvt_embeddings` applies it to one matrix;
:func:`transfer_model` builds the whole student, sharded on a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from distill_jax import models as M
from distill_jax.tokens import bytes_to_unicode, special_token_ids, tokenizer_info

__all__ = ["FVTPlan", "FVTReport", "derived_config", "fvt_embeddings", "fvt_plan",
           "transfer_model"]

# Chat-template tokens by role, as the common families spell them.
TURN_START_TOKENS = ("<|im_start|>", "[INST]", "<start_of_turn>", "<|start_header_id|>")
TURN_END_TOKENS = ("<|im_end|>", "[/INST]", "<end_of_turn>", "<|eot_id|>", "<|end|>")

_BYTE_TO_UNICODE = bytes_to_unicode()
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_MAX_EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class FVTReport:
    """How the new rows were made.

    Attributes:
      copied: rows copied from exactly one teacher row (same bytes, or a special token mapped
        by its string or role; ``special`` of them).
      averaged: rows that are the mean of two or more teacher rows.
      defaulted: rows set to the mean teacher row (``padding`` of them are rows past the
        tokenizer's vocabulary).
      special: special tokens mapped to a teacher special token.
      padding: rows past ``len(new_tokenizer)`` (a padded vocabulary).
      defaulted_tokens: up to ten of the defaulted tokens, for a look at what could not map.
    """

    copied: int
    averaged: int
    defaulted: int
    special: int
    padding: int
    defaulted_tokens: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for the logs."""
        total = self.copied + self.averaged + self.defaulted
        line = (f"FVT over {total:,} rows: {self.copied:,} copied ({self.special} special), "
                f"{self.averaged:,} averaged, {self.defaulted:,} set to the mean teacher row")
        if self.padding:
            line += f" ({self.padding:,} of them padding)"
        if self.defaulted_tokens:
            line += f"; e.g. {', '.join(self.defaulted_tokens)}"
        return line


@dataclasses.dataclass(frozen=True)
class FVTPlan:
    """The teacher tokens of every new token: what :func:`fvt_embeddings` averages.

    Attributes:
      teacher_ids: int32 ``(V_new, K)``; row ``i`` holds the teacher ids of new token ``i``
        in its first ``counts[i]`` entries (the rest are 0 and unused).
      counts: int32 ``(V_new,)``; 0 means "the mean teacher row".
      num_teacher_tokens: ``len(teacher_tokenizer)``: the teacher rows the mean is taken over.
      report: how the rows were made.
    """

    teacher_ids: np.ndarray
    counts: np.ndarray
    num_teacher_tokens: int
    report: FVTReport

    @property
    def vocab_size(self) -> int:
        return int(self.counts.shape[0])


# ----------------------------------------------------------------------------------------------
# The plan (host side)


def _token_bytes(tokenizer, side: str) -> list[bytes | None]:
    table = tokenizer_info(tokenizer).token_bytes
    if table is None:
        raise ValueError(f"FVT needs a fast (tokenizers-backed) {side} tokenizer to spell its "
                         f"tokens as bytes; got {type(tokenizer).__name__}. Load it with "
                         "distill_jax.tokenizer.load_tokenizer (or AutoTokenizer, use_fast=True)")
    return table


def _added_tokens(tokenizer) -> dict[int, Any]:
    """Added tokens by id (``AddedToken`` objects: ``.content``, ``.special``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return dict(backend.get_added_tokens_decoder()) if backend is not None else {}


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in special_token_ids(tokenizer)}


def _teacher_special_targets(teacher) -> tuple[dict[str, int], dict[str, int | None]]:
    """The teacher's special tokens by string, and its token for each role."""
    by_string = {tok.content: i for i, tok in _added_tokens(teacher).items()}
    for i in _special_ids(teacher):
        piece = teacher.convert_ids_to_tokens(i)
        if isinstance(piece, str):
            by_string.setdefault(piece, i)

    def first(strings, default):
        return next((by_string[s] for s in strings if s in by_string), default)

    eos, bos = teacher.eos_token_id, teacher.bos_token_id
    pad = teacher.pad_token_id if teacher.pad_token_id is not None else eos
    roles = {"bos": bos, "eos": eos, "pad": pad, "unk": teacher.unk_token_id,
             "turn_end": first(TURN_END_TOKENS, eos), "turn_start": first(TURN_START_TOKENS, bos)}
    return by_string, roles


def _special_map(teacher, new) -> dict[int, int | None]:
    """Each special token of ``new`` -> the teacher token it copies (None: the mean row)."""
    by_string, roles = _teacher_special_targets(teacher)
    out: dict[int, int | None] = {}
    for i in sorted(_special_ids(new)):
        piece = new.convert_ids_to_tokens(i)
        if isinstance(piece, str) and piece in by_string:
            out[i] = by_string[piece]
        elif i == new.bos_token_id:
            out[i] = roles["bos"]
        elif i == new.eos_token_id:
            out[i] = roles["eos"]
        elif piece in TURN_END_TOKENS:
            out[i] = roles["turn_end"]
        elif piece in TURN_START_TOKENS:
            out[i] = roles["turn_start"]
        elif i == new.pad_token_id:
            out[i] = roles["pad"]
        elif i == new.unk_token_id:
            out[i] = roles["unk"]
        else:
            out[i] = None
    return out


def _exact_index(vocab: dict[str, int], table: list[bytes | None],
                 specials: set[int]) -> dict[bytes, int]:
    """Teacher bytes -> id, for ordinary tokens; a byte-fallback piece (``<0x41>``) only where
    no ordinary token spells the same byte (the tokenizer itself prefers the ordinary one)."""
    exact: dict[bytes, int] = {}
    fallback: dict[bytes, int] = {}
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        data = table[i] if i < len(table) else None
        if not data or i in specials:
            continue
        if _BYTE_FALLBACK.match(piece) and len(data) == 1:
            fallback.setdefault(data, i)
        else:
            exact.setdefault(data, i)
    for data, i in fallback.items():
        exact.setdefault(data, i)
    return exact


def _spells(ids: Sequence[int], data: bytes, table: list[bytes | None]) -> bool:
    """Whether the teacher tokens ``ids`` spell exactly ``data``."""
    if not ids:
        return False
    pieces = [table[i] if 0 <= i < len(table) else None for i in ids]
    return None not in pieces and b"".join(pieces) == data


def _utf8_runs(data: bytes):
    """``(text, True)`` for each run of valid UTF-8 and ``(byte, False)`` for each stray byte."""
    s = data.decode("utf-8", "surrogateescape")
    run: list[str] = []
    for c in s:
        if "\udc80" <= c <= "\udcff":
            if run:
                yield "".join(run), True
                run = []
            yield ord(c) - 0xDC00, False
        else:
            run.append(c)
    if run:
        yield "".join(run), True


def _model_pieces(teacher, data: bytes, table: list[bytes | None],
                  exact: dict[bytes, int]) -> list[int] | None:
    """The teacher model's tokens of ``data`` as one word (no normaliser, no pre-tokeniser, no
    dummy prefix): for bytes that are not valid UTF-8 on their own, and for tokenizers whose
    pipeline changes a lone piece (e.g. SentencePiece's dummy prefix). None if impossible."""
    info = tokenizer_info(teacher)
    model = info.backend.model
    if info.byte_level:
        ids = [t.id for t in model.tokenize("".join(_BYTE_TO_UNICODE[b] for b in data))]
        return ids if _spells(ids, data, table) else None
    ids: list[int] = []
    for run, is_text in _utf8_runs(data):
        if not is_text:
            j = exact.get(bytes([run]))
            if j is None:
                return None
            ids.append(j)
            continue
        chunk = run.encode("utf-8")
        for form in dict.fromkeys((run.replace(" ", "▁"), run)):
            got = [t.id for t in model.tokenize(form)]
            if _spells(got, chunk, table):
                ids.extend(got)
                break
        else:
            return None
    return ids if _spells(ids, data, table) else None


def fvt_plan(teacher_tokenizer, new_tokenizer, *, new_vocab_size: int | None = None) -> FVTPlan:
    """Which teacher tokens each new token averages (see the module docstring for the rules).

    ``new_vocab_size`` (default ``len(new_tokenizer)``) may be larger than the tokenizer (a
    padded vocabulary); the extra rows get the mean teacher row.
    """
    n_new = len(new_tokenizer)
    vocab = n_new if new_vocab_size is None else int(new_vocab_size)
    if vocab < n_new:
        raise ValueError(f"new_vocab_size={vocab} is smaller than the new tokenizer's "
                         f"{n_new} tokens; leave it unset (or at least {n_new})")
    t_table = _token_bytes(teacher_tokenizer, "teacher")
    n_table = _token_bytes(new_tokenizer, "new")
    t_specials = _special_ids(teacher_tokenizer)
    special_map = _special_map(teacher_tokenizer, new_tokenizer)
    t_vocab = teacher_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    exact = _exact_index(t_vocab, t_table, t_specials)
    n_pieces = {i: piece for piece, i in
                new_tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}

    pieces: list[list[int] | None] = [None] * vocab
    to_encode: list[int] = []
    to_model: list[int] = []
    for i in range(n_new):
        if i in special_map:
            j = special_map[i]
            pieces[i] = None if j is None else [j]
            continue
        data = n_table[i] if i < len(n_table) else None
        if not data:
            continue
        j = t_vocab.get(n_pieces.get(i))  # the same piece, spelling the same bytes
        if j is None or j in t_specials or j >= len(t_table) or t_table[j] != data:
            j = exact.get(data)
        if j is not None:
            pieces[i] = [j]
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            to_model.append(i)
            continue
        to_encode.append(i)
    backend = tokenizer_info(teacher_tokenizer).backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster
    encodings = encode([n_table[i].decode("utf-8") for i in to_encode], add_special_tokens=False)
    for i, enc in zip(to_encode, encodings):
        ids = enc.ids
        if _spells(ids, n_table[i], t_table):
            pieces[i] = list(ids)
        else:
            to_model.append(i)
    for i in to_model:
        pieces[i] = _model_pieces(teacher_tokenizer, n_table[i], t_table, exact)

    counts = np.fromiter((len(p) if p else 0 for p in pieces), np.int32, vocab)
    width = max(1, int(counts.max(initial=0)))
    teacher_ids = np.zeros((vocab, width), np.int32)
    for i, p in enumerate(pieces):
        if p:
            teacher_ids[i, :len(p)] = p
    defaulted = np.flatnonzero(counts[:n_new] == 0)[:_MAX_EXAMPLES]
    examples = tuple(repr(new_tokenizer.convert_ids_to_tokens(int(i))) for i in defaulted)
    report = FVTReport(
        copied=int((counts == 1).sum()), averaged=int((counts > 1).sum()),
        defaulted=int((counts == 0).sum()),
        special=sum(1 for j in special_map.values() if j is not None),
        padding=vocab - n_new, defaulted_tokens=examples)
    return FVTPlan(teacher_ids, counts, len(teacher_tokenizer), report)


# ----------------------------------------------------------------------------------------------
# Applying the plan (device side)


def _apply_plan(table_VD: jax.Array, teacher_ids_NK: jax.Array, counts_N: jax.Array,
                num_teacher_tokens: int) -> jax.Array:
    """Rows ``(N, D)`` in fp32: the mean of each row's teacher rows, or the mean teacher row."""
    table_VD = table_VD.astype(jnp.float32)
    mean_D = jnp.mean(table_VD[:num_teacher_tokens], axis=0)

    def add_piece(k, acc_ND):
        row_ND = jnp.take(table_VD, teacher_ids_NK[:, k], axis=0)
        return acc_ND + jnp.where((k < counts_N)[:, None], row_ND, 0.0)

    acc_ND = jnp.zeros((teacher_ids_NK.shape[0], table_VD.shape[1]), jnp.float32)
    acc_ND = jax.lax.fori_loop(0, teacher_ids_NK.shape[1], add_piece, acc_ND)
    n_N1 = jnp.maximum(counts_N, 1).astype(jnp.float32)[:, None]
    return jnp.where((counts_N > 0)[:, None], acc_ND / n_N1, mean_D)


_apply_plan_jit = jax.jit(_apply_plan, static_argnums=3)


def _check_fits(plan: FVTPlan, rows: int) -> None:
    used = int(plan.teacher_ids.max(initial=0))
    if used >= rows or plan.num_teacher_tokens > rows:
        raise ValueError(
            f"the teacher tokenizer ({plan.num_teacher_tokens} tokens, ids up to {used}) does not "
            f"fit the teacher's {rows}-row embedding: the teacher tokenizer is not the teacher "
            "model's (set teacher.tokenizer to the tokenizer the teacher was trained with)")


def fvt_embeddings(teacher_embed_VD: Any, teacher_tokenizer, new_tokenizer, *,
                   new_vocab_size: int | None = None,
                   plan: FVTPlan | None = None) -> tuple[jax.Array, FVTReport]:
    """FVT rows ``(V_new, D)`` from the teacher's ``(V, D)`` embedding, and how they were made.

    Each new token's row is the mean of the teacher rows of its teacher tokenization (see the
    module docstring). For an untied lm_head ``(D, V)`` pass its transpose and transpose the
    result. The mean is taken in fp32; the result has the input's dtype. ``plan`` (from
    :func:`fvt_plan`) skips the tokenizer work when it is already done.
    """
    if plan is None:
        plan = fvt_plan(teacher_tokenizer, new_tokenizer, new_vocab_size=new_vocab_size)
    table_VD = jnp.asarray(teacher_embed_VD)
    if table_VD.ndim != 2:
        raise ValueError(f"teacher_embed_VD must be (vocab, dim), got shape {table_VD.shape}")
    _check_fits(plan, table_VD.shape[0])
    rows = _apply_plan_jit(table_VD, plan.teacher_ids, plan.counts, plan.num_teacher_tokens)
    return rows.astype(table_VD.dtype), plan.report


# ----------------------------------------------------------------------------------------------
# The transferred model


def derived_config(teacher_cfg: M.ModelConfig, *, layers: Sequence[int] = (),
                   new_tokenizer=None, **changes: Any) -> M.ModelConfig:
    """The config of a model made from the teacher: keeping ``layers`` (indices into its stack,
    in order; all when empty) and, given ``new_tokenizer``, with that tokenizer's vocabulary
    size (``len``; a larger ``vocab_size`` in ``changes`` pads it) and special token ids."""
    layers = tuple(int(i) for i in layers) or tuple(range(teacher_cfg.num_layers))
    bad = [i for i in layers if not 0 <= i < teacher_cfg.num_layers]
    if bad:
        raise ValueError(f"student.layers {bad} out of range for a {teacher_cfg.num_layers}-layer "
                         f"teacher (valid: 0..{teacher_cfg.num_layers - 1}, or [] for all)")
    kept = dict(num_layers=len(layers),
                layer_types=tuple(teacher_cfg.layer_types[i] for i in layers))
    if new_tokenizer is not None:
        n = len(new_tokenizer)
        vocab = int(changes.pop("vocab_size", n))
        if vocab < n:
            raise ValueError(f"vocab_size={vocab} is smaller than the new tokenizer's {n} tokens; "
                             "remove it from student.overrides (or make it at least that)")
        kept.update(vocab_size=vocab, bos_token_id=new_tokenizer.bos_token_id,
                    eos_token_id=new_tokenizer.eos_token_id,
                    pad_token_id=new_tokenizer.pad_token_id)
    return teacher_cfg.replace(**{**kept, **changes})


def transfer_model(teacher: M.Model, teacher_tokenizer, new_tokenizer, *,
                   layers: Sequence[int] = (), mesh: Mesh,
                   rules: Mapping[str, Any] | None = None, plan: FVTPlan | None = None,
                   **config_changes: Any) -> M.Model:
    """The teacher (its ``layers``, all when empty) with ``new_tokenizer`` in place of its own.

    The embedding (and an untied lm_head, column by column) is re-made by FVT for the new
    vocabulary (``len(new_tokenizer)``, or a larger ``vocab_size`` in ``config_changes``);
    everything else is copied. ``config_changes`` are ModelConfig fields (``dtype``,
    ``param_dtype``, ``remat``, ...). The params are created sharded on ``mesh`` under
    ``rules``. ``plan`` (from :func:`fvt_plan`) skips the tokenizer work when it is done.
    """
    new_cfg = derived_config(teacher.config, layers=layers, new_tokenizer=new_tokenizer,
                             **config_changes)
    if plan is None:
        plan = fvt_plan(teacher_tokenizer, new_tokenizer, new_vocab_size=new_cfg.vocab_size)
    elif plan.vocab_size != new_cfg.vocab_size:
        raise ValueError(f"the FVT plan has {plan.vocab_size} rows but the student's vocabulary "
                         f"is {new_cfg.vocab_size}; make the plan with new_vocab_size="
                         f"{new_cfg.vocab_size}")
    _check_fits(plan, teacher.config.vocab_size)
    keep = tuple(int(i) for i in layers)
    tied = teacher.config.tie_word_embeddings
    if new_cfg.tie_word_embeddings != tied:
        raise ValueError("tokenizer transfer keeps the teacher's tie_word_embeddings; remove it "
                         "from the student's overrides")

    def make(params, teacher_ids_NK, counts_N):
        out = dict(params)
        if keep:
            idx = jnp.asarray(keep)
            out["layers"] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), params["layers"])
        fvt = functools.partial(_apply_plan, teacher_ids_NK=teacher_ids_NK, counts_N=counts_N,
                                num_teacher_tokens=plan.num_teacher_tokens)
        out["embed"] = fvt(params["embed"])
        if not tied:
            out["lm_head"] = fvt(params["lm_head"].T).T
        return jax.tree.map(lambda x: x.astype(new_cfg.param_dtype), out)

    shardings = M.param_shardings(new_cfg, mesh, rules)
    params = jax.jit(make, out_shardings=shardings)(teacher.params, plan.teacher_ids, plan.counts)
    return M.Model(new_cfg, params)
