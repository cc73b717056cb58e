"""On-policy distillation across tokenizers: the student's samples as ALM batches.

The student (tokenizer A) samples completions inside the jitted rollout
(:func:`distill_jax.onpolicy.onpolicy_batch`); here, on the host, each packed row
(``prompt + completion``, loss on the completion through EOS) becomes the cross-tokenizer batch
that the off-policy pipeline builds for the same text, so the live teacher (tokenizer B) scores
its own tokens of it and ALM trains on the aligned chunks.

Decoding is byte-exact: the row's ids become bytes through the vocabulary
(:func:`distill_jax.tokens.token_bytes`: byte-level symbols, ``<0xNN>`` byte fallback,
SentencePiece ``▁``), never through the tokenizer's text decode (which may normalise, strip or
replace). A leading BOS and a final EOS (the tokenizer's ``eos_token_id``) are not text: they are
the zero-width BOS/EOS the pipeline adds. Other special tokens (a chat template's turn markers)
are their text, as in a rendered chat. A SentencePiece tokenizer that prepends a dummy-prefix
space (Mistral, Llama 2) spells a tokenized text's first word with a space the text does not
have: one leading space of the prompt is dropped, and of the completion too for
``prompt_response`` data, whose pipeline tokenizes the response on its own (in a chat the
completion continues the rendered text, so its leading space is real).

Cut characters. A sampled sequence need not be valid UTF-8 (a byte-level student can stop in the
middle of a multi-byte character, or sample stray continuation bytes). The completion is cut at
the end of the longest valid UTF-8 prefix that ends on one of its token boundaries: tokens from
there on (and a final EOS after them) are dropped from the row, so both sides train on exactly
the same, complete characters. ``cut_tokens`` counts the dropped tokens. The dropped part is not
trained (no teacher tokenization of it exists), so nothing pushes a student away from invalid
UTF-8: in a test, Adam with its default ``eps`` (which amplifies tiny gradients) drove a random
student there; watch ``cut_tokens``.

The document. With ``teacher_prompts=None`` a row is the record ``{prompt, response}`` of data
kind ``prompt_response``: the prompt's text (the student's chat rendering, for chats) and the
decoded completion, tokenized by both tokenizers exactly as :func:`distill_jax.data.tokenize
.tokenize_records` does (prompt and completion tokenized separately, BOS/EOS as configured, EOS
only where the student sampled it) and aligned by :func:`distill_jax.xtok.align_tokens`, then
packed by :class:`distill_jax.data.packing.BatchPacker`, one sample per row. So for a sample that
is the student tokenizer's own tokenization of its text the batch equals, key for key, the
off-policy pipeline's batch of that record. (In a chat whose turn end is the student's EOS, as
SmolLM2's ``<|im_end|>``, the sampled EOS is the zero-width EOS and pairs with the teacher's EOS
by role, where the off-policy pipeline would give the teacher the text ``<|im_end|>``.) A sample
the student spelled otherwise (a word in several tokens the tokenizer would have merged) keeps
its own ids on the student side (that is what the student is trained on), with the byte spans of
its tokens, realigned to the teacher's tokens of the same bytes.

The teacher's chat template. With ``teacher_prompts`` (one string per row, e.g.
:func:`teacher_prompt`: the teacher's own rendering of the conversation so far with its
generation prompt), the teacher sees its own template instead of the student's: its row is the
teacher prompt followed by the completion's bytes and, when the student ended its turn (sampled
EOS or another stop token), the teacher's own end of an assistant turn (the special its template
puts after an assistant reply: ``<|im_end|>``, ``</s>``, ...), so special tokens map by role. The
prompts then differ in bytes; the two sides are aligned in a common frame where the completion
starts at the same byte, the stop tokens on both sides are zero-width at the completion's end (one
chunk: the end of the turn), and every chunk with a prompt target (untrained on both sides, and
in different bytes) is dropped. The off-policy pipeline has no such mode (it gives the teacher
the student's rendering).

Rows. The batch has the data pipeline's shapes: ``(B, seq_len)`` student and
``(B, teacher_seq_len)`` teacher arrays, row ``i`` holding sample ``i``. A document longer than a
row is cut at the last byte where both tokenizations have a boundary (the pipeline's
``cut_point``) and its rest dropped (``cut_tokens`` counts those too).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Mapping

import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.packing import BatchPacker, Piece, cut_point
from distill_jax.data.tokenize import TokenizedDoc, tokenize_records
from distill_jax.tokens import Tokens, tokenizer_info
from distill_jax.xtok.align import Alignment, align_tokens

__all__ = ["COMPLETION_BYTES", "CUT_TOKENS", "FINISHED", "SampleText", "decode_rows",
           "teacher_prompt", "teacher_turn_end", "xtok_onpolicy_batch", "xtok_rows",
           "xtok_rollout_metrics"]

# Extra per-row arrays of an xtok_rows batch (the step ignores them).
CUT_TOKENS = "onpolicy/cut_tokens"            # (B,) int32 completion tokens dropped
COMPLETION_BYTES = "onpolicy/completion_bytes"  # (B,) int32 completion bytes (no stop token)
FINISHED = "onpolicy/finished"                # (B,) bool the completion ends with a stop token

# Metric names.
TEACHER_LOGPROB_PER_BYTE = "onpolicy/teacher_logprob_per_byte"
EOS_SHARE = "onpolicy/eos_share"
MEAN_BYTES = "onpolicy/mean_completion_bytes"
TIME_ROLLOUT = "time/rollout"
TIME_RETOKENIZE = "time/retokenize"


@dataclasses.dataclass(frozen=True)
class SampleText:
    """One on-policy row decoded to bytes.

    Attributes:
      prompt_ids, completion_ids: the student's ids (the completion cut to whole characters,
        its final EOS removed).
      prompt: the prompt's text (leading BOS excluded).
      completion: the completion's bytes (valid UTF-8).
      eos: the student sampled its EOS id at the end (kept after the cut).
      stopped: the completion ends with a stop token (EOS, or a stop special such as a turn end).
      cut: completion tokens dropped to end on a whole character.
      prompt_prefix, completion_prefix: 1 where the segment's first token carries a
        dummy-prefix space that is not text (dropped from ``prompt`` / ``completion``), else 0.
    """

    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    prompt: str
    completion: bytes
    eos: bool
    stopped: bool
    cut: int
    prompt_prefix: int = 0
    completion_prefix: int = 0


def _bytes_of(table: list[bytes | None], ids: np.ndarray) -> list[bytes]:
    out = []
    for i in ids.tolist():
        piece = table[i] if 0 <= i < len(table) else None
        if piece is None:
            raise ValueError(f"token id {i} has no byte spelling in the student's vocabulary; "
                             "on-policy cross-tokenizer rows need a byte-level, SentencePiece or "
                             "byte-fallback student tokenizer")
        out.append(piece)
    return out


def _valid_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that is valid UTF-8."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as err:
        return err.start


def _adds_dummy_prefix(info) -> bool:
    """Whether the tokenizer spells a text's first word with a space the text lacks."""
    ids, _ = info.encode("a")
    table = info.token_bytes
    return bool(ids) and table is not None and (table[ids[0]] or b"").startswith(b" ")


