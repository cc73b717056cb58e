"""Prompts for on-policy distillation: records -> (prompt, reference completion) -> fixed shapes.

A record gives a *prompt* (what the student continues) and, where it has one, a *reference
completion* (the dataset's answer, used for the rows that ``lmbda`` leaves off-policy):

* ``chat`` records whose last message is the assistant's: the record is tokenized exactly as the
  data pipeline does (:func:`distill_jax.data.tokenize.tokenize_record`: the whole conversation
  rendered with the chat template, BOS/EOS as configured). The prompt is every token before the
  final assistant turn, i.e. the conversation so far rendered with the generation prompt; the
  reference is the tokens from there through the last trained token (the reply, its
  end-of-turn token and, when ``data.add_eos`` appends one, EOS), with the pipeline's per-token
  training flags. So a dataset row built from it carries exactly the pipeline's tokens, targets
  and loss mask for that turn (earlier assistant turns are context, not trained).
* ``prompt_response`` records: prompt and response as the pipeline tokenizes them.
* prompt-only rows (a ``prompt`` field without a response, or a conversation whose last message
  is not the assistant's): the prompt alone (rendered with the generation prompt for ``chat``);
  no reference, so such rows are always filled with the student's samples.

:func:`prompt_batch` lays prompts out as the KV-cache generator wants them
(:mod:`distill_jax.models.generate`): left-padded to the smallest of a few fixed ``buckets``
that holds the longest prompt, so a jitted step compiles once per bucket, not once per batch;
references are right-padded (or cut) to ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from distill_jax.data.config import DataConfig
from distill_jax.data.records import Record
from distill_jax.data.tokenize import tokenize_record

__all__ = ["DEFAULT_BUCKETS", "PROMPT_KEYS", "Prompt", "prompt_batch", "prompt_from_record",
           "prompt_length_bucket"]

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)
# The arrays of a prompt batch (the input of ``rows.onpolicy_batch``).
PROMPT_KEYS = ("prompt_tokens", "prompt_lengths", "reference_tokens", "reference_mask",
               "reference_lengths")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt and its reference completion.

    Attributes:
      ids: (p,) int32 prompt token ids (BOS and the chat template's generation prompt included).
      reference: (c,) int32 reference completion ids (empty when the record has none).
      reference_trained: (c,) bool, whether predicting each reference token counts in the loss
        (the data pipeline's training mask of those tokens).
      doc_id: the record's global document index (-1 outside a pipeline).
    """

    ids: np.ndarray
    reference: np.ndarray
    reference_trained: np.ndarray
    doc_id: int = -1


def _fields(record: Record | dict, config: DataConfig) -> tuple[list | None, Any, Any]:
    """``(messages, prompt, response)`` of a record (None where absent): a validated
    :class:`Record` uses the fixed field names, a raw row those ``config`` names."""
    if isinstance(record, Record):
        d = record.data
        return d.get("messages"), d.get("prompt"), d.get("response")
    if not isinstance(record, dict):
        return None, None, None
    return (record.get(config.messages_field), record.get(config.prompt_field),
            record.get(config.response_field))


