"""On-policy distillation across tokenizers: samples -> the off-policy cross-tokenizer batch."""

import json

import jax
import numpy as np
import pytest

from distill_jax import onpolicy as op
from distill_jax.data.config import DataConfig, SourceConfig
from distill_jax.data.pipeline import make_iterator
from distill_jax.onpolicy import rows as R
from distill_jax.onpolicy import xtok as X
from distill_jax.tokenizer import load_tokenizer

N = 48  # max_new_tokens


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(name) for name in ("bytes", "smollm2", "mistral")}


def _config(tmp_path, rec, **kw):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    base = dict(sources=(SourceConfig(str(path)),), record="prompt_response", seq_len=160,
                teacher_seq_len=96, batch_size=1, num_epochs=1, shuffle=False)
    return DataConfig(**{**base, **kw})


def _rows(stok, cfg, record, completion_ids=None):
    """The on-policy row of ``record``: its prompt and, as the sample, ``completion_ids``
    (default: the pipeline's tokens of the response, EOS included when ``add_eos``)."""
    p = op.prompt_from_record(record, stok, cfg)
    comp = p.reference if completion_ids is None else np.asarray(completion_ids, np.int32)
    pb = op.prompt_batch([p], max_new_tokens=N, buckets=(64,))
    c = np.zeros((1, N), np.int32)
    c[0, :len(comp)] = comp
    rows = jax.tree.map(np.asarray, R.pack_rows(pb["prompt_tokens"], pb["prompt_lengths"], c,
                                                np.asarray([len(comp)], np.int32)))
    rows[R.COMPLETION_LENGTHS] = np.asarray([len(comp)], np.int32)
    return rows


def _pipeline(cfg, stok, ttok):
    it = make_iterator(cfg, stok, teacher_tokenizer=ttok)
    try:
        return next(it)
    finally:
        it.close()


RECORDS = [
    {"prompt": "Question: what is 2+3?\nAnswer:",
     "response": " The answer is 5. Café déjà vu, 東京 😀!"},
    {"prompt": "Translate: naïve façade", "response": "  Straße Ölfeld\n\nмир привет ±"},
]


@pytest.mark.parametrize("pair", [("bytes", "smollm2"), ("mistral", "smollm2")])
@pytest.mark.parametrize("eos", [True, False])
@pytest.mark.parametrize("which", [0, 1])
def test_sample_batch_equals_the_offpolicy_pipeline(tmp_path, toks, pair, eos, which):
    """A sample that is the student's tokenization of the record's response (with EOS, or cut
    before it by max_new_tokens) gives exactly the off-policy pipeline's cross-tokenizer batch
    of ``{prompt, response}``: every key equal, the loss only on the completion on both sides."""
    stok, ttok = toks[pair[0]], toks[pair[1]]
    record = RECORDS[which]
    cfg = _config(tmp_path, record, add_eos=eos)
    rows = _rows(stok, cfg, record)
    got = X.xtok_rows(rows, stok, ttok, cfg, doc_ids=[0])
    want = _pipeline(cfg, stok, ttok)
    assert set(want) <= set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got[X.CUT_TOKENS].tolist() == [0]
    # The loss is on the completion only: every trained teacher token lies in the response.
    prompt_bytes = len(record["prompt"].encode())
    tmask = got["teacher_loss_mask"][0] > 0
    assert tmask.any() and (got["teacher_byte_starts"][0, 1:][tmask[:-1]] >= prompt_bytes).all()
    assert (got["chunk_ids"][0][got["loss_mask"][0] > 0] >= 0).mean() > 0.5


def test_cut_character_is_trimmed(tmp_path, toks):
    """A byte-level sample that stops inside a multi-byte character (max_new_tokens reached)
    is cut to the last whole character: the batch is the pipeline's for the trimmed text."""
    stok, ttok = toks["bytes"], toks["smollm2"]
    record = {"prompt": "Say: ", "response": "ok é"}
    cfg = _config(tmp_path, record, add_eos=False)
    full = _rows(stok, cfg, record)
    ids = full["tokens"][0][full["segment_ids"][0] > 0]
    cut_ids = ids[len(ids) - 5:-1]  # "ok " + the first byte of "é"
    rows = _rows(stok, cfg, record, cut_ids)
    got = X.xtok_rows(rows, stok, ttok, cfg, doc_ids=[0])
    want = _pipeline(_config(tmp_path, {"prompt": "Say: ", "response": "ok "}, add_eos=False),
                     stok, ttok)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got[X.CUT_TOKENS].tolist() == [1]