def _strip_prefix(data: bytes, dummy: bool) -> tuple[bytes, int]:
    return (data[1:], 1) if dummy and data.startswith(b" ") else (data, 0)


def decode_rows(batch: Mapping[str, np.ndarray], student_tokenizer, *,
                stop_ids: Sequence[int] = (), record: str = "prompt_response") -> list[SampleText]:
    """Each row of an on-policy batch (``rows.ROW_KEYS`` + ``completion_lengths``) as text.

    The prompt is the row's real tokens before the last ``completion_lengths`` ones. Byte-exact
    (module docstring); ``stop_ids`` are the rollout's other stop tokens (a turn end), which
    mark the completion as ``stopped`` but stay text; ``record`` is the data kind
    (``prompt_response`` or ``chat``: whether the completion was tokenized on its own).
    """
    info = tokenizer_info(student_tokenizer)
    dummy = _adds_dummy_prefix(info)
    table = info.token_bytes
    if table is None:
        raise ValueError("the student tokenizer has no Rust backend, so its tokens' bytes are "
                         "unknown; load it with distill_jax.tokenizer.load_tokenizer")
    seg = np.asarray(batch["segment_ids"])
    clen = np.asarray(batch["completion_lengths"])
    toks = np.asarray(batch["tokens"])
    stops = {int(s) for s in stop_ids} | ({info.eos_id} if info.eos_id is not None else set())
    out = []
    for r in range(toks.shape[0]):
        n = int((seg[r] > 0).sum())
        c = int(clen[r])
        ids = toks[r, :n].astype(np.int64)
        p_ids, c_ids = ids[:n - c], ids[n - c:]
        shown = p_ids[1:] if len(p_ids) and info.bos_id is not None and p_ids[0] == info.bos_id \
            else p_ids
        prompt, p_pre = _strip_prefix(b"".join(_bytes_of(table, shown)), dummy)
        prompt = prompt.decode("utf-8")
        stopped = bool(len(c_ids)) and int(c_ids[-1]) in stops
        eos = sampled_eos = stopped and int(c_ids[-1]) == info.eos_id
        body = c_ids[:-1] if eos else c_ids
        pieces = _bytes_of(table, body)
        ends = np.cumsum([0] + [len(p) for p in pieces])
        data = b"".join(pieces)
        keep = len(body)
        while True:  # whole tokens within the valid prefix, then whole characters within them
            valid = _valid_prefix(data[:ends[keep]])
            if valid == ends[keep]:
                break
            keep = int(np.searchsorted(ends, valid, side="right")) - 1
        cut = len(body) - keep
        if cut:
            eos = stopped = False
        completion, c_pre = _strip_prefix(data[:ends[keep]],
                                          dummy and record == "prompt_response")
        kept = body[:keep]
        if eos:
            kept = np.concatenate([kept, c_ids[-1:]])
        out.append(SampleText(p_ids.astype(np.int32), kept.astype(np.int32), prompt, completion,
                              eos, stopped, cut + (1 if cut and sampled_eos else 0),
                              p_pre, c_pre))
    return out