def _render(tokenizer, messages: Sequence[dict]) -> str:
    """The conversation so far with the chat template's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=True)


def prompt_from_record(record: Record | dict, tokenizer, config: DataConfig) -> Prompt:
    """The prompt and reference completion of one record (see the module docstring).

    ``record`` is a :class:`~distill_jax.data.records.Record` or a raw row with the fields
    ``config`` names; ``tokenizer`` the student's Hugging Face tokenizer; ``config`` the data
    config (``record`` must be ``chat`` or ``prompt_response``; ``loss_on_prompt`` off).
    Raises ``ValueError`` for text records and
    :class:`~distill_jax.data.records.BadRecordError` for unusable records.
    """
    if config.record not in ("chat", "prompt_response"):
        raise ValueError(f"on-policy distillation needs prompts, but data.record is "
                         f"{config.record!r}; set data.record to 'chat' or 'prompt_response'")
    if config.loss_on_prompt:
        raise ValueError("data.loss_on_prompt trains on prompt tokens, which on-policy rows never "
                         "do; set data.loss_on_prompt=false")
    doc_id = record.doc_id if isinstance(record, Record) else -1
    messages, prompt, response = _fields(record, config)
    if messages is not None and not (messages and isinstance(messages[-1], dict)
                                     and messages[-1].get("role") == "assistant"):
        text = _render(tokenizer, messages)  # prompt-only conversation
    elif messages is None and prompt is not None and response is None:
        text = _render(tokenizer, [{"role": "user", "content": prompt}]) \
            if config.record == "chat" else prompt
    else:
        text = None
    if text is not None:
        bare = dataclasses.replace(config, record="prompt_response", add_eos=False)
        doc = tokenize_record({bare.prompt_field: text, bare.response_field: ""}, tokenizer, bare)
        return Prompt(doc.ids.astype(np.int32), np.zeros((0,), np.int32), np.zeros((0,), bool),
                      doc_id)
    doc = tokenize_record(record, tokenizer, config)
    ids, trained, starts = doc.ids, doc.trained, doc.byte_starts
    if config.record == "prompt_response":
        cut_byte = len(str(prompt).encode("utf-8"))
    else:
        if messages is None:  # a chat record given as prompt + response fields
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": response}]
        prefix = _render(tokenizer, messages[:-1])
        cut_byte = len(prefix.encode("utf-8")) if doc.text.startswith(prefix) else None
    hits = np.flatnonzero(trained)
    if cut_byte is not None:  # the first token at or after the reply's first byte
        start = int(np.searchsorted(starts, cut_byte, side="left"))
    else:  # the template renders the last turn differently: its last trained run starts it
        runs = np.split(hits, np.flatnonzero(np.diff(hits) > 1) + 1) if hits.size else []
        start = int(runs[-1][0]) if runs else int(ids.size)
        if len(runs) > 1 and runs[-1].size == 1 and ids[runs[-1][0]] == tokenizer.eos_token_id:
            start = int(runs[-2][0])  # a trained EOS after untrained whitespace
    last = int(hits[-1]) + 1 if hits.size and hits[-1] >= start else start
    return Prompt(ids[:start].astype(np.int32), ids[start:last].astype(np.int32),
                  trained[start:last].astype(bool), doc_id)


def prompt_length_bucket(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest of ``buckets`` that holds ``length`` prompt tokens; raises if none does."""
    fits = [b for b in sorted(buckets) if b >= length]
    if not fits:
        raise ValueError(f"a prompt of {length} tokens is longer than the largest prompt bucket "
                         f"{max(buckets)}; add a larger bucket or drop longer prompts")
    return fits[0]


def prompt_batch(prompts: Sequence[Prompt], *, max_new_tokens: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> dict[str, Any]:
    """Fixed-shape numpy arrays of a batch of prompts (``PROMPT_KEYS``).

    ``prompt_tokens`` (B, P) int32: each prompt right-aligned (left padding with token 0: a
    valid id, so padding never embeds as NaN; the layout masks it out),
    ``P`` the smallest bucket holding the longest prompt; ``prompt_lengths`` (B,) int32.
    ``reference_tokens`` (B, N) int32 with ``N = max_new_tokens``: the reference completion
    left-aligned, cut after N tokens, then 0; ``reference_mask`` (B, N) float32: its
    training flags (0 past its end); ``reference_lengths`` (B,) int32 (0: no reference).
    """
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    lengths = np.asarray([len(p.ids) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"prompts {np.flatnonzero(lengths == 0).tolist()} are empty; every "
                         "prompt needs at least one token (e.g. BOS or a chat template)")
    width = prompt_length_bucket(int(lengths.max()), buckets)
    b, n = len(prompts), int(max_new_tokens)
    out = {"prompt_tokens": np.zeros((b, width), np.int32),
           "prompt_lengths": lengths,
           "reference_tokens": np.zeros((b, n), np.int32),
           "reference_mask": np.zeros((b, n), np.float32),
           "reference_lengths": np.zeros((b,), np.int32)}
    for i, p in enumerate(prompts):
        out["prompt_tokens"][i, width - len(p.ids):] = p.ids
        c = min(len(p.reference), n)
        out["reference_tokens"][i, :c] = p.reference[:c]
        out["reference_mask"][i, :c] = p.reference_trained[:c]
        out["reference_lengths"][i] = c
    return out