def test_sample_in_its_own_spelling(tmp_path, toks):
    """A sample the tokenizer would have spelled otherwise keeps its ids on the student side,
    with their bytes; the teacher side is the pipeline's, and the chunks pair the same bytes."""
    stok, ttok = toks["smollm2"], toks["mistral"]
    record = {"prompt": "Hi:", "response": " hello world"}
    cfg = _config(tmp_path, record)
    want = _pipeline(cfg, stok, ttok)
    vocab = stok.get_vocab()
    own = [vocab["Ġh"], vocab["ello"], vocab["Ġworld"], stok.eos_token_id]
    got = X.xtok_rows(_rows(stok, cfg, record, own), stok, ttok, cfg, doc_ids=[0])
    n = int((got["segment_ids"][0] > 0).sum())
    assert got["tokens"][0, n - 4:n].tolist() == own
    for k in want:
        if k.startswith("teacher_") and k != "teacher_chunk_ids":
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # " hello" is one chunk: two student targets, the teacher's tokens of the same bytes.
    s_chunk = got["chunk_ids"][0, n - 5:n - 1]
    assert s_chunk[0] == s_chunk[1] >= 0 and s_chunk[2] != s_chunk[1]
    t = got["teacher_chunk_ids"][0] == s_chunk[0]
    t_bytes = (got["teacher_byte_starts"][0, 1:][t[:-1]].min(),
               got["teacher_byte_ends"][0, 1:][t[:-1]].max())
    assert t_bytes == (3, 9)


def _tiny(vocab, seed, hidden=32, std=0.3):
    import distill_jax.models as M
    cfg = M.ModelConfig.tiny("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    return cfg, jax.tree.map(jax.numpy.asarray,
                             M.numpy_params(cfg, np.random.default_rng(seed), std))


def test_two_phase_batch_trains_and_metrics(toks):
    """Rollout (jitted) -> host conversion -> the cross-tokenizer step with the live teacher;
    the metrics equal a numpy recount from the decoded samples and the teacher's log-probs."""
    import functools

    import optax

    from distill_jax.losses.xtok import XtokSpec
    from distill_jax.tokens import word_start_mask
    from distill_jax.losses import terms
    from distill_jax.train.step import init_state, make_step, teacher_token_stats
    from distill_jax.data.testing import tiny_tokenizer
    stok, ttok = tiny_tokenizer("byte_level", vocab_size=300), toks["bytes"]
    cfg = DataConfig(record="prompt_response", seq_len=24, teacher_seq_len=32)
    scfg, sp = _tiny(len(stok), 1)
    tcfg, tp = _tiny(len(ttok), 2)
    prompt = op.prompt_from_record({"prompt": "Q: sum?", "response": "ok"}, stok, cfg)
    pb = op.prompt_batch([prompt] * 8, max_new_tokens=8, buckets=(16,))
    roll = jax.jit(functools.partial(op.onpolicy_batch, scfg, lmbda=1.0, max_new_tokens=8,
                                     eos_ids=(stok.eos_token_id,)))
    key = jax.random.key(0)
    batch, times = X.xtok_onpolicy_batch(roll, sp, pb, key, student_tokenizer=stok,
                                         teacher_tokenizer=ttok, config=cfg)
    assert set(times) == {X.TIME_ROLLOUT, X.TIME_RETOKENIZE}
    assert batch["tokens"].shape == (8, 24) and batch["teacher_tokens"].shape == (8, 32)
    samples = X.decode_rows(jax.device_get(roll(sp, pb, key)), stok)
    assert batch[X.COMPLETION_BYTES].tolist() == [len(s.completion) for s in samples]
    # The teacher rows are the byte tokenizer's spelling of prompt + completion.
    for r, s in enumerate(samples):
        n = int((batch["teacher_segment_ids"][r] > 0).sum())
        want = [b + 3 for b in (s.prompt.encode() + s.completion)] + [2] * s.eos
        assert batch["teacher_tokens"][r, :n].tolist() == want
    spec = XtokSpec(terms={"alm": 1.0})
    opt = optax.sgd(0.1)
    t_word = word_start_mask(ttok, tcfg.vocab_size)
    step = jax.jit(make_step(scfg, tcfg, spec, terms.LIVE_ALIGNED, opt, chunk_size=64,
                                        student_word_start=word_start_mask(stok, scfg.vocab_size),
                                        teacher_word_start=t_word))
    keys = [k for k in batch if not k.startswith("onpolicy/")]
    state, metrics = step(init_state(sp, opt), tp, {k: batch[k] for k in keys})
    assert np.isfinite(float(metrics["distill/loss"])) and float(metrics["distill/loss"]) > 0
    stats = teacher_token_stats(tcfg, tp, batch, jax.numpy.asarray(t_word), chunk_size=64)
    lp = np.asarray(stats["teacher_actual_logprob"], np.float64)
    m = X.xtok_rollout_metrics(batch, lp)
    nbytes = sum(len(s.completion) for s in samples)
    want_lp = lp[batch["teacher_loss_mask"] > 0].sum() / max(nbytes, 1)
    np.testing.assert_allclose(float(m[X.TEACHER_LOGPROB_PER_BYTE]), want_lp, rtol=1e-5)
    assert float(m[X.EOS_SHARE]) == np.mean([s.stopped for s in samples])
    assert float(m[X.MEAN_BYTES]) == nbytes / 8


