"""Reading records: every format, globs and directories, mixtures, bad records."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest

from distill_jax import configlib
from distill_jax.data import BadRecordError, DataConfig, SourceConfig, read_records

ROWS = [{"text": t, "id": i} for i, t in enumerate(["alpha", "beta gamma", "naïve 😀", "", "delta\nepsilon"])]


def _config(*sources, **kw) -> DataConfig:
    return DataConfig(sources=tuple(sources), seq_len=16, batch_size=2, **kw)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _texts(records):
    return [r.data["text"] for r in records]


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    records = read_records(_config(SourceConfig(str(path))))
    assert _texts(records) == [r["text"] for r in ROWS]
    assert [(r.source, r.index, r.doc_id) for r in records] == [(str(path), i, i) for i in range(len(ROWS))]


def test_jsonl_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n\r\n{"text": "b"}\n\n{"text": "c"}')  # no final newline
    assert _texts(read_records(_config(SourceConfig(str(path))))) == ["a", "b", "c"]


def test_parquet_and_arrow_file_and_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    for name, fmt in [("a.parquet", "auto"), ("f.arrow", "auto"), ("s.arrow", "arrow")]:
        records = read_records(_config(SourceConfig(str(tmp_path / name), format=fmt)))
        assert _texts(records) == [r["text"] for r in ROWS], name
        assert [r.index for r in records] == list(range(len(ROWS)))
        # Worker processes get a pickled copy that reopens the file itself (no table inside).
        payload = pickle.dumps(records)
        assert len(payload) < 4000 and _texts(pickle.loads(payload)) == _texts(records)


def test_saved_to_disk_and_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(tmp_path / "dict"))
    saved = read_records(_config(SourceConfig(str(tmp_path / "saved"))))
    assert _texts(saved) == [r["text"] for r in ROWS]
    assert _texts(pickle.loads(pickle.dumps(saved))) == _texts(saved)
    assert _texts(read_records(_config(SourceConfig(str(tmp_path / "dict"), format="saved", split="test")))) == \
        [r["text"] for r in ROWS[2:]]
    with pytest.raises(ValueError, match="splits"):
        read_records(_config(SourceConfig(str(tmp_path / "dict"), split="validation")))

    _write_jsonl(tmp_path / "x1.jsonl", ROWS[:3])
    _write_jsonl(tmp_path / "x2.jsonl", ROWS[3:])
    source = SourceConfig(str(tmp_path / "x*.jsonl"), format="load_dataset", load_dataset_builder="json")
    assert _texts(read_records(_config(source))) == [r["text"] for r in ROWS]


def test_globs_directories_and_multiple_sources(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    _write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[2:4])
    _write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "d" / "sub" / "c.jsonl", ROWS[4:])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    expected = [r["text"] for r in ROWS]
    assert _texts(read_records(_config(SourceConfig(str(tmp_path / "d"))))) == expected
    assert _texts(read_records(_config(SourceConfig(str(tmp_path / "d" / "**" / "*.jsonl"))))) == expected
    # Weights are shares of the epoch: proportional to the sources' sizes, each record once.
    records = read_records(_config(SourceConfig(str(tmp_path / "d" / "*.jsonl"), weight=4),
                                   SourceConfig(str(tmp_path / "d/sub"), weight=1), shuffle=False))
    assert sorted(_texts(records)) == sorted(expected)
    assert records.num_docs == len(ROWS)
    with pytest.raises(FileNotFoundError, match="matches no data files"):
        read_records(_config(SourceConfig(str(tmp_path / "nothing*.jsonl"))))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(_config(SourceConfig(str(tmp_path / "missing.jsonl"))))


def test_max_records(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert _texts(read_records(_config(SourceConfig(str(path)), max_records=2))) == ["alpha", "beta gamma"]


def test_mixture_weights_are_respected_and_deterministic(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(300)])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(100)])
    cfg = _config(SourceConfig(str(a), weight=1.0), SourceConfig(str(b), weight=3.0), seed=7)
    records = read_records(cfg)
    texts = _texts(records)
    counts = Counter(t[0] for t in texts)
    assert counts == {"a": 100, "b": 300}  # 400 per epoch, shares 1:3
    # Interleaved, not blocked: every quarter of the epoch holds both sources near 1:3.
    for quarter in np.array_split(np.array([t[0] for t in texts]), 4):
        assert 0.15 < np.mean(quarter == "a") < 0.35
    assert texts == _texts(read_records(cfg))  # deterministic
    assert texts != _texts(read_records(_config(*cfg.sources, seed=8)))
    # Upsampled b: each of its records 3 times per epoch; downsampled a: a new third each epoch,
    # all of a after three epochs.
    assert set(Counter(t for t in texts if t[0] == "b").values()) == {3}
    seen = [t for e in range(3) for j in range(len(records)) if (t := records.get(j, e).data["text"])[0] == "a"]
    assert sorted(seen) == sorted(f"a{i}" for i in range(300))
    # doc_ids are global: source offset + index in the source.
    assert {r.doc_id for r in records if r.data["text"][0] == "b"} == set(range(300, 400))


BAD_LINES = [
    b'{"text": "good"}',
    b'{"text": "bad \xff utf8"}',  # not UTF-8
    b'{"text": "unterminated',  # not JSON
    b'{"body": "no text field"}',  # missing field
    b'{"text": 42}',  # wrong type
    b'{"text": "lone \\ud800 surrogate"}',  # not encodable as UTF-8
    b'["a", "list"]',  # not an object
    b'{"text": "also good"}',
]


def test_bad_records_raise_with_file_and_index(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    records = read_records(_config(SourceConfig(str(path))))
    with pytest.raises(BadRecordError) as err:
        list(records)
    assert err.value.source.startswith(str(path)) and err.value.index == 1
    assert str(path) in str(err.value) and "record 1" in str(err.value) and "on_bad_record=skip" in str(err.value)
    reasons = {j: records.get(j) for j in range(len(BAD_LINES))}
    assert [j for j, r in reasons.items() if isinstance(r, BadRecordError)] == [1, 2, 3, 4, 5, 6]
    assert "UTF-8" in reasons[1].reason and "JSON" in reasons[2].reason
    assert "missing field 'text'" in reasons[3].reason and "must be a string" in reasons[4].reason
    assert "surrogate" in reasons[5].reason and "not an object" in reasons[6].reason
    assert "line 4" in reasons[3].source  # line numbers in the address


def test_bad_records_skip_and_count(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    records = read_records(_config(SourceConfig(str(path)), on_bad_record="skip"))
    assert _texts(records) == ["good", "also good"]
    assert records.bad_record_count == 6


def test_bad_parquet_field_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p0", "p1"], "response": [1, 2]}), tmp_path / "x.parquet")
    records = read_records(_config(SourceConfig(str(tmp_path / "x.parquet")), record="prompt_response"))
    with pytest.raises(BadRecordError, match=r"x\.parquet: record 0: field 'response' must be a string"):
        records[0]


def test_config_from_yaml_dict():
    cfg = configlib.from_dict(DataConfig, {
        "sources": [{"path": "a/*.jsonl", "weight": 2}, {"path": "b", "format": "load_dataset",
                                                          "load_dataset_builder": "json"}],
        "record": "chat", "seq_len": 128, "batch_size": 4, "num_epochs": None, "add_bos": None})
    assert cfg.sources[0] == SourceConfig("a/*.jsonl", weight=2.0)
    assert cfg.sources[1].load_dataset_builder == "json" and cfg.teacher_len == 128
    with pytest.raises(configlib.ConfigKeyError, match="did you mean 'seq_len'"):
        configlib.from_dict(DataConfig, {"seq_length": 5})
    with pytest.raises(ValueError, match="load_dataset_builder"):
        DataConfig(sources=(SourceConfig("x", format="load_dataset"),))