def teacher_prompt(messages: Sequence[Mapping[str, str]], teacher_tokenizer) -> str:
    """The teacher's own rendering of a conversation so far, with its generation prompt (the
    ``teacher_prompts`` entry of a chat row)."""
    if getattr(teacher_tokenizer, "chat_template", None) is None:
        raise ValueError("the teacher tokenizer has no chat_template; set one or leave "
                         "teacher_prompts unset (the teacher then reads the student's rendering)")
    return teacher_tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=True)


def teacher_turn_end(teacher_tokenizer) -> str:
    """The special token the teacher's chat template puts right after an assistant reply (its
    end of turn by role), or its EOS token where the template puts none there."""
    info = tokenizer_info(teacher_tokenizer)
    marker = "\x00reply\x00"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = teacher_tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # a template without assistant turns, say
        text = ""
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    for special in sorted(info.special_strings, key=len, reverse=True):
        if after.lstrip(" ").startswith(special):
            return special
    if info.eos_token is None:
        raise ValueError("the teacher tokenizer has neither a chat-template turn end nor an EOS "
                         "token to end the student's turn with")
    return info.eos_token


def _sample_tokens(info, table, sample: SampleText, trained_prompt: bool = False) -> Tokens:
    """The student's own ids of a sample with their byte spans (BOS/EOS zero-width)."""
    ids = np.concatenate([sample.prompt_ids, sample.completion_ids]).astype(np.int64)
    widths = np.array([0 if (k == 0 and info.bos_id is not None and i == info.bos_id)
                       or (k == len(ids) - 1 and sample.eos) else len(table[i])
                       for k, i in enumerate(ids.tolist())], np.int64)
    first_p = 1 if len(sample.prompt_ids) > 1 and widths[0] == 0 else 0
    for k, pre in ((first_p, sample.prompt_prefix),
                   (len(sample.prompt_ids), sample.completion_prefix)):
        if pre and k < len(ids):
            widths[k] -= pre
    ends = np.cumsum(widths)
    starts = ends - widths
    trained = np.zeros(len(ids), bool)
    trained[len(sample.prompt_ids):] = True
    return Tokens(ids.astype(np.int32), starts.astype(np.int32), ends.astype(np.int32),
                  trained | trained_prompt)


