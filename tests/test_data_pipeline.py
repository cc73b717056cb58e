"""The packed pipeline: packing invariants, coverage, long documents, resumption, sharding, workers."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from distill_jax.data import (ALIGNMENT_FIELDS, STUDENT_FIELDS, TEACHER_FIELDS, BadRecordError, DataConfig,
                              SourceConfig, make_dataset, make_iterator, read_records, row_segments,
                              tokenize_record)
from distill_jax.data.testing import english_like_text, tiny_tokenizer

SEQ = 24
NUM_DOCS = 60


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("byte_level")


@pytest.fixture(scope="module")
def teacher_tok():
    return tiny_tokenizer("metaspace", bos=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents of 1-40 words (several longer than a row), in two JSONL files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    docs = [english_like_text(int(rng.integers(1, 40)), seed=i) for i in range(NUM_DOCS)]
    for name, part in (("a.jsonl", docs[:35]), ("b.jsonl", docs[35:])):
        (root / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return root


def _cfg(corpus, **kw) -> DataConfig:
    base = dict(sources=(SourceConfig(str(corpus / "*.jsonl")),), seq_len=SEQ, batch_size=4, num_epochs=1, seed=3)
    return DataConfig(**{**base, **kw})


def _docs(cfg, tok, teacher=None):
    return {r.doc_id: tokenize_record(r, tok, cfg, teacher_tokenizer=teacher) for r in read_records(cfg)}


def _check_rows(batch, docs, prefix="", length=SEQ):
    """Row invariants of one packed batch against the tokenized documents."""
    get = lambda name: batch[prefix + name]  # noqa: E731
    assert get("tokens").shape[1] == length
    for r in range(get("tokens").shape[0]):
        seg, pos = get("segment_ids")[r], get("positions")[r]
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
        assert seg[0] in (0, 1) and set(np.diff(seg[:used])) <= {0, 1}  # 1, 2, 3, ...
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:used]])))
        assert (pos[starts] == 0).all()  # positions restart per segment
        same = np.concatenate([seg[1:used] == seg[:used - 1], [False]]) if used else np.zeros(0, bool)
        assert (np.diff(pos[:used])[same[:-1]] == 1).all() if used > 1 else True
        pad = slice(used, None)
        assert (get("doc_ids")[r, pad] == -1).all() and (get("loss_mask")[r, pad] == 0).all()
        assert (get("tokens")[r, pad] == 0).all() and (get("targets")[r, pad] == 0).all()
        for p in range(used):
            doc_id, off = int(get("doc_ids")[r, p]), int(get("doc_offsets")[r, p])
            toks = docs[doc_id].teacher if prefix else docs[doc_id].student
            assert get("tokens")[r, p] == toks.ids[off]
            assert (get("byte_starts")[r, p], get("byte_ends")[r, p]) == (toks.byte_starts[off], toks.byte_ends[off])
            has_next = off + 1 < len(toks)
            assert get("targets")[r, p] == (toks.ids[off + 1] if has_next else 0)
            assert get("loss_mask")[r, p] == float(has_next and toks.trained[off + 1])
            # Loss never crosses documents: within a segment the target is the next input.
            if same[p]:
                assert get("targets")[r, p] == get("tokens")[r, p + 1]
                assert get("doc_ids")[r, p + 1] == doc_id and get("doc_offsets")[r, p + 1] == off + 1


def _token_multiset(batches, prefix=""):
    return Counter((int(d), int(o)) for b in batches for d, o in
                   zip(b[prefix + "doc_ids"].ravel(), b[prefix + "doc_offsets"].ravel()) if d >= 0)


def _all_tokens(docs, teacher=False):
    return Counter((d, k) for d, doc in docs.items() for k in range(len(doc.teacher if teacher else doc.student)))


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batch_contract_and_packing_invariants(corpus, tok):
    cfg = _cfg(corpus)
    docs = _docs(cfg, tok)
    assert any(len(d.student) > SEQ for d in docs.values()), "corpus should have documents longer than a row"
    batches = list(make_iterator(cfg, tok))
    for b in batches:
        assert set(b) == set(STUDENT_FIELDS)
        assert all(v.shape == (4, SEQ) for v in b.values())
        assert b["loss_mask"].dtype == np.float32 and all(b[k].dtype == np.int32 for k in b if k != "loss_mask")
        _check_rows(b, docs)
    # No token lost or duplicated over an epoch.
    assert _token_multiset(batches) == _all_tokens(docs)
    # Packing is reasonably dense.
    fill = np.mean([(b["segment_ids"] > 0).mean() for b in batches])
    assert fill > 0.9, fill


def test_long_documents_split_or_drop(corpus, tok):
    cfg = _cfg(corpus, long_docs="drop")
    docs = _docs(cfg, tok)
    long_ids = {d for d, doc in docs.items() if len(doc.student) > SEQ}
    it = make_iterator(cfg, tok)
    batches = list(it)
    assert it.dropped_doc_count == len(long_ids) > 0
    assert it.stats["data/dropped_docs"] == len(long_ids)
    kept = {d: doc for d, doc in docs.items() if d not in long_ids}
    assert _token_multiset(batches) == _all_tokens(kept)
    # Split: the long documents' pieces continue in other rows, positions restarting per piece;
    # their heads also fill the room that shorter documents leave.
    batches = list(make_iterator(_cfg(corpus), tok))
    pieces = Counter()
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            for s in row_segments(b, r):
                pieces[s.doc_id] += 1
                assert s.token_end - s.token_start <= SEQ
    assert all(pieces[d] >= -(-len(docs[d].student) // SEQ) for d in long_ids)
    assert any(pieces[d] > -(-len(docs[d].student) // SEQ) for d in long_ids)
    assert _token_multiset(batches) == _all_tokens(docs)


def test_shuffle_is_seeded_and_differs_per_epoch(corpus, tok):
    def order(epoch=0, **kw):
        cfg = _cfg(corpus, num_epochs=2, **kw)
        state = {**iter(make_dataset(cfg, tok)).get_state(), "doc_index": epoch * NUM_DOCS}  # start of `epoch`
        ids = [int(d) for b in make_iterator(cfg, tok, state=state) for d in b["doc_ids"].ravel() if d >= 0]
        return list(dict.fromkeys(ids))  # documents in order of first appearance

    first = order()
    assert sorted(first) == list(range(NUM_DOCS))
    assert first == order()  # deterministic
    assert first != order(seed=4)
    second = order(epoch=1)
    assert sorted(second) == list(range(NUM_DOCS)) and second != first  # reshuffled every epoch
    # Without shuffling, documents are packed in file order: batch by batch, doc ids increase.
    first_batch = {}
    for k, b in enumerate(make_iterator(_cfg(corpus, shuffle=False), tok)):
        for d in b["doc_ids"].ravel():
            first_batch.setdefault(int(d), k)
    first_batch.pop(-1, None)
    assert [first_batch[d] for d in range(NUM_DOCS)] == sorted(first_batch.values())


def test_resume_is_exact_mid_epoch_and_across_epochs(corpus, tok):
    cfg = _cfg(corpus, num_epochs=2, seq_len=16)
    full_it = make_iterator(cfg, tok)
    full, states = [], []
    while True:
        states.append(full_it.get_state())
        try:
            full.append(next(full_it))
        except StopIteration:
            break
    per_epoch = make_dataset(cfg, tok).docs_per_epoch
    assert any(s["token_offset"] > 0 for s in states), "some batch should start mid-document"
    # Every resumed run below replays through the epoch boundary to the end; also resume right at it.
    crossing = [k for k in range(len(full)) if states[k]["doc_index"] < per_epoch <= states[k + 1]["doc_index"]]
    assert len(crossing) == 1
    for k in sorted({1, 2, len(full) // 3, crossing[0], crossing[0] + 1, len(full) - 1, len(full)}):
        state = json.loads(json.dumps(states[k]))  # checkpoints store it as JSON
        resumed = make_iterator(cfg, tok, state=state)
        rest = list(resumed)
        assert _equal(rest, full[k:]), k
        assert resumed.get_state() == states[-1]
    # Restoring an iterator that has already moved on also works.
    it = make_iterator(cfg, tok)
    for _ in range(5):
        next(it)
    it.set_state(states[2])
    assert _equal([next(it) for _ in range(3)], full[2:5])
    with pytest.raises(ValueError, match="process 0 of 1"):
        make_iterator(cfg, tok, process_index=1, process_count=2, state=states[1])


def test_processes_see_disjoint_shards_covering_everything(corpus, tok):
    cfg = _cfg(corpus, batch_size=4)
    docs = _docs(cfg, tok)
    shards = [list(make_iterator(cfg, tok, process_index=p, process_count=2)) for p in range(2)]
    for shard in shards:
        assert all(b["tokens"].shape == (2, SEQ) for b in shard)
        for b in shard:
            _check_rows(b, docs)
    ids = [{d for d, _ in _token_multiset(shard)} for shard in shards]
    assert not ids[0] & ids[1]
    assert _token_multiset(shards[0]) + _token_multiset(shards[1]) == _all_tokens(docs)
    with pytest.raises(ValueError, match="does not divide"):
        make_dataset(_cfg(corpus, batch_size=3), tok, process_index=0, process_count=2)


def test_bad_records_in_the_pipeline(tmp_path, tok):
    lines = [json.dumps({"text": f"good {i}"}).encode() for i in range(10)]
    lines[3] = b'{"text": "broken \xfe"}'
    lines[7] = b'{"txt": "wrong field"}'
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = SourceConfig(str(tmp_path / "d.jsonl"))
    cfg = DataConfig(sources=(source,), seq_len=16, batch_size=2, num_epochs=2, shuffle=False)
    with pytest.raises(BadRecordError) as err:
        list(make_iterator(cfg, tok))
    assert err.value.index == 3 and str(tmp_path / "d.jsonl") in str(err.value)
    it = make_iterator(dataclasses.replace(cfg, on_bad_record="skip"), tok)
    batches = list(it)
    assert it.bad_record_count == 4 and it.get_state()["bad_records"] == 4  # 2 per epoch
    assert {int(d) for b in batches for d in b["doc_ids"].ravel() if d >= 0} == set(range(10)) - {3, 7}


def test_cross_tokenizer_rows_hold_the_same_bytes(corpus, tok, teacher_tok):
    cfg = _cfg(corpus, seq_len=20, teacher_seq_len=28)
    docs = _docs(cfg, tok, teacher_tok)
    assert any(len(d.teacher) > 28 for d in docs.values())
    batches = list(make_iterator(cfg, tok, teacher_tokenizer=teacher_tok))
    for b in batches:
        assert set(b) == set(STUDENT_FIELDS) | set(TEACHER_FIELDS) | set(ALIGNMENT_FIELDS)
        assert b["teacher_tokens"].shape == (4, 28) and b["tokens"].shape == (4, 20)
        _check_rows(b, docs, length=20)
        _check_rows(b, docs, prefix="teacher_", length=28)
        for r in range(4):
            for s in row_segments(b, r):
                t = slice(s.teacher_token_start, s.teacher_token_end)
                assert (b["teacher_doc_ids"][r, t] == s.doc_id).all()
                assert b["teacher_byte_starts"][r, t].min() == s.byte_start
                assert b["teacher_byte_ends"][r, t].max() == s.byte_end
    assert _token_multiset(batches) == _all_tokens(docs)
    assert _token_multiset(batches, "teacher_") == _all_tokens(docs, teacher=True)


def test_chat_records_pack_with_assistant_only_loss(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer {i} 😀"}]} for i in range(12)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(sources=(SourceConfig(str(tmp_path / "c.jsonl")),), record="chat", seq_len=64, batch_size=2,
                     num_epochs=1)
    batches = list(make_iterator(cfg, tok))
    answers = []
    for b in batches:
        for r in range(2):
            for s in row_segments(b, r):
                t = slice(s.token_start, s.token_end)
                trained = b["targets"][r, t][b["loss_mask"][r, t] > 0]
                answers.append(tok.decode(trained))
    assert sorted(answers) == sorted(f"answer {i} 😀<|im_end|><|endoftext|>" for i in range(12))


@pytest.mark.slow  # starts two worker processes (~5 s)
def test_workers_give_the_same_batches(corpus, tok):
    cfg = _cfg(corpus, num_epochs=2)
    reference = list(make_iterator(cfg, tok))
    it = make_iterator(dataclasses.replace(cfg, workers=2), tok)
    try:
        got = [next(it) for _ in range(7)]
        state = it.get_state()
        got += list(it)
    finally:
        it.close()
    assert _equal(got, reference)
    # A state saved with workers resumes without them (and vice versa).
    assert _equal(list(make_iterator(cfg, tok, state=state)), reference[7:])
