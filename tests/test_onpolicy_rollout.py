"""On-policy rows: prompts from records, the jittable rollout, packing, lmbda mixing, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_jax.models as M
from distill_jax import onpolicy as op
from distill_jax.data.config import DataConfig
from distill_jax.data.testing import tiny_tokenizer
from distill_jax.data.tokenize import tokenize_record
from distill_jax.onpolicy import rows as R

N = 6                 # max_new_tokens
EOS = (2, 3, 4, 5)    # a random tiny model stops on one of these within a few steps


def _tiny(vocab: int, seed: int = 0, std: float = 0.3) -> M.Model:
    """A 1-layer llama with norm scales 1 and everything else normal(0, std), built in numpy
    (``M.init``'s jitted random init would compile for seconds)."""
    cfg = M.ModelConfig.tiny("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    return M.Model(cfg, M.numpy_params(cfg, np.random.default_rng(seed), std))


def _prompts(rng, b, vocab, bucket=8):
    lengths = rng.integers(1, bucket + 1, b)
    ps = [op.Prompt(rng.integers(6, vocab, n).astype(np.int32), np.zeros(0, np.int32),
                    np.zeros(0, bool)) for n in lengths]
    return op.prompt_batch(ps, max_new_tokens=N, buckets=(bucket, 2 * bucket))


@pytest.fixture(scope="module")
def student():
    return _tiny(32, seed=1)


def _check_row(batch, r, prompt, completion, mask=None):
    """Row ``r`` of a packed batch holds ``prompt + completion`` as the module docstring says."""
    p, c = len(prompt), len(completion)
    length = batch["tokens"].shape[1]
    seq = np.concatenate([prompt, completion])
    np.testing.assert_array_equal(batch["tokens"][r], np.pad(seq, (0, length - p - c)))
    np.testing.assert_array_equal(batch["targets"][r],
                                  np.pad(seq[1:], (0, length - p - c + 1)))
    np.testing.assert_array_equal(batch["positions"][r],
                                  np.pad(np.arange(p + c), (0, length - p - c)))
    np.testing.assert_array_equal(batch["segment_ids"][r], (np.arange(length) < p + c) * 1)
    expected = np.zeros(length, np.float32)
    expected[p - 1:p + c - 1] = 1.0 if mask is None else mask
    np.testing.assert_array_equal(batch["loss_mask"][r], expected)


def test_rollout_rows_eos_packing_and_one_compile(student):
    cfg = student.config
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, 16, cfg.vocab_size)
    fn = jax.jit(lambda params, pb, key: op.onpolicy_batch(
        cfg, params, pb, key, lmbda=1.0, max_new_tokens=N, eos_ids=EOS))
    key = jax.random.key(3)
    batch = jax.tree.map(np.asarray, fn(student.params, prompts, key))
    assert batch["tokens"].shape == (16, 8 + N) and batch["loss_mask"].dtype == np.float32
    # The rows hold exactly the rollout of the same key (onpolicy_batch's second split).
    roll = jax.jit(lambda params, pb, k: op.rollout(
        cfg, params, pb["prompt_tokens"], pb["prompt_lengths"], k, max_new_tokens=N,
        eos_ids=EOS))(student.params, prompts, jax.random.split(key)[1])
    roll = jax.tree.map(np.asarray, roll)
    assert batch[R.SAMPLED].all()
    np.testing.assert_array_equal(batch[R.COMPLETION_LENGTHS], roll.lengths)
    np.testing.assert_array_equal(batch[R.FINISHED], roll.finished)
    finished = 0
    for r in range(16):
        p = prompts["prompt_lengths"][r]
        prompt = prompts["prompt_tokens"][r, 8 - p:]
        c = roll.lengths[r]
        comp = roll.tokens[r, :c]
        in_eos = np.isin(comp, EOS)
        if roll.finished[r]:  # the EOS is kept and trained, nothing after it
            assert in_eos[-1] and not in_eos[:-1].any()
            assert (roll.tokens[r, c:] == 0).all() and (roll.logprobs[r, c:] == 0).all()
            finished += 1
        else:
            assert c == N and not in_eos.any()
        _check_row(batch, r, prompt, comp)
        lp = np.zeros(8 + N, np.float32)
        lp[p - 1:p + c - 1] = roll.logprobs[r, :c]
        np.testing.assert_array_equal(batch[R.SAMPLE_LOGPROBS][r], lp)
    assert 0 < finished < 16, "the test should see rows that stop on EOS and rows that run out"
    # Sampling-time log-probs (KV cache, left-padded) == training-time ones (packed rows, one
    # forward): temperature 1, no filters, no dropout.
    train_lp = np.asarray(jax.jit(lambda p, b: op.token_logprobs(cfg, p, b, chunk_size=16))(
        student.params, batch))
    w = batch["loss_mask"] > 0
    np.testing.assert_allclose(train_lp[w], batch[R.SAMPLE_LOGPROBS][w], atol=2e-5)
    m = op.rollout_metrics(batch, student_logprobs=train_lp, teacher_logprobs=train_lp)
    assert float(m[R.ROWS]) == 16 and float(m[R.GENERATED]) == roll.lengths.sum()
    assert abs(float(m[R.MEAN_LENGTH]) - roll.lengths.mean()) < 1e-6
    assert abs(float(m[R.EOS_SHARE]) - finished / 16) < 1e-6
    assert abs(float(m[R.LOGPROB_GAP])) < 1e-5 and float(m[R.LOGPROB_GAP_ABS]) < 2e-5
    assert abs(float(m[R.TEACHER_LOGPROB]) - train_lp[w].mean()) < 1e-5
    # A second batch of the same bucket (other prompts and lengths) reuses the compilation.
    other = _prompts(np.random.default_rng(1), 16, cfg.vocab_size)
    assert other["prompt_tokens"].shape == prompts["prompt_tokens"].shape
    fn(student.params, other, jax.random.key(4))
    assert fn._cache_size() == 1


def test_top_p_logprobs_are_of_the_sampling_distribution(student):
    """With top-p and a temperature, the returned log-probs are those of the filtered,
    tempered distribution the tokens were drawn from (checked against numpy)."""
    cfg = student.config
    prompts = _prompts(np.random.default_rng(2), 4, cfg.vocab_size)
    roll = jax.tree.map(np.asarray, jax.jit(lambda params, k: op.rollout(
        cfg, params, prompts["prompt_tokens"], prompts["prompt_lengths"], k, max_new_tokens=1,
        temperature=0.7, top_p=0.5))(student.params, jax.random.key(0)))
    # The first token's distribution: the model's logits at the last prompt slot.
    for r in range(4):
        p = prompts["prompt_lengths"][r]
        toks = prompts["prompt_tokens"][r, 8 - p:][None]
        z = np.asarray(M.forward(student, jnp.asarray(toks)), np.float64)[0, -1] / 0.7
        prob = np.exp(z - z.max())
        prob /= prob.sum()
        order = np.argsort(-prob, kind="stable")
        cum = np.cumsum(prob[order]) - prob[order]
        kept = order[cum < 0.5]
        q = prob[kept] / prob[kept].sum()
        tok = roll.tokens[r, 0]
        assert tok in kept
        np.testing.assert_allclose(roll.logprobs[r, 0], np.log(q[list(kept).index(tok)]),
                                   atol=1e-5)


# ----------------------------------------------------------------------------- prompts, lmbda
RECORDS = [
    {"messages": [{"role": "user", "content": "the river at night"},
                  {"role": "assistant", "content": "a garden of questions"}]},
    {"messages": [{"role": "system", "content": "answer"},
                  {"role": "user", "content": "one two"},
                  {"role": "assistant", "content": "three."},
                  {"role": "user", "content": "and then"},
                  {"role": "assistant", "content": "four five six"}]},
    {"prompt": "what is the model", "response": "the teacher and the student"},
    {"messages": [{"role": "user", "content": "first of all"},
                  {"role": "assistant", "content": "it was"}]},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_prompts_from_records(tok):
    cfg = DataConfig(record="chat")
    p = op.prompt_from_record(RECORDS[0], tok, cfg)
    assert tok.decode(p.ids) == tok.apply_chat_template(RECORDS[0]["messages"][:1],
                                                        tokenize=False, add_generation_prompt=True)
    assert tok.decode(p.reference).startswith("a garden of questions<|im_end|>")
    # Prompt-only rows: no reference; the conversation rendered with the generation prompt.
    q = op.prompt_from_record({"prompt": "the river at night"}, tok, cfg)
    np.testing.assert_array_equal(q.ids, p.ids)
    assert q.reference.size == 0
    r = op.prompt_from_record({"messages": RECORDS[1]["messages"][:4]}, tok, cfg)
    assert tok.decode(r.ids).endswith("and then<|im_end|>\n<|im_start|>assistant\n")
    pr = op.prompt_from_record({"prompt": "a b ", "response": "c d"}, tok,
                               DataConfig(record="prompt_response"))
    assert tok.decode(pr.ids) == "a b " and tok.decode(pr.reference).startswith("c d")
    with pytest.raises(ValueError, match="set data.record to 'chat' or 'prompt_response'"):
        op.prompt_from_record({"text": "x"}, tok, DataConfig(record="text"))
    with pytest.raises(ValueError, match="largest prompt bucket 8; add a larger bucket"):
        op.prompt_batch([p], max_new_tokens=4, buckets=(8,))
    batch = op.prompt_batch([p, q], max_new_tokens=4, buckets=(8, 64))
    assert batch["prompt_tokens"].shape == (2, 64) and batch["reference_tokens"].shape == (2, 4)
    assert list(batch["reference_lengths"]) == [4, 0]


@pytest.mark.parametrize("kind,bos", [("byte_level", False), ("metaspace", True)])
@pytest.mark.parametrize("record_kind", ["chat", "prompt_response"])
def test_prompt_and_reference_split_the_pipeline_document(kind, bos, record_kind):
    """prompt + reference == the pipeline's tokens up to the last trained one (BOS, byte
    fallback and non-ASCII included); no trained token in the prompt or after the reference;
    and the prompt-only form of the record gives the same prompt ids (so the student is
    sampled on exactly the prompt the dataset rows train on)."""
    tok = tiny_tokenizer(kind, bos=bos)
    cfg = DataConfig(record=record_kind)
    if record_kind == "chat":
        record = {"messages": [{"role": "user", "content": "the café at night"},
                               {"role": "assistant", "content": "a garden of questions"}]}
        bare = {"prompt": "the café at night"}
    else:
        record = {"prompt": "the river ", "response": "flows, naïve."}
        bare = {"prompt": "the river "}
    p = op.prompt_from_record(record, tok, cfg)
    doc = tokenize_record(record, tok, cfg)
    m = len(p.ids) + len(p.reference)
    np.testing.assert_array_equal(np.concatenate([p.ids, p.reference]), doc.ids[:m])
    np.testing.assert_array_equal(p.reference_trained, doc.trained[len(p.ids):m])
    assert p.reference_trained[-1] and not doc.trained[:len(p.ids)].any()
    assert not doc.trained[m:].any()
    assert (p.ids[0] == tok.bos_token_id) == bos
    np.testing.assert_array_equal(op.prompt_from_record(bare, tok, cfg).ids, p.ids)


def test_lmbda_zero_gives_the_pipeline_rows_and_one_gives_samples(tok):
    """lmbda = 0: each row is the data pipeline's tokenization of its record (tokens, targets,
    loss mask of the final turn) cut after its last trained token, so off-policy training on
    the final turn is reproduced exactly;
    a prompt-only row still takes a sample. lmbda = 1: every row is sampled."""
    cfg = DataConfig(record="chat")
    student = _tiny(len(tok), seed=2)
    eos = (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id)
    prompts = [op.prompt_from_record(r, tok, cfg) for r in RECORDS]
    prompts.append(op.prompt_from_record({"prompt": "what is it"}, tok, cfg))
    n = 16
    assert max(len(p.reference) for p in prompts) <= n
    pb = op.prompt_batch(prompts, max_new_tokens=n, buckets=(64,))
    pb = {k: np.concatenate([v] * 6) for k, v in pb.items()}  # 30 rows

    def make(lmbda, mix="batch"):
        return jax.jit(lambda params, pb, key: op.onpolicy_batch(
            student.config, params, pb, key, lmbda=lmbda, max_new_tokens=n, eos_ids=eos,
            mix=mix))

    key = jax.random.key(0)
    b0 = jax.tree.map(np.asarray, make(0.0)(student.params, pb, key))
    assert list(b0[R.SAMPLED]) == ([False] * 4 + [True]) * 6
    for i, record in enumerate(RECORDS):
        doc = tokenize_record(record, tok, cfg)
        m = len(prompts[i].ids) + len(prompts[i].reference)
        assert not doc.trained[m:].any()  # nothing trained after the reference
        _check_row(b0, i, doc.ids[:len(prompts[i].ids)], doc.ids[len(prompts[i].ids):m],
                   mask=doc.trained[len(prompts[i].ids):m])
        np.testing.assert_array_equal(b0["targets"][i, :m - 1], doc.ids[1:m])
        # Earlier assistant turns are context here (record 1), the final turn as the pipeline.
        trained = doc.trained.copy()
        trained[:len(prompts[i].ids)] = False
        assert (trained == doc.trained).all() == (i != 1)
        np.testing.assert_array_equal(b0["loss_mask"][i, :m - 1], trained[1:m])
    assert b0["loss_mask"][4].sum() == b0[R.COMPLETION_LENGTHS][4] > 0
    b1 = jax.tree.map(np.asarray, make(1.0)(student.params, pb, key))
    assert b1[R.SAMPLED].all()
    np.testing.assert_array_equal(b1["tokens"][4], b0["tokens"][4])  # same key, same sample
    # Per-row mixing: each row is its lmbda=1 row or its lmbda=0 row, and both kinds occur.
    rows = jax.tree.map(np.asarray, make(0.5, "row")(student.params, pb, key))
    s = rows[R.SAMPLED]
    assert 8 < s.sum() < 26
    for k in R.ROW_KEYS:
        np.testing.assert_array_equal(rows[k][s], b1[k][s])
        np.testing.assert_array_equal(rows[k][~s], b0[k][~s])


def test_bad_settings_fail_with_the_fix(student):
    pb = _prompts(np.random.default_rng(0), 2, 32)
    with pytest.raises(ValueError, match="lmbda must be in"):
        op.onpolicy_batch(student.config, student.params, pb, jax.random.key(0), lmbda=1.5,
                          max_new_tokens=N)
    with pytest.raises(ValueError, match=r"prompt_batch\(\.\.\., max_new_tokens=7\)"):
        op.onpolicy_batch(student.config, student.params, pb, jax.random.key(0), lmbda=1.0,
                          max_new_tokens=7)


def test_sharded_equals_unsharded(student, devices8):
    """onpolicy_batch in a jit over 8 devices (rows over data x fsdp, params sharded by their
    logical axes) gives the unsharded batch: the same samples, rows and log-probs."""
    from distill_jax import sharding as shd

    cfg = student.config
    rng = np.random.default_rng(7)
    pb = _prompts(rng, 16, cfg.vocab_size)
    pb["reference_tokens"] = rng.integers(6, cfg.vocab_size, (16, N)).astype(np.int32)
    pb["reference_lengths"] = rng.integers(1, N + 1, 16).astype(np.int32)
    pb["reference_mask"] = (np.arange(N) < pb["reference_lengths"][:, None]).astype(np.float32)

    def fn(params, pb, key):
        return op.onpolicy_batch(cfg, params, pb, key, lmbda=0.5, mix="row", max_new_tokens=N,
                                 eos_ids=EOS)

    ref = jax.tree.map(np.asarray, jax.jit(fn)(student.params, pb, jax.random.key(1)))
    mesh = shd.make_mesh(data=4, fsdp=2, devices=devices8)
    params = jax.device_put(student.params, M.param_shardings(cfg, mesh))
    rows = {k: jax.device_put(v, shd.batch_sharding(mesh, np.ndim(v))) for k, v in pb.items()}
    out = jax.tree.map(np.asarray, jax.jit(fn)(params, rows, jax.random.key(1)))
    assert 0 < ref[R.SAMPLED].sum() < 16
    for k in ref:
        np.testing.assert_allclose(out[k], ref[k], atol=1e-5, err_msg=k)