def _docs_same_text(samples: Sequence[SampleText], student_tokenizer, teacher_tokenizer,
                    config: DataConfig) -> list[TokenizedDoc]:
    s_info, t_info = tokenizer_info(student_tokenizer), tokenizer_info(teacher_tokenizer)
    base = dataclasses.replace(config, record="prompt_response", loss_on_prompt=False)
    docs: list[TokenizedDoc | None] = [None] * len(samples)
    for add_eos in (True, False):
        idx = [i for i, s in enumerate(samples) if s.eos == add_eos]
        if not idx:
            continue
        cfg = dataclasses.replace(base, add_eos=add_eos)
        recs = [{cfg.prompt_field: samples[i].prompt,
                 cfg.response_field: samples[i].completion.decode("utf-8")} for i in idx]
        for i, doc in zip(idx, tokenize_records(recs, student_tokenizer, cfg,
                                                teacher_tokenizer=teacher_tokenizer)):
            if not isinstance(doc, TokenizedDoc):
                raise ValueError(f"row {i}: {doc}")
            s = samples[i]
            own = np.concatenate([s.prompt_ids, s.completion_ids])
            if not np.array_equal(doc.student.ids, own):  # the sample's own spelling
                student = _sample_tokens(s_info, s_info.token_bytes, s)
                chunks = align_tokens(student, doc.teacher, doc.text.encode("utf-8"),
                                      s_info.special_ids, t_info.special_ids, config.alignment)
                doc = dataclasses.replace(doc, student=student,
                                          alignment=Alignment.from_chunks(*chunks))
            docs[i] = doc
    return docs


def _shift(t: Tokens, by: int) -> Tokens:
    return dataclasses.replace(t, byte_starts=(t.byte_starts + by).astype(np.int32),
                               byte_ends=(t.byte_ends + by).astype(np.int32))


def _docs_teacher_prompts(samples: Sequence[SampleText], student_tokenizer, teacher_tokenizer,
                          config: DataConfig, teacher_prompts: Sequence[str]) -> list[TokenizedDoc]:
    s_info, t_info = tokenizer_info(student_tokenizer), tokenizer_info(teacher_tokenizer)
    end = teacher_turn_end(teacher_tokenizer)
    cfg = dataclasses.replace(config, record="prompt_response", loss_on_prompt=False,
                              add_eos=False)
    # A stop token other than EOS (a turn end) is text in the completion: not for the teacher.
    stop_width = [len(s_info.token_bytes[int(s.completion_ids[-1])]) if s.stopped and not s.eos
                  else 0 for s in samples]
    texts = [s.completion[:len(s.completion) - w] for s, w in zip(samples, stop_width)]
    recs = [{cfg.prompt_field: tp, cfg.response_field: text.decode("utf-8")
             + (end if s.stopped else "")} for s, tp, text in zip(samples, teacher_prompts, texts)]
    t_docs = tokenize_records(recs, teacher_tokenizer, cfg)
    docs = []
    for i, (s, tp, td, text) in enumerate(zip(samples, teacher_prompts, t_docs, texts)):
        if not isinstance(td, TokenizedDoc):
            raise ValueError(f"row {i}: {td}")
        student = _sample_tokens(s_info, s_info.token_bytes, s)
        teacher = td.student
        ps = len(s.prompt.encode("utf-8"))
        pt = len(tp.encode("utf-8"))
        c = len(text)
        k = max(ps, pt)
        student, teacher = _shift(student, k - ps), _shift(teacher, k - pt)
        t_trained = np.asarray(teacher.trained).copy()
        s_s, s_e = student.byte_starts.copy(), student.byte_ends.copy()
        t_s, t_e = teacher.byte_starts.copy(), teacher.byte_ends.copy()
        if s.stopped:  # the stop tokens: zero-width at the completion's end, one chunk by role
            s_s[-1] = s_e[-1] = k + c
            tail = t_s >= k + c
            t_s[tail] = t_e[tail] = k + c
            t_trained[tail] = True
        student = dataclasses.replace(student, byte_starts=s_s, byte_ends=s_e)
        teacher = dataclasses.replace(teacher, byte_starts=t_s, byte_ends=t_e, trained=t_trained)
        data = b"\x00" * k + text
        s_ch, t_ch = align_tokens(student, teacher, data, s_info.special_ids,
                                  t_info.special_ids, config.alignment)
        # Prompt bytes differ between the sides: drop every chunk with an untrained target.
        bad = np.union1d(s_ch[~np.asarray(student.trained, bool)],
                         t_ch[~np.asarray(teacher.trained, bool)])
        chunks = [np.where(np.isin(ch, bad[bad >= 0]), -1, ch).astype(np.int32)
                  for ch in (s_ch, t_ch)]
        docs.append(TokenizedDoc(data.decode("utf-8"), student, teacher,
                                 alignment=Alignment.from_chunks(*chunks)))
    return docs


