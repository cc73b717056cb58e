"""A planted teacher across real tokenizers, through the configured run: a byte-level student
learns, from ALM on its own samples alone, the one continuation a SmolLM2-tokenizer teacher
puts its mass on."""

import json
from pathlib import Path

import jax
import numpy as np
import yaml

from distill_jax import models as M, onpolicy
from distill_jax.config import load_run_config
from distill_jax.export import load_student
from distill_jax.onpolicy import xtok as X
from distill_jax.tokenizer import load_tokenizer
from distill_jax.tokens import tokenizer_info
from distill_jax.train.loop import run

# SmolLM2 spells digits and punctuation one per token, so a byte sampler can find the
# continuation token by token: ALM credits a chunk only when both sides close it, and a
# multi-byte teacher token (SmolLM2's "ok") is sampled whole by a random byte-level student
# about once in 10^4 samples. The prompt is two SmolLM2 tokens ("Answer", ":") for 7 bytes.
PROMPT, PLANTED = "Answer:", "42!"
STEPS = 130  # the student samples PLANTED + EOS in >= 80% of fresh samples after this many
ROWS, NEW = 64, 4


def _tiny(vocab: int, hidden: int, seed: int, std: float):
    cfg = M.ModelConfig.tiny("llama", vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                             head_dim=16)
    return cfg, M.numpy_params(cfg, np.random.default_rng(seed), std)


def _planted_teacher(ttok):
    """A bigram teacher over the SmolLM2 tokenizer (its block adds nothing, so the logits read
    the current token's embedding) that continues ':' with PLANTED's SmolLM2 tokens, then its
    EOS, with probability ~1."""
    cfg, p = _tiny(len(ttok), 64, 3, 0.02)
    p["layers"]["attn"]["o"][:] = 0.0
    p["layers"]["mlp"]["down"][:] = 0.0
    emb = np.random.default_rng(4).normal(size=p["embed"].shape).astype(np.float32)
    p["embed"] = emb
    pieces = ttok(PLANTED, add_special_tokens=False)["input_ids"]
    chain = [ttok.convert_tokens_to_ids(":"), *pieces, ttok.eos_token_id]
    head = np.zeros_like(p["lm_head"])
    for a, b in zip(chain[:-1], chain[1:]):
        head[:, b] += 40.0 * emb[a] / np.linalg.norm(emb[a]) / np.sqrt(emb.shape[1])
    p["lm_head"] = head
    return M.Model(cfg, jax.tree.map(jax.numpy.asarray, p)), len(pieces)


def _student(stok):
    """A random byte-level student biased (a constant embedding direction read by its lm_head)
    against special tokens other than EOS and against non-ASCII bytes, so its first samples
    are mostly printable text (a cut UTF-8 tail trains nothing)."""
    cfg, p = _tiny(len(stok), 32, 2, 0.02)
    info = tokenizer_info(stok)
    other = [i for i in range(len(stok)) if i != stok.eos_token_id
             and (i in info.special_ids or not info.token_bytes[i].isascii())]
    p["embed"][:, 0] = 3.0
    p["lm_head"][0, other] = -3.0
    return M.Model(cfg, jax.tree.map(jax.numpy.asarray, p))


def _config(tmp_path: Path, stok, ttok) -> Path:
    teacher, n_pieces = _planted_teacher(ttok)
    assert n_pieces == 3
    M.save_hf(teacher, tmp_path / "teacher")
    M.save_hf(_student(stok), tmp_path / "student")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": PROMPT, "response": "no"}) + "\n"
                            for _ in range(ROWS)))
    cfg = {
        "run_dir": str(tmp_path / "run"), "steps": STEPS, "seed": 0, "tokenizer": "bytes",
        "teacher": {"hf_path": str(tmp_path / "teacher"), "tokenizer": "smollm2"},
        "student": {"init": "hf", "hf_path": str(tmp_path / "student")},
        "data": {"sources": [{"path": str(data)}], "record": "prompt_response",
                 "loss_on_prompt": False, "seq_len": 24, "teacher_seq_len": 16,
                 "batch_size": ROWS},
        "onpolicy": {"lmbda": 1.0, "max_new_tokens": NEW, "prompt_buckets": [16]},
        # ALM at tau = 1 without boundary debias or merging (README: the default tau = 100 does
        # not move a random student within this budget)
        "loss": {"terms": {"alm": 1.0}, "alm_tau": 1.0, "alm_append_space": False,
                 "alm_merge_threshold": None, "chunk_size": 64},
        "optimizer": {"lr": 0.01, "b2": 0.999, "eps": 1.0e-3, "weight_decay": 0.0,
                      "clip_norm": None, "schedule": "constant"},
        "mesh": {"num_devices": 1},
        "checkpoint": {"every": STEPS, "keep": 1},
        "logging": {"every": 1, "progress": False},
    }
    path = tmp_path / "planted.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_student_learns_the_planted_continuation(tmp_path):
    """Trained by ``run`` on its own samples only (lmbda 1; the dataset's answer "no" is never
    used), the byte student samples PLANTED then EOS in >= 80% of 64 fresh samples after STEPS
    steps; the logged teacher log-prob per teacher token of the samples rises from below -5 to
    above -0.5, and the last step's samples end their turn (>= 80%) after about PLANTED's 3
    bytes."""
    stok, ttok = load_tokenizer("bytes"), load_tokenizer("smollm2")
    cfg = load_run_config(_config(tmp_path, stok, ttok))
    run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["onpolicy/sampled_rows"] == ROWS for r in rows)
    first, last = rows[0], rows[-1]
    assert first["onpolicy/teacher_logprob"] < -5.0 < -0.5 < last["onpolicy/teacher_logprob"]
    assert first["onpolicy/eos_share"] < 0.5 <= 0.8 <= last["onpolicy/eos_share"]
    assert abs(last["onpolicy/mean_completion_bytes"] - len(PLANTED)) < 0.5

    student, _ = load_student(tmp_path / "run")
    prompt = onpolicy.prompt_from_record({"prompt": PROMPT, "response": "no"}, stok, cfg.data)
    pb = onpolicy.prompt_batch([prompt] * 64, max_new_tokens=NEW, buckets=(16,))
    r = onpolicy.rollout(student.config, student.params, pb["prompt_tokens"],
                         pb["prompt_lengths"], jax.random.key(9), max_new_tokens=NEW,
                         eos_ids=(stok.eos_token_id,))
    rows_ = onpolicy.pack_rows(pb["prompt_tokens"], pb["prompt_lengths"], r.tokens, r.lengths)
    samples = X.decode_rows({**jax.device_get(rows_), "completion_lengths": np.asarray(r.lengths)},
                            stok)
    share = np.mean([s.completion == PLANTED.encode() and s.eos for s in samples])
    assert share >= 0.8, [s.completion for s in samples]