PLANTED = "ok!"


def _planted_teacher(ttok):
    """A bigram teacher over the byte tokenizer (its block adds nothing: the logits read the
    current token's embedding) that continues ':' with PLANTED, then EOS, with prob ~1."""
    tcfg, tp = _tiny(len(ttok), 3, hidden=64)
    tp = jax.tree.map(np.array, tp)
    tp["layers"]["attn"]["o"][:] = 0.0
    tp["layers"]["mlp"]["down"][:] = 0.0
    emb = np.random.default_rng(4).normal(size=tp["embed"].shape).astype(np.float32)
    tp["embed"] = emb
    chain = [ord(":") + 3] + [b + 3 for b in PLANTED.encode()] + [ttok.eos_token_id]
    head = np.zeros_like(tp["lm_head"])
    for a, b in zip(chain[:-1], chain[1:]):
        head[:, b] += 40.0 * emb[a] / np.linalg.norm(emb[a]) / np.sqrt(emb.shape[1])
    tp["lm_head"] = head
    return tcfg, jax.tree.map(jax.numpy.asarray, tp)


def test_planted_teacher_across_tokenizers(toks):
    """A student with a BPE tokenizer, trained only with ALM on its own samples against a
    byte-tokenizer teacher that puts its mass on ':' -> PLANTED + EOS, learns to sample
    PLANTED then EOS (>= 80% of 32 fresh samples) within STEPS two-phase steps; the teacher's
    log-prob per completion byte rises to ~0 and every sample ends with EOS."""
    import functools

    import optax

    from distill_jax.data.testing import tiny_tokenizer
    from distill_jax.losses.xtok import XtokSpec
    from distill_jax.tokens import tokenizer_info, word_start_mask
    from distill_jax.losses import terms
    from distill_jax.train.step import init_state, make_step, teacher_token_stats
    steps, b, n = 100, 32, 6
    stok, ttok = tiny_tokenizer("byte_level", vocab_size=300), toks["bytes"]
    cfg = DataConfig(record="prompt_response", seq_len=16, teacher_seq_len=16)
    tcfg, tp = _planted_teacher(ttok)
    scfg, sp = _tiny(len(stok), 2, std=0.02)
    sp = jax.tree.map(np.array, sp)
    # The student starts on printable text: a constant embedding direction read by lm_head as a
    # logit bias against special tokens and non-ASCII pieces (which may be cut UTF-8).
    table = tokenizer_info(stok).token_bytes
    other = [i for i in range(len(stok)) if i != stok.eos_token_id
             and (i in tokenizer_info(stok).special_ids or not table[i].isascii())]
    sp["embed"][:, 0] = 3.0
    sp["lm_head"][0, other] = -3.0
    sp = jax.tree.map(jax.numpy.asarray, sp)
    prompt = op.prompt_from_record({"prompt": "Q:", "response": PLANTED}, stok, cfg)
    pb = op.prompt_batch([prompt] * b, max_new_tokens=n, buckets=(8,))
    roll = jax.jit(functools.partial(op.onpolicy_batch, scfg, lmbda=1.0, max_new_tokens=n,
                                     eos_ids=(stok.eos_token_id,)))
    spec = XtokSpec(terms={"alm": 1.0}, tau=1.0, merge_threshold=None, append_space=False)
    opt = optax.adam(0.01, eps=1e-3)
    t_word = word_start_mask(ttok, tcfg.vocab_size)
    step = jax.jit(make_step(scfg, tcfg, spec, terms.LIVE_ALIGNED, opt, chunk_size=64,
                                        student_word_start=word_start_mask(stok, scfg.vocab_size),
                                        teacher_word_start=t_word))
    stats = jax.jit(lambda p, bt: teacher_token_stats(tcfg, p, bt, jax.numpy.asarray(t_word),
                                                      chunk_size=64)["teacher_actual_logprob"])
    state = init_state(sp, opt)
    key = jax.random.key(0)  # seeds 1, 2, 3 pass too
    first = last = None
    for i in range(steps):
        key, k = jax.random.split(key)
        batch, _ = X.xtok_onpolicy_batch(roll, state.params["model"], pb, k,
                                         student_tokenizer=stok, teacher_tokenizer=ttok,
                                         config=cfg)
        batch = {k2: v for k2, v in batch.items()}
        arrays = {k2: v for k2, v in batch.items() if not k2.startswith("onpolicy/")}
        if i in (0, steps - 1):
            m = jax.device_get(X.xtok_rollout_metrics(batch, stats(tp, arrays)))
            first, last = (m, last) if i == 0 else (first, m)
        state, _ = step(state, tp, arrays)
    samples = X.decode_rows(jax.device_get(roll(state.params["model"], pb, jax.random.key(9))),
                            stok)
    share = np.mean([s.completion == PLANTED.encode() and s.eos for s in samples])
    assert share >= 0.8, [s.completion for s in samples]
    assert first[X.TEACHER_LOGPROB_PER_BYTE] < -5.0 < -0.5 < last[X.TEACHER_LOGPROB_PER_BYTE]
    assert first[X.EOS_SHARE] < 0.5 and last[X.EOS_SHARE] >= 0.8
    assert abs(last[X.MEAN_BYTES] - len(PLANTED)) < 0.5