def xtok_rows(batch: Mapping[str, np.ndarray], student_tokenizer, teacher_tokenizer,
              config: DataConfig, *, stop_ids: Sequence[int] = (),
              teacher_prompts: Sequence[str] | None = None,
              doc_ids: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The cross-tokenizer batch of an on-policy batch (host side, numpy; module docstring).

    Args:
      batch: on-policy rows (``rows.ROW_KEYS``, ``completion_lengths``; numpy or jax arrays),
        one prompt + completion per row, the completion's loss through EOS.
      student_tokenizer, teacher_tokenizer: the two fast tokenizers.
      config: the data config: ``seq_len`` / ``teacher_seq_len`` fix the shapes, ``add_bos``
        and ``alignment`` apply as in the pipeline.
      stop_ids: the rollout's stop ids besides the student's EOS (e.g. its turn end).
      teacher_prompts: one string per row, the teacher's rendering of the prompt (None: the
        teacher reads the student's prompt text, as the off-policy pipeline does).
      doc_ids: each row's document index (default: the row index).

    Returns:
      The data pipeline's cross-tokenizer batch (``packing.STUDENT_FIELDS``,
      ``TEACHER_FIELDS``, ``ALIGNMENT_FIELDS``), plus ``CUT_TOKENS`` (B,) int32: completion
      tokens dropped (cut characters, or past the end of a row).
    """
    kind = "prompt_response" if config.record == "prompt_response" else "chat"
    samples = decode_rows(batch, student_tokenizer, stop_ids=stop_ids, record=kind)
    if teacher_prompts is None:
        docs = _docs_same_text(samples, student_tokenizer, teacher_tokenizer, config)
    else:
        if len(teacher_prompts) != len(samples):
            raise ValueError(f"teacher_prompts has {len(teacher_prompts)} entries for "
                             f"{len(samples)} rows; give one per row")
        docs = _docs_teacher_prompts(samples, student_tokenizer, teacher_tokenizer, config,
                                     teacher_prompts)
    ids = range(len(docs)) if doc_ids is None else doc_ids
    packer = BatchPacker(len(docs), config.seq_len, config.teacher_len)
    cut = np.zeros(len(docs), np.int32)
    for r, (doc, s) in enumerate(zip(docs, samples)):
        doc = dataclasses.replace(doc, doc_id=int(ids[r]))
        n, nt = len(doc.student), len(doc.teacher)
        end = cut_point(doc, 0, 0, config.seq_len, config.teacher_len)
        if end is None:
            raise ValueError(f"row {r}: no piece of its {n} student / {nt} teacher tokens fits "
                             f"data.seq_len={config.seq_len} / "
                             f"data.teacher_seq_len={config.teacher_len}; raise them")
        packer.place(r, Piece(doc, 0, end[0], 0, end[1]))
        cut[r] = s.cut + max(0, n - max(end[0], len(s.prompt_ids)))
    out = packer.emit()
    out[CUT_TOKENS] = cut
    table = tokenizer_info(student_tokenizer).token_bytes
    out[COMPLETION_BYTES] = np.asarray(
        [len(s.completion) - (len(table[int(s.completion_ids[-1])]) if s.stopped and not s.eos
                              else 0) for s in samples], np.int32)
    out[FINISHED] = np.asarray([s.stopped for s in samples], bool)
    return out


def xtok_onpolicy_batch(rollout_fn: Callable, student_params: Any, prompts: Mapping[str, Any],
                        key: Any, *, student_tokenizer, teacher_tokenizer, config: DataConfig,
                        stop_ids: Sequence[int] = (),
                        teacher_prompts: Sequence[str] | None = None,
                        doc_ids: Sequence[int] | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The on-policy cross-tokenizer batch: the jitted rollout, then the host conversion.

    A two-phase step. Phase 1 (device, jitted): ``rollout_fn(student_params, prompts, key)``,
    e.g. ``jax.jit(functools.partial(onpolicy.onpolicy_batch, student_cfg, lmbda=1.0,
    max_new_tokens=N, eos_ids=...))`` (``lmbda < 1`` works too: a dataset row becomes the batch
    of its reference's text), returns the packed student rows; they are fetched to the host
    (the device waits for nothing else). Phase 2 (host, numpy): :func:`xtok_rows` decodes,
    re-tokenizes with the teacher's tokenizer, aligns and packs, giving the batch of the
    engine's cross-tokenizer step (``train.step.make_step`` with ``terms.LIVE_ALIGNED``), whose live teacher
    scores the teacher rows (one forward, no KV cache) inside the step. The device is idle
    during phase 2 and the host during the step; the step itself is unchanged.

    Returns ``(batch, timings)``: ``timings`` has the wall seconds of both phases
    (``TIME_ROLLOUT``, ``TIME_RETOKENIZE``).
    """
    import jax

    t0 = time.perf_counter()
    rows = jax.device_get(rollout_fn(student_params, prompts, key))
    t1 = time.perf_counter()
    batch = xtok_rows(rows, student_tokenizer, teacher_tokenizer, config, stop_ids=stop_ids,
                      teacher_prompts=teacher_prompts, doc_ids=doc_ids)
    t2 = time.perf_counter()
    return batch, {TIME_ROLLOUT: t1 - t0, TIME_RETOKENIZE: t2 - t1}


