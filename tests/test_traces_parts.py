"""Traces building blocks: the teacher's log-prob scoring against float64 numpy, selection
invariants on random traces, and the output directory's refusals."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from distill_jax.models import forward, init, presets
from distill_jax.traces.run import ModelTeacher
from distill_jax.traces.selection import select
from distill_jax.traces.store import TracesDir, TracesDirError


def test_sample_scores_match_float64_reference():
    """The mean log-probs the sampler reports (read from the decoding logits) are the model's
    temperature-1 log-probs of the sampled completion, by a float64 forward over prompt +
    completion."""
    cfg = presets.preset("tiny-llama", vocab_size=61, num_layers=2, hidden_size=32,
                         intermediate_size=64, num_heads=2, num_kv_heads=1)
    model = init(cfg, 3)
    teacher = ModelTeacher(model, max_new_tokens=8, temperature=0.7, top_k=None, top_p=0.9,
                           eos_ids=(7, 11, 13, 17, 19, 23), pad_id=0, prompt_bucket=8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 61, n).tolist() for n in (3, 7, 1)]
    seqs, finished, got = teacher.sample(prompts, 2, jax.random.key(4))
    assert len(seqs) == len(got) == 6 and any(finished) and not all(finished)
    for r, (c, g) in enumerate(zip(seqs, got)):
        p = prompts[r // 2]
        seq = np.asarray([p + c], np.int32)
        logits = np.asarray(forward(model, seq), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want = np.mean([logp[len(p) - 1 + j, t] for j, t in enumerate(c)])
        assert g == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_sampled_tokens_are_what_generate_gives():
    """Each prompt is prefilled once for its samples: the same draws as generate over the
    prompts repeated."""
    from distill_jax.models.generate import generate
    cfg = presets.preset("tiny-llama", vocab_size=61, num_layers=1, hidden_size=16,
                         intermediate_size=32, num_heads=2, num_kv_heads=1)
    model = init(cfg, 1)
    teacher = ModelTeacher(model, max_new_tokens=6, temperature=0.9, top_k=None, top_p=0.9,
                           eos_ids=(5,), pad_id=0, prompt_bucket=16)
    key = jax.random.key(7)
    prompts = [[1, 2, 3], [4, 5]]
    seqs, finished, _ = teacher.sample(prompts, 3, key)
    ref = generate(model, [p for p in prompts for _ in range(3)], max_new_tokens=6,
                   temperature=0.9, top_p=0.9, eos_ids=(5,), seed=key, prompt_bucket=16)
    assert seqs == ref.sequences and finished == ref.finished.tolist()
    assert len(set(map(tuple, seqs[:3]))) > 1  # the samples of one prompt differ


def test_nucleus_from_candidates_equals_the_full_sort(monkeypatch):
    """Filtered sampling looks for the nucleus among the most likely tokens first (the traces
    run's sampler spends most of a step sorting 49k logits otherwise): the same tokens and
    log-probs as sorting the whole vocabulary, also where the nucleus or top_k reaches past
    the candidates (the full sort then runs)."""
    import jax.numpy as jnp

    import importlib
    gen = importlib.import_module("distill_jax.models.generate")  # the module, not the function
    vocab, reached = 3000, 0
    for seed in range(12):
        x = jax.random.normal(jax.random.key(seed), (8, vocab)) * (0.2 + seed % 4)
        for top_k, top_p in ((vocab, 0.9), (vocab, 0.99), (50, 0.95), (300, 0.9), (vocab, 0.3)):
            args = (jnp.float32(0.8), jnp.int32(top_k), jnp.float32(top_p))
            key = jax.random.key(seed + 100)
            monkeypatch.setattr(gen, "NUCLEUS_CANDIDATES", 256)
            fast = gen._sample_with_logprob(x, key, *args, mode="filtered")
            monkeypatch.setattr(gen, "NUCLEUS_CANDIDATES", vocab)
            full = gen._sample_with_logprob(x, key, *args, mode="filtered")
            np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(full[0]))
            np.testing.assert_allclose(np.asarray(fast[1]), np.asarray(full[1]), rtol=1e-6)
            p = np.asarray(jax.nn.softmax(x / 0.8, axis=-1))
            mass = np.sort(p, axis=-1)[:, ::-1][:, :255].sum(-1)
            reached += bool(top_k > 256 and top_k < vocab or (mass < top_p).any())
    assert reached >= 5  # the fallback ran


def _random_traces(seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for pid in range(rng.randint(1, 6)):
        for s in range(rng.randint(1, 5)):
            answer = rng.choice(["1", "2", "3", None])
            out.append({"prompt_id": pid, "sample": s, "messages": [{"role": "user",
                                                                     "content": f"q{pid}"}],
                        "completion": f"c{pid}.{s}", "answer": answer,
                        "verdict": answer == "1", "length": rng.randint(1, 9)})
    rng.shuffle(out)
    return out


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10 ** 6), cap=st.sampled_from([None, 1, 2]))
def test_selection_invariants(seed, cap):
    rows = _random_traces(seed)
    by_id = {(r["prompt_id"], r["sample"]): r for r in rows}

    def picked(policy):
        return [by_id[(r["prompt_id"], r["sample"])] for r in select(rows, policy,
                                                                     max_per_prompt=cap)]

    correct = picked("correct")
    assert all(r["verdict"] for r in correct)
    if cap is None:
        assert len(correct) == sum(r["verdict"] for r in rows)
    per_prompt = {}
    for r in correct:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    assert all(n <= (cap or 99) for n in per_prompt.values())
    shortest = picked("shortest")
    assert len({r["prompt_id"] for r in shortest}) == len(shortest)
    for r in shortest:
        assert r["verdict"] and r["length"] == min(
            x["length"] for x in rows if x["prompt_id"] == r["prompt_id"] and x["verdict"])
    for r in select(rows, "pairs"):
        assert by_id[(r["prompt_id"], r["sample"])]["verdict"]
        rejected = by_id[(r["prompt_id"], r["rejected_sample"])]
        assert not rejected["verdict"] and r["rejected"] == rejected["completion"]
        assert r["messages"][-1] == {"role": "assistant",
                                     "content": by_id[(r["prompt_id"], r["sample"])]["completion"]}
    for pid in {r["prompt_id"] for r in picked("majority")}:
        answers = {r["answer"] for r in picked("majority") if r["prompt_id"] == pid}
        assert len(answers) == 1 and None not in answers


def test_output_dir_refusals(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TracesDirError, match="non-empty directory without a traces manifest"):
        TracesDir(tmp_path / "busy").open({"samples": 4})
    (tmp_path / "file").write_text("x")
    with pytest.raises(TracesDirError, match="is a file"):
        TracesDir(tmp_path / "file").open({"samples": 4})
    d = TracesDir(tmp_path / "ok")
    d.open({"samples": 4})
    d.open({"samples": 4})  # the same config resumes
    with pytest.raises(TracesDirError, match="samples: 4 -> 8"):
        d.open({"samples": 8})
    d.write_part(0, [{"a": 1}])
    d.write_part(0, [{"a": 2}])  # a committed group is never rewritten
    assert d.read_part(0) == [{"a": 1}] and d.done_groups() == {0}
    assert not d.finalize(2) and d.finalize(1) and d.traces() == [{"a": 1}]
