"""On-policy distillation across tokenizers: samples -> the off-policy cross-tokenizer batch."""

import dataclasses
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


def _config(tmp_path, record, **kw):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
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