def xtok_rollout_metrics(batch: Mapping[str, Any], teacher_logprob: Any) -> dict[str, Any]:
    """Metrics of an :func:`xtok_rows` batch's samples (jittable).

    ``teacher_logprob`` (B, teacher_seq_len): the teacher's log-prob of each teacher target
    (``teacher_actual_logprob`` of ``train.step.teacher_token_stats``). Returns
    ``TEACHER_LOGPROB_PER_BYTE`` (the teacher's log-prob of the completions' teacher tokens,
    its EOS included where the student ended with one, per completion byte), ``EOS_SHARE``
    (samples that end with a stop token) and ``MEAN_BYTES`` (mean completion length in bytes).
    """
    import jax.numpy as jnp

    w = jnp.asarray(batch["teacher_loss_mask"]) > 0
    lp = jnp.sum(jnp.where(w, jnp.asarray(teacher_logprob, jnp.float32), 0.0))
    nbytes = jnp.sum(jnp.asarray(batch[COMPLETION_BYTES])).astype(jnp.float32)
    rows = jnp.asarray(batch[FINISHED]).shape[0]
    return {TEACHER_LOGPROB_PER_BYTE: lp / jnp.maximum(nbytes, 1.0),
            EOS_SHARE: jnp.mean(jnp.asarray(batch[FINISHED], jnp.float32)),
            MEAN_BYTES: nbytes / rows}
