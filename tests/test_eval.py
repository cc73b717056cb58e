"""Evaluation: bits per byte, agreement and math exact match against independent references.

Math uses a real tiny transformer whose greedy (or sampled) output is set by construction: the
attention and MLP outputs are zero, the embeddings one-hot, so the next token depends only on
the current one through the lm_head, a bigram table we choose.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import models as M
from distill_jax.data import DataConfig
from distill_jax.data.mathgen import parse_answer
from distill_jax.data.tokenize import tokenize_record
from distill_jax.eval import (ScoredDoc, agreement, answers_equal, evaluate_docs, evaluate_text,
                              majority_vote, math_accuracy, scored_doc)
from distill_jax.eval.lm import doc_totals, same_first_byte
from distill_jax.models import presets
from distill_jax.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOK = load_tokenizer("bytes")
EOS = TOK.eos_token_id


def byte_id(ch: str) -> int:
    (i,) = TOK(ch, add_special_tokens=False)["input_ids"]
    return i


def tiny(num_layers=1, hidden=32, seed=0, head_scale=1.0) -> M.Model:
    cfg = presets.preset("tiny-llama", vocab_size=259, num_layers=num_layers, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_heads=2, num_kv_heads=1)
    model = M.init(cfg, seed)
    # A larger head makes the distributions peaked, so top-1 ties cannot flip on rounding.
    return model.replace(params={**model.params, "lm_head": model.params["lm_head"] * head_scale})


def bigram_model(table: dict[str, dict[str, float]]) -> M.Model:
    """Next-token logits depend on the current token only: ``table[cur][next] = logit``
    (``"<eos>"`` names EOS); every other token predicts EOS."""
    d = 264
    cfg = presets.preset("tiny-llama", vocab_size=259, num_layers=1, hidden_size=d,
                         intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=8)
    p = jax.tree.map(np.asarray, M.init(cfg, 0).params)
    embed = np.zeros((259, d), np.float32)
    embed[np.arange(259), np.arange(259)] = 1.0
    scale = 1.0 / math.sqrt(1.0 / d + cfg.rms_norm_eps)  # RMS-normed one-hot entry
    head = np.zeros((d, 259), np.float32)
    head[:259, EOS] = 30.0 / scale
    for cur, nxt in table.items():
        row = byte_id(cur)
        head[row, EOS] = 0.0
        for tok, logit in nxt.items():
            head[row, EOS if tok == "<eos>" else byte_id(tok)] = logit / scale
    layers = {**p["layers"], "attn": {**p["layers"]["attn"], "o": np.zeros_like(p["layers"]["attn"]["o"])},
              "mlp": {**p["layers"]["mlp"], "down": np.zeros_like(p["layers"]["mlp"]["down"])}}
    return M.Model(cfg, jax.tree.map(jax.numpy.asarray,
                                     {**p, "embed": embed, "lm_head": head, "layers": layers}))


def log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


_forward = jax.jit(M.forward)


def ref_logp(model, ids, start, m, width=64):
    """float64 log-probs after each of ids[start:start+m], from one causal forward of the
    window alone (right-padded to ``width``: later positions cannot change earlier ones)."""
    row = np.zeros((1, width), np.int32)
    row[0, :m] = ids[start:start + m]
    return log_softmax64(np.asarray(_forward(model, row))[0, :m])


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7.\n#### 42", 42),
    ("#### 1,234 apples", 1234),
    ("She pays $1,250 in total.", 1250),
    ("The answer is -17 degrees", -17),
    ("It costs 2.50 dollars, then 3.75", 3.75),
    ("12.00", 12),
    ("first 5 then 8 then 13", 13),
    ("no digits here", None),
    ("", None),
])
def test_answer_parsing(text, expected):
    got = parse_answer(text)
    assert got == expected and type(got) is type(expected)


def test_answers_compare_numerically_and_majority_vote():
    assert answers_equal(12, 12.0) and answers_equal(0.1 + 0.2, 0.3)
    assert not answers_equal(12, 13) and not answers_equal(None, None) and not answers_equal(None, 0)
    assert majority_vote([7, 42, None, 42.0, 7, 42]) == 42
    assert majority_vote([None, 5, 3, 3, 5]) == 5  # a tie goes to the first seen
    assert majority_vote([None, None]) is None
    assert majority_vote([2.5, 3, 2.5]) == 2.5


# ----------------------------------------------------------------------------- math
def test_math_exact_match_with_a_forced_greedy_model():
    # After the chat template's "<|assistant|>\n" the model writes "42" then EOS; on raw
    # prompts it answers "-7" after a "." and "42" after a "?".
    model = bigram_model({"\n": {"4": 20.0}, "4": {"2": 20.0}, "2": {"<eos>": 20.0},
                          "?": {"4": 20.0}, ".": {"-": 20.0}, "-": {"7": 20.0},
                          "7": {"<eos>": 20.0}})
    problems = [{"prompt": "Add 40 and 2?", "response": "40 + 2 = 42\n#### 42"},
                {"prompt": "Take 9 from 2.", "response": "#### -7"},
                {"prompt": "How many?", "answer": 42},
                {"prompt": "Six times seven.", "answer": "-7.0"}]
    chat = math_accuracy(model, TOK, problems, max_new_tokens=6, batch_size=3)
    assert [r.output for r in chat.results] == ["42"] * 4
    assert [r.correct for r in chat.results] == [True, False, True, False]
    assert chat.accuracy == 0.5 and chat.total == 4 and chat.generated_tokens == 4 * 3  # 4, 2, EOS
    raw = math_accuracy(model, TOK, problems, max_new_tokens=6, batch_size=3, chat_template=False)
    assert [r.output for r in raw.results] == ["42", "-7", "42", "-7"]
    assert [r.answer for r in raw.results] == [42, -7, 42, -7] and raw.accuracy == 1.0


def test_math_majority_vote_over_samples():
    # p("42") = 1 / (1 + exp(-2.2)) = 0.9, p("7") = 0.1 per sample.
    model = bigram_model({"\n": {"4": 20.0, "7": 17.8}, "4": {"2": 20.0}, "2": {"<eos>": 20.0},
                          "7": {"<eos>": 20.0}})
    problems = [{"prompt": f"Problem {i}", "answer": 42} for i in range(4)]
    out = math_accuracy(model, TOK, problems, max_new_tokens=6, num_samples=15, temperature=1.0,
                        batch_size=8, seed=3)
    samples = [s for r in out.results for s in r.samples]
    assert set(samples) == {42, 7} and len(samples) == 60
    assert 0.75 <= samples.count(42) / 60 <= 0.98
    for r in out.results:
        assert r.samples.count(42) > r.samples.count(7) and r.answer == 42 and r.correct
    assert out.accuracy == 1.0
    # The same seed gives the same samples; the vote needs a temperature.
    again = math_accuracy(model, TOK, problems, max_new_tokens=6, num_samples=15,
                          temperature=1.0, batch_size=8, seed=3)
    assert [r.samples for r in again.results] == [r.samples for r in out.results]
    with pytest.raises(ValueError, match="temperature > 0"):
        math_accuracy(model, TOK, problems, num_samples=3, temperature=0.0)


# ----------------------------------------------------------------------------- bits per byte
TEXTS = ["Hi", "Tom has 3 apples and buys 4 more. How many now? #### 7",
         "A longer document, over one window: " + "the quick brown fox jumps over the lazy dog. " * 3,
         "ünïcödé bytes: €5 ✓"]


def test_bits_per_byte_equals_numpy_nats_per_byte():
    model = tiny(seed=1, head_scale=20.0)
    seq_len = 64
    got = evaluate_text(model, TOK, TEXTS, seq_len=seq_len, batch_size=2, chunk_size=48)
    nll, n_tok, n_bytes = 0.0, 0, 0
    for text in TEXTS:
        ids = [b + 3 for b in text.encode("utf-8")]  # the byte tokenizer: no BOS
        for start in range(0, len(ids) - 1, seq_len):
            m = min(seq_len, len(ids) - 1 - start)
            logp = ref_logp(model, ids, start, m)
            nll -= sum(logp[j, ids[start + j + 1]] for j in range(m))
            n_tok += m
        n_bytes += len(text.encode("utf-8")) - 1  # the first byte is never predicted
    assert (got.tokens, got.bytes) == (n_tok, n_bytes)
    np.testing.assert_allclose(got.bits_per_byte, nll / math.log(2) / n_bytes, rtol=1e-5)
    np.testing.assert_allclose(got.perplexity, math.exp(nll / n_tok), rtol=1e-5)

    # Prompt/response records score the response (and EOS) only: its bytes, whatever came before.
    config = DataConfig(record="prompt_response")
    rec = {"prompt": "Q: 2+2?\n", "response": "A: 4\n#### 4"}
    doc = tokenize_record(rec, TOK, config).student
    got = evaluate_docs(model, [scored_doc(doc)], seq_len=seq_len, batch_size=2, chunk_size=48)
    ids = [b + 3 for b in (rec["prompt"] + rec["response"]).encode()] + [EOS]
    first = len(rec["prompt"].encode())
    logp = ref_logp(model, ids, 0, len(ids) - 1)
    assert len(ids) - 1 <= 64
    ref = -sum(logp[j - 1, ids[j]] for j in range(first, len(ids)))
    assert (got.tokens, got.bytes) == (len(ids) - first, len(rec["response"].encode()))
    np.testing.assert_allclose(got.nll, ref, rtol=1e-5)


def test_two_tokenizers_score_the_same_bytes():
    # "abcdefgh" as bytes (no BOS) and as "abc|de|fgh": both score from byte 3 (the byte
    # tokenizer could from 1; the other from 3), the first byte both start a token at.
    a = ScoredDoc(np.arange(8), np.ones(8, bool), np.arange(8), np.arange(1, 9))
    b = ScoredDoc(np.arange(3), np.ones(3, bool), np.array([0, 3, 5]), np.array([3, 5, 8]))
    a2, b2 = same_first_byte(a, b)
    assert a2.scored.tolist() == [False] * 3 + [True] * 5 and b2.scored.tolist() == [False, True, True]
    assert doc_totals([a2]) == (5, 5) and doc_totals([b2]) == (2, 5)
    # With a BOS (zero-width) in front of both, every byte is predicted: nothing changes.
    bos_a = ScoredDoc(np.arange(9), np.arange(9) > 0, np.r_[0, np.arange(8)], np.r_[0, np.arange(1, 9)])
    bos_b = ScoredDoc(np.arange(4), np.arange(4) > 0, np.array([0, 0, 3, 5]), np.array([0, 3, 5, 8]))
    a3, b3 = same_first_byte(bos_a, bos_b)
    assert a3.scored.tolist() == bos_a.scored.tolist() and b3.scored.tolist() == bos_b.scored.tolist()
    assert doc_totals([a3]) == (8, 8) and doc_totals([b3]) == (3, 8)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from distill_jax import assets
    try:
        return load_tokenizer(assets.smollm2_hf_dir())
    except assets.AssetError as err:
        pytest.skip(f"SmolLM2 unavailable: {err}")


@pytest.mark.parametrize("record, loss_on_prompt", [("text_of_chat", True), ("chat", False),
                                                    ("prompt_response", False)])
def test_held_out_bytes_match_across_real_tokenizers(record, loss_on_prompt, smollm2_tokenizer):
    from distill_jax.config import load_run_config
    from distill_jax.eval.run import heldout_docs
    cfg = load_run_config(REPO / "configs/tiny.yaml", [
        "eval.sources=[{path: configs/data/math_test.jsonl}]", "eval.max_documents=20",
        f"data.record={'chat' if record == 'text_of_chat' else record}",
        f"data.loss_on_prompt={str(loss_on_prompt).lower()}"])
    student, teacher = heldout_docs(cfg, TOK, smollm2_tokenizer)
    (n_s, bytes_s), (n_t, bytes_t) = doc_totals(student), doc_totals(teacher)
    assert bytes_s == bytes_t and n_t < n_s  # the same bytes, fewer (BPE) tokens


# ----------------------------------------------------------------------------- agreement
def test_agreement_self_and_against_numpy(devices8):
    teacher = tiny(seed=1, head_scale=20.0)
    # The student: the teacher with a perturbed head, so they agree on some tokens only.
    noise = jax.random.normal(jax.random.key(5), teacher.params["lm_head"].shape)
    student = teacher.replace(params={**teacher.params,
                                      "lm_head": teacher.params["lm_head"] * 0.7 + 0.3 * noise})
    same = agreement(student, student, TOK, TEXTS, seq_len=64, batch_size=2, chunk_size=48)
    assert same.tokens > 0 and same.top1 == 1.0 and abs(same.kl_per_token) < 1e-6

    got = agreement(teacher, student, TOK, TEXTS, seq_len=64, batch_size=2, chunk_size=48)
    kl, match, n = 0.0, 0, 0
    for text in TEXTS:
        ids = [b + 3 for b in text.encode("utf-8")]
        for start in range(0, len(ids) - 1, 64):
            m = min(64, len(ids) - 1 - start)
            lt, ls = ref_logp(teacher, ids, start, m), ref_logp(student, ids, start, m)
            kl += float(np.sum(np.exp(lt) * (lt - ls)))
            match += int(np.sum(lt.argmax(-1) == ls.argmax(-1)))
            n += m
    assert got.tokens == n and got.matches == match and 0 < match < n
    np.testing.assert_allclose(got.kl_per_token, kl / n, rtol=1e-5)

    # Data-parallel batches over 8 devices give the same sums.
    from distill_jax import sharding
    from distill_jax.eval import agreement_docs, text_docs
    mesh = sharding.make_mesh(-1, 1, 1, devices8)
    sharded = agreement_docs(teacher, student, text_docs(TOK, TEXTS), seq_len=64, batch_size=2,
                             chunk_size=48, sharding=sharding.batch_sharding(mesh))
    assert sharded.matches == got.matches
    np.testing.assert_allclose(sharded.kl, got.kl, rtol=1e-6)


# ----------------------------------------------------------------------------- CLI
def test_cli_eval_after_two_training_steps(tmp_path, monkeypatch, capsys):
    from distill_jax import cli
    from distill_jax.config import load_run_config
    from distill_jax.train.loop import run
    from distill_jax.eval import run_eval
    run_dir = tmp_path / "run"
    heldout = ["eval.sources=[{path: configs/data/math_test.jsonl}]", "eval.max_documents=6"]
    monkeypatch.chdir(REPO)
    no_teacher = load_run_config("configs/tiny.yaml", [f"run_dir={run_dir}", "teacher=null",
                                                       "loss.terms={cross_entropy: 1.0}"])
    with pytest.raises(ValueError, match="no teacher section"):
        run_eval(no_teacher, models=["teacher"])
    # Before training: the student as initialised, with a note.
    init = run_eval(load_run_config("configs/tiny.yaml", [f"run_dir={run_dir}", *heldout]),
                    models=["student"], progress=False)
    assert init["step"] == 0 and init["student_source"] == "initialised"
    assert any("no checkpoint" in n for n in init["notes"])
    assert Path(init["path"]) == run_dir / "eval" / "eval_step0.json"
    run(load_run_config("configs/tiny.yaml", [f"run_dir={run_dir}", "steps=2"]))
    monkeypatch.setattr(cli, "_setup_jax", lambda: None)  # keep the tests' jax settings
    math_file = tmp_path / "math.jsonl"
    math_file.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?",
                                             "response": f"#### {2 * i}"}) + "\n" for i in range(6)))
    rc = cli.main(["eval", "configs/tiny.yaml", f"run_dir={run_dir}", f"eval.math={math_file}",
                   "eval.math_samples=4", "eval.max_new_tokens=8", *heldout])
    out = capsys.readouterr().out
    assert rc == 0
    path = run_dir / "eval" / "eval_step2.json"
    result = json.loads(path.read_text())
    assert f"wrote {path}" in out and "bits/byte" in out and "top-1 agreement" in out
    assert result["step"] == 2 and result["student_source"] == "checkpoint step 2"
    teacher, student = result["models"]["teacher"], result["models"]["student"]
    for m in (teacher, student):
        assert m["math"]["total"] == 4 and len(m["math"]["predictions"]) == 4
        assert [p["reference"] for p in m["math"]["predictions"]] == [0, 2, 4, 6]
        assert 0 < m["heldout"]["bits_per_byte"] < 10 and m["heldout"]["tokens_per_s"] > 0
        assert f"{m['heldout']['bits_per_byte']:9.4f}" in out
    assert teacher["heldout"]["bytes"] == student["heldout"]["bytes"]  # the same text
    assert 0 <= result["agreement"]["top1_agreement"] <= 1 and result["agreement"]["kl_teacher_student"] > 0
    assert not list(path.parent.glob("*.tmp"))
    # The initialised student scored the same documents, and training changed its params.
    assert init["models"]["student"]["heldout"]["tokens"] == student["heldout"]["tokens"]
    assert init["models"]["student"]["heldout"]["bits_per_byte"] != student["heldout"]["bits_per_byte"]


def test_eval_traces_the_models_under_the_runs_mesh(tmp_path, monkeypatch, devices8,
                                                    ambient_meshes):
    """The models' forwards are traced with the run's mesh ambient (``jax.set_mesh``), as in
    training, so ``constrain_batch`` keeps activations sharded by rows."""
    from distill_jax.config import load_run_config
    from distill_jax.eval import run_eval
    monkeypatch.chdir(REPO)
    run_eval(load_run_config("configs/tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "mesh.data=2", "mesh.fsdp=4",
        "eval.sources=[{path: configs/data/math_test.jsonl}]", "eval.max_documents=4"]),
        progress=False, write=False)
    assert ambient_meshes and all(s == {"data": 2, "fsdp": 4, "tensor": 1}
                                  for s in ambient_meshes), ambient_meshes
