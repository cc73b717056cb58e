"""Jitted KV-cache decoding: greedy, temperature, top-k and top-p (nucleus) sampling.

Padding convention (LEFT padding). A batch of prompts of different lengths is laid out in a
(B, P) array with each prompt right-aligned, so every row's last prompt token sits in the
same slot ``P - 1`` and every decode step writes one shared cache slot::

    slot        0    1    2    3    4    5
    row 0     pad  pad   t0   t1   t2   t3      length 4
    row 1      t0   t1   t2   t3   t4   t5      length 6
    segment     0    0    1    1    1    1      (row 0; pad slots are segment 0)
    position    0    0    0    1    2    3      (row 0; counted from the first real token)

Pad slots get segment id 0 and real tokens segment id 1; the transformer lets a query attend
only to earlier slots of its own segment, so padding is invisible to real tokens (and pad
queries only see other pad slots, never an empty row). Positions restart at 0 at each
prompt's first real token, so rotary phases and sliding windows are exactly those of the
unpadded prompt. Generated token ``j`` of a row has position ``length + j``.

The padded prompt length ``P`` is rounded up to a multiple of ``prompt_bucket`` so that
prompt sets of similar lengths reuse one compilation: one compile serves each (batch size,
``P``, ``max_new_tokens``, mode), the mode being greedy, plain sampling, or sampling with
top-k/top-p filters. The temperature, ``top_k``, ``top_p``, the EOS ids, the pad id and the
seed are traced, so changing them does not recompile. Prefill and the whole decode loop (a
``jax.lax.while_loop`` that stops as soon as every row has emitted an EOS id, or after
``max_new_tokens`` tokens) run inside one jitted function; the cache holds
``P + max_new_tokens - 1`` slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models.config import ModelConfig
from distill_jax.models.model import Model, logits_from_hidden

Array = jax.Array
# Filtered sampling first looks for the nucleus among this many most likely tokens (a partial
# top-k), sorting the whole vocabulary only when it is not there (the same kept set and draw
# either way).
NUCLEUS_CANDIDATES = 1024


# ----------------------------------------------------------------------------- cache
def init_cache(model: Model | ModelConfig, batch: int, max_len: int,
               dtype: Any = None) -> dict[str, Array]:
    """An empty KV cache for ``batch`` rows of ``max_len`` slots.

    Returns a dict: ``k``, ``v`` (layers, batch, max_len, kv_heads, head_dim) zeros in
    ``dtype`` (default: the model's compute dtype); ``pos`` and ``seg`` (batch, max_len) int32
    zeros (segment 0 marks an empty or padding slot); ``index`` the int32 scalar 0, the next
    slot to write.
    """
    cfg = model.config if isinstance(model, Model) else model
    dt = jnp.dtype(dtype if dtype is not None else cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return dict(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                pos=jnp.zeros((batch, max_len), jnp.int32),
                seg=jnp.zeros((batch, max_len), jnp.int32),
                index=jnp.zeros((), jnp.int32))


def left_padded_layout(lengths_B: Array, padded_len: int) -> tuple[Array, Array]:
    """Segment ids and positions (both (B, padded_len) int32) of left-padded prompts."""
    slot_P = jnp.arange(padded_len, dtype=jnp.int32)
    start_B1 = (padded_len - jnp.asarray(lengths_B, jnp.int32))[:, None]
    seg_BP = (slot_P[None, :] >= start_B1).astype(jnp.int32)
    pos_BP = jnp.maximum(slot_P[None, :] - start_B1, 0) * seg_BP
    return seg_BP, pos_BP


def prefill(model: Model, tokens_BP: Array, lengths_B: Array, cache: dict[str, Array], *,
            all_logits: bool = False) -> tuple[Array, dict[str, Array]]:
    """Run left-padded prompts through the model, filling an empty ``cache``.

    ``tokens_BP`` holds each prompt right-aligned (see the module docstring); ``lengths_B``
    the number of real tokens per row (at least 1). Returns fp32 logits of the last slot
    (B, V), or of every slot (B, P, V) with ``all_logits``, and the updated cache. Pure:
    call it inside ``jax.jit``.
    """
    tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
    if tokens_BP.shape[1] > cache["k"].shape[2]:
        raise ValueError(f"prompts of {tokens_BP.shape[1]} slots do not fit a cache of "
                         f"{cache['k'].shape[2]}; make the cache with a larger max_len")
    seg_BP, pos_BP = left_padded_layout(lengths_B, tokens_BP.shape[1])
    h_BPD, cache = model.module()(tokens_BP, pos_BP, seg_BP, cache)
    if not all_logits:
        h_BPD = h_BPD[:, -1:]
    logits = logits_from_hidden(model, h_BPD)
    return (logits if all_logits else logits[:, 0]), cache


def decode_step(model: Model, tokens_B: Array, positions_B: Array,
                cache: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Feed one token per row at slot ``cache["index"]``; fp32 logits (B, V) and the new cache.

    ``positions_B`` is each row's position of that token (its prompt length plus the number
    of tokens generated before it). Pure: call it inside ``jax.jit``.
    """
    tokens_B1 = jnp.asarray(tokens_B, jnp.int32)[:, None]
    pos_B1 = jnp.asarray(positions_B, jnp.int32)[:, None]
    h_B1D, cache = model.module()(tokens_B1, pos_B1, jnp.ones_like(tokens_B1), cache)
    return logits_from_hidden(model, h_B1D)[:, 0], cache


# ----------------------------------------------------------------------------- sampling
def _sample(logits_BV: Array, key: Array, temperature: Array, top_k: Array, top_p: Array, *,
            mode: str) -> Array:
    """Next tokens (B,) int32. ``mode`` (static): "greedy", "sample" or "filtered".

    Filters apply in transformers' order: temperature, then top-k, then top-p on the top-k
    renormalised distribution. ``top_k`` and ``top_p`` are traced scalars (no recompile per
    value), so "filtered" sorts the whole vocabulary once per step.
    """
    return _sample_with_logprob(logits_BV, key, temperature, top_k, top_p, mode=mode)[0]


def _sample_with_logprob(logits_BV: Array, key: Array, temperature: Array, top_k: Array,
                         top_p: Array, *, mode: str) -> tuple[Array, Array]:
    """:func:`_sample`'s tokens (B,) and each token's fp32 log-probability under the
    distribution it was drawn from (after temperature and filters). Greedy decoding is a point
    mass, so there it is the unfiltered temperature-1 log-probability of the argmax instead."""
    if mode == "greedy":
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
    x_BV = logits_BV.astype(jnp.float32) / temperature
    if mode == "sample":
        tok_B = jax.random.categorical(key, x_BV, axis=-1).astype(jnp.int32)
        logp_BV = jax.nn.log_softmax(x_BV, axis=-1)
        return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
    vocab = x_BV.shape[-1]
    k = min(vocab, NUCLEUS_CANDIDATES)

    def kept(sorted_BK, idx_BK, logz_B1):
        """The kept (sorted) logits, -inf elsewhere, padded to (B, V): the array a full sort
        gives, so the draw below is the same whichever path made it."""
        keep_BK = jnp.arange(sorted_BK.shape[-1])[None, :] < top_k
        p_BK = jnp.exp(jnp.where(keep_BK, sorted_BK, -jnp.inf) - logz_B1)
        # Keep the smallest most-likely prefix whose mass reaches top_p (the first always).
        keep_BK &= (jnp.cumsum(p_BK, axis=-1) - p_BK) < top_p
        out_BK = jnp.where(keep_BK, sorted_BK, -jnp.inf)
        pad = vocab - sorted_BK.shape[-1]
        return (jnp.pad(out_BK, ((0, 0), (0, pad)), constant_values=-jnp.inf),
                jnp.pad(idx_BK, ((0, 0), (0, pad))), jnp.all(~keep_BK[:, -1]) | (pad == 0))

    def full(x_BV):
        # Sorted descending; equal values keep the lower index first (as argmax does).
        sorted_BV, idx_BV = jax.lax.top_k(x_BV, vocab)
        ranked_BV = jnp.where(jnp.arange(vocab)[None, :] < top_k, sorted_BV, -jnp.inf)
        return kept(sorted_BV, idx_BV, jax.nn.logsumexp(ranked_BV, axis=-1, keepdims=True))[:2]

    def candidates(x_BV):
        # Only the k most likely tokens can be kept when the nucleus ends among them: then
        # the kept set equals the full sort's, at a fraction of its cost (a partial top-k).
        # The normaliser needs every token top_k keeps, so this path needs top_k <= k or no
        # top_k limit; otherwise, or if some row's nucleus reaches past k, the full sort.
        sorted_BK, idx_BK = jax.lax.top_k(x_BV, k)
        logz_B1 = jnp.where(top_k >= vocab, jax.nn.logsumexp(x_BV, axis=-1, keepdims=True),
                            jax.nn.logsumexp(jnp.where(jnp.arange(k)[None, :] < top_k,
                                                       sorted_BK, -jnp.inf),
                                             axis=-1, keepdims=True))
        kept_BV, idx_BV, inside = kept(sorted_BK, idx_BK, logz_B1)
        ok = inside & ((top_k <= k) | (top_k >= vocab))
        return jax.lax.cond(ok, lambda: (kept_BV, idx_BV), lambda: full(x_BV))

    kept_BV, idx_BV = full(x_BV) if k == vocab else candidates(x_BV)
    choice_B = jax.random.categorical(key, kept_BV, axis=-1)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(kept_BV, axis=-1), choice_B[:, None],
                                 axis=-1)[:, 0]
    tok_B = jnp.take_along_axis(idx_BV, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return tok_B, logp_B


def sampling_args(temperature: float, top_k: int | None, top_p: float | None, vocab: int):
    """Validated (mode, temperature, top_k, top_p): static mode, the rest as traced arrays."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be a positive integer (0 or None: no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (None: no limit), got {top_p}")
    k = min(int(top_k), vocab) if top_k else vocab
    p = 1.0 if top_p is None else float(top_p)
    mode = "greedy" if temperature == 0 else "sample" if (k == vocab and p == 1.0) else "filtered"
    return (mode, jnp.float32(temperature if temperature else 1.0), jnp.int32(k),
            jnp.float32(p))


def sample_tokens(logits_BV: Array, key: Array, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> Array:
    """One token per row (B,) int32 from fp32 logits (B, V).

    ``temperature=0`` is greedy (argmax); otherwise the logits are divided by the temperature,
    restricted to the ``top_k`` largest (``None`` or 0: no limit), then to the smallest set of
    most likely tokens whose probability reaches ``top_p`` (``None`` or 1: no limit), and a
    token is drawn with ``key``. Pure and jittable (the settings are Python numbers).
    """
    mode, t, k, p = sampling_args(temperature, top_k, top_p, logits_BV.shape[-1])
    return _sample(logits_BV, key, t, k, p, mode=mode)


# ----------------------------------------------------------------------------- generate
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of :func:`generate`.

    ``sequences``: per row, the generated token ids without padding (the EOS id included when
    one was produced). ``tokens``: (B, max_new_tokens) int32 array of the same ids followed
    by ``pad_id``. ``lengths``: (B,) int32 number of generated tokens per row. ``finished``:
    (B,) bool, whether the row stopped on an EOS id. ``num_steps``: how many tokens the decode
    loop produced per row (less than ``max_new_tokens`` when every row stopped early).
    """

    sequences: list[list[int]]
    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    num_steps: int


def decode(model: Model, tokens_BP: Array, lengths_B: Array, key: Array, temperature: Array,
           top_k: Array, top_p: Array, eos_V: Array, pad_id: Array, *, max_new_tokens: int,
           mode: str, cache_dtype: str | None = None, samples: int = 1,
           model_logprobs: bool = False):
    """Prefill and the decode loop, pure and with fixed shapes (call it inside ``jax.jit``).

    ``tokens_BP``/``lengths_B``: left-padded prompts (module docstring); ``temperature``,
    ``top_k``, ``top_p`` and ``mode`` as :func:`sampling_args` returns them; ``eos_V`` a
    (V,) bool mask of EOS ids; ``pad_id`` what follows a row's EOS. Step ``j`` draws with
    ``fold_in(key, j)``. ``samples`` (static): completions per prompt; each prompt is
    prefilled once and its cache shared by its ``samples`` rows (prompt ``i``'s are rows
    ``i * samples ...``), as if each prompt were given ``samples`` times. ``model_logprobs``
    (static): report each generated token's log-probability under the model itself
    (temperature 1, no filters) instead of under the distribution it was drawn from.
    Returns ``(tokens_BN, logprobs_BN, counts_B, finished_B, steps)``: the generated ids
    (``pad_id`` after EOS), each one's log-probability (0 after EOS), the number of generated
    tokens per row, whether the row emitted an EOS id, and how many decode steps ran (the
    loop stops early once every row has finished).
    """
    b, p = tokens_BP.shape
    n = max_new_tokens
    vocab = eos_V.shape[0]
    # Slot p + n - 1 would hold the last generated token, which is never fed back.
    cache = init_cache(model, b, p + n - 1, cache_dtype)

    def pick(logits_BV, step):
        tok_B, logp_B = _sample_with_logprob(logits_BV, jax.random.fold_in(key, step),
                                             temperature, top_k, top_p, mode=mode)
        if model_logprobs:
            logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
            logp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
        return tok_B, logp_B

    def is_eos(tok_B):
        return eos_V[jnp.clip(tok_B, 0, vocab - 1)]

    logits_BV, cache = prefill(model, tokens_BP, lengths_B, cache)
    if samples > 1:  # every prompt's rows share its prefill: (layers, batch, ...) caches
        cache = {name: jnp.repeat(x, samples, axis=1 if name in ("k", "v") else 0) if x.ndim
                 else x for name, x in cache.items()}
        logits_BV = jnp.repeat(logits_BV, samples, axis=0)
        lengths_B = jnp.repeat(jnp.asarray(lengths_B, jnp.int32), samples, axis=0)
        b *= samples
    tok_B, logp_B = pick(logits_BV, 0)
    out_BN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok_B)
    lp_BN = jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B)
    state = (jnp.int32(1), cache, tok_B, is_eos(tok_B), out_BN, lp_BN, jnp.ones((b,), jnp.int32))

    def cond(state):
        step, _, _, done_B, _, _, _ = state
        return (step < n) & ~jnp.all(done_B)

    def body(state):
        step, cache, tok_B, done_B, out_BN, lp_BN, count_B = state
        # Finished rows feed a valid dummy id (pad_id may lie outside the vocabulary).
        logits_BV, cache = decode_step(model, jnp.where(done_B, 0, tok_B),
                                       lengths_B + step - 1, cache)
        new_B, logp_B = pick(logits_BV, step)
        new_B = jnp.where(done_B, pad_id, new_B)
        out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, new_B[:, None], step, 1)
        lp_BN = jax.lax.dynamic_update_slice_in_dim(
            lp_BN, jnp.where(done_B, 0.0, logp_B)[:, None], step, 1)
        count_B = count_B + (~done_B).astype(jnp.int32)
        done_B = done_B | is_eos(new_B)
        return step + 1, cache, new_B, done_B, out_BN, lp_BN, count_B

    step, _, _, done_B, out_BN, lp_BN, count_B = jax.lax.while_loop(cond, body, state)
    return out_BN, lp_BN, count_B, done_B, step


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "mode", "cache_dtype"))
def _generate_jit(model: Model, tokens_BP: Array, lengths_B: Array, key: Array,
                  temperature: Array, top_k: Array, top_p: Array, eos_V: Array, pad_id: Array,
                  *, max_new_tokens: int, mode: str, cache_dtype: str | None):
    """:func:`decode` jitted, without the log-probs; the EOS mask and pad id are traced."""
    out_BN, _, count_B, done_B, step = decode(
        model, tokens_BP, lengths_B, key, temperature, top_k, top_p, eos_V, pad_id,
        max_new_tokens=max_new_tokens, mode=mode, cache_dtype=cache_dtype)
    return out_BN, count_B, done_B, step