@pytest.mark.parametrize("student,teacher", [("bytes", "smollm2"), ("bytes", "mistral"),
                                             ("chatml", "mistral")])
def test_teacher_reads_its_own_chat_template(tmp_path, toks, student, teacher):
    """With teacher_prompts the teacher row is the teacher's own rendering of the conversation,
    then the completion's bytes, then its own end of turn (SmolLM2 ``<|im_end|>``, Mistral
    ``</s>``) for the student's stop token (the byte tokenizer's EOS, or a ChatML student's
    ``<|im_end|>`` given as a stop id): the completion aligns chunk for chunk over the same
    bytes, the two turn ends are one chunk, and no chunk covers a prompt target."""
    from distill_jax.data.testing import tiny_tokenizer
    stok = toks["bytes"] if student == "bytes" else tiny_tokenizer("byte_level")
    ttok = toks[teacher]
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "It is 5, déjà vu."}]
    cfg = _config(tmp_path, {"messages": messages}, record="chat")
    reply = messages[1]["content"].encode()
    if student == "bytes":
        stop, ids = (), [b + 3 for b in reply] + [stok.eos_token_id]
    else:
        stop = (stok.convert_tokens_to_ids("<|im_end|>"),)
        ids = stok(messages[1]["content"], add_special_tokens=False)["input_ids"] + list(stop)
    rows = _rows(stok, cfg, {"messages": messages}, ids)
    tp = X.teacher_prompt(messages[:1], ttok)
    end = X.teacher_turn_end(ttok)
    assert end == {"smollm2": "<|im_end|>", "mistral": "</s>"}[teacher]
    got = X.xtok_rows(rows, stok, ttok, cfg, teacher_prompts=[tp], stop_ids=stop)
    assert got[X.FINISHED].tolist() == [True] and got[X.COMPLETION_BYTES][0] == len(reply)
    nt = int((got["teacher_segment_ids"][0] > 0).sum())
    t_prompt = ttok(tp, add_special_tokens=False)["input_ids"]
    t_ids = got["teacher_tokens"][0, :nt].tolist()
    head = 1 if t_ids[:1] == [ttok.bos_token_id] and t_prompt[:1] != t_ids[:1] else 0
    assert t_ids[head:head + len(t_prompt)] == t_prompt
    assert t_ids[-1] == ttok.convert_tokens_to_ids(end)
    tb = X.tokenizer_info(ttok).token_bytes
    t_reply = t_ids[head + len(t_prompt):-1]
    assert b"".join(tb[i] for i in t_reply) in (reply, b" " + reply)  # Mistral: dummy prefix
    # Chunks: only on completion targets, and the last one pairs EOS with the turn end.
    n = int((got["segment_ids"][0] > 0).sum())
    s_ch, t_ch = got["chunk_ids"][0], got["teacher_chunk_ids"][0]
    assert (s_ch[:n - len(ids) - 1] == -1).all() and (t_ch[:nt - len(t_reply) - 2] == -1).all()
    assert s_ch[n - 2] == t_ch[nt - 2] >= 0
    assert (s_ch[n - len(ids) - 1:n - 1] >= 0).all()
    assert got["teacher_loss_mask"][0, nt - 2] == 1 and got["loss_mask"][0, n - 2] == 1