def _as_token_lists(prompts: Any, lengths: Any, mask: Any, padding_side: str) -> list[list[int]]:
    if isinstance(prompts, (list, tuple)) and lengths is None and mask is None:
        if prompts and np.ndim(prompts[0]) != 1:
            raise ValueError("prompts must be a list of token-id lists (one list per prompt), "
                             "or a padded (batch, length) array with lengths or mask")
        return [[int(t) for t in row] for row in prompts]
    arr = np.asarray(prompts)
    if arr.ndim != 2:
        raise ValueError(f"prompts must be a list of token-id lists or a (batch, length) array, "
                         f"got shape {arr.shape}")
    if mask is not None and lengths is not None:
        raise ValueError("pass either lengths or mask with a padded prompt array, not both")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != arr.shape:
            raise ValueError(f"mask shape {mask.shape} differs from prompts shape {arr.shape}")
        return [[int(t) for t in row[m]] for row, m in zip(arr, mask)]
    if lengths is None:
        return [[int(t) for t in row] for row in arr]
    lengths = np.asarray(lengths)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if lengths.shape != arr.shape[:1] or (lengths > arr.shape[1]).any():
        raise ValueError(f"lengths {lengths.tolist()} do not fit prompts of shape {arr.shape}")
    if padding_side == "right":
        return [[int(t) for t in row[:n]] for row, n in zip(arr, lengths)]
    return [[int(t) for t in row[arr.shape[1] - n:]] for row, n in zip(arr, lengths)]


def generate(model: Model, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_ids: Sequence[int] | int | None = None,
             pad_id: int = 0, seed: int | Array = 0, lengths: Any = None, mask: Any = None,
             padding_side: str = "left", prompt_bucket: int = 64,
             cache_dtype: Any = None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt, with a KV cache.

    ``prompts`` is a list of token-id lists (of any, different, non-zero lengths), or a padded
    (B, T) array together with ``lengths`` (real tokens per row, on the ``padding_side``) or
    a boolean ``mask`` of real tokens. Rows are re-laid out left-padded to the next multiple of
    ``prompt_bucket`` (see the module docstring), so prompt sets of similar lengths share one
    compilation.

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled at that temperature,
    optionally limited to the ``top_k`` most likely and to the ``top_p`` nucleus; ``seed``
    (an int or a JAX key) makes sampling reproducible. A row stops after emitting any of
    ``eos_ids`` (default ``model.config.eos_ids``; ``()`` never stops) and emits ``pad_id``
    from then on; the loop ends as soon as every row has stopped. ``cache_dtype`` defaults to
    the model's compute dtype.
    """
    if max_new_tokens < 0 or int(max_new_tokens) != max_new_tokens:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
    if prompt_bucket < 1:
        raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
    rows = _as_token_lists(prompts, lengths, mask, padding_side)
    if not rows:
        raise ValueError("no prompts given")
    lens = np.asarray([len(r) for r in rows], np.int32)
    if (lens == 0).any():
        raise ValueError(f"prompts {np.flatnonzero(lens == 0).tolist()} are empty; every prompt "
                         "needs at least one token (e.g. the BOS token)")
    vocab = model.config.vocab_size
    bad = [i for i, r in enumerate(rows) if min(r) < 0 or max(r) >= vocab]
    if bad:
        raise ValueError(f"prompts {bad} hold token ids outside [0, {vocab}), the model's "
                         "vocabulary; check that the tokenizer matches the model")
    mode, temperature, top_k, top_p = sampling_args(temperature, top_k, top_p, vocab)
    if eos_ids is None:
        eos_ids = model.config.eos_ids
    elif isinstance(eos_ids, (int, np.integer)):
        eos_ids = (int(eos_ids),)
    eos_V = np.zeros((vocab,), bool)
    eos_V[[int(e) for e in eos_ids if 0 <= int(e) < vocab]] = True  # others never occur
    b = len(rows)
    if max_new_tokens == 0:
        return GenerateOutput([[] for _ in rows], np.zeros((b, 0), np.int32),
                              np.zeros((b,), np.int32), np.zeros((b,), bool), 0)
    p = -(-int(lens.max()) // prompt_bucket) * prompt_bucket
    # Prompt padding uses token 0, not pad_id: its slots are masked out, but an id outside
    # the vocabulary would embed as NaN, and 0 * NaN in the attention sum poisons real rows.
    tokens = np.zeros((b, p), np.int32)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = r
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    out, count, done, steps = _generate_jit(
        model, tokens, lens, key, temperature, top_k, top_p, eos_V, jnp.int32(pad_id),
        max_new_tokens=int(max_new_tokens), mode=mode,
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype).name)
    out, count, done = np.asarray(out), np.asarray(count), np.asarray(done)
    return GenerateOutput([out[i, :count[i]].tolist() for i in range(b)], out, count, done,
                          int(steps))


def generate_text(model: Model, tokenizer: Any, texts: str | Sequence[Any], *,
                  chat_template: bool = False, skip_special_tokens: bool = True,
                  **generate_kwargs: Any) -> str | list[str]:
    """Encode ``texts`` with a transformers ``tokenizer``, :func:`generate`, and decode.

    With ``chat_template``, each text becomes one user message (a list of ``{"role",
    "content"}`` dicts is also accepted as a whole conversation) rendered by the tokenizer's
    chat template with the generation prompt appended; otherwise texts are encoded with the
    tokenizer's special tokens (e.g. BOS). ``eos_ids`` defaults to the model config's EOS ids
    plus the tokenizer's ``eos_token_id``; ``pad_id`` to the tokenizer's pad id (or 0). Other
    keyword arguments go to :func:`generate`. Returns the decoded continuations, one string
    per text (a single string for a single text).
    """
    single = isinstance(texts, str) or (chat_template and texts and isinstance(texts[0], dict))
    items = [texts] if single else list(texts)
    ids = []
    for item in items:
        if chat_template:
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
            if hasattr(enc, "keys"):  # transformers 5 may return a BatchEncoding
                enc = enc["input_ids"]
            ids.append([int(t) for t in enc])
        else:
            ids.append([int(t) for t in tokenizer(item)["input_ids"]])
    if "eos_ids" not in generate_kwargs:
        eos = set(model.config.eos_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        generate_kwargs["eos_ids"] = tuple(eos)
    if "pad_id" not in generate_kwargs:
        generate_kwargs["pad_id"] = getattr(tokenizer, "pad_token_id", None) or 0
    out = generate(model, ids, **generate_kwargs)
    decoded = [tokenizer.decode(seq, skip_special_tokens=skip_special_tokens)
               for seq in out.sequences]
    return decoded[0] if single else decoded
