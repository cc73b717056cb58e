"""Checking data before training: ``check_records`` counts and reports, the pre-run scan fails
fast, the pipeline refuses data that yields nothing to train on, and ``distill-jax data check``."""

import json
from pathlib import Path

import pytest

from distill_jax import cli
from distill_jax.data import (BadRecordError, DataConfig, SourceConfig, check_records, make_iterator,
                              scan_records)
from distill_jax.errors import UserError
from distill_jax.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(*paths: Path, **kw) -> DataConfig:
    kw = {"seq_len": 32, "batch_size": 2, "shuffle": False, **kw}
    return DataConfig(sources=tuple(SourceConfig(str(p)) for p in paths), **kw)


def test_check_records_counts_and_reports(tmp_path, tok):
    texts = ["hello world", "", "x" * 100, "abc"]
    path = _write(tmp_path / "d.jsonl", [{"text": t} for t in texts[:2]] + ['{"text": 5}', "not json"]
                  + [{"text": t} for t in texts[2:]])
    report = check_records(_cfg(path), tok)
    # The byte tokenizer: one token per byte, plus EOS (add_eos) -- counted independently here.
    assert report.records == 6 and report.bad_records == 2 and report.documents == 4
    assert report.tokens == sum(len(t.encode()) + 1 for t in texts)
    assert [(e.index, "must be a string" in e.reason or "not valid JSON" in e.reason) for e in report.bad] \
        == [(2, True), (3, True)]
    assert all(str(path) in e.source for e in report.bad)
    assert report.empty_documents == 1 and report.long_documents == 1 and report.max_tokens == 101
    assert not report.ok
    problems = report.problems(_cfg(path))
    assert len(problems) == 1 and "2 of 6 records are bad" in problems[0] and "record 2" in problems[0]
    assert check_records(_cfg(path), tok, limit=2).records == 2


def test_scan_fails_fast_on_a_bad_record(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [{"text": "fine"}] * 3 + [{"txt": "typo"}] + [{"text": "ok"}] * 2000)
    with pytest.raises(BadRecordError, match=r"record 3: missing field 'text'"):
        scan_records(_cfg(path), tok)
    assert scan_records(_cfg(path), tok, limit=3).ok  # bounded: records after the limit are not read
    assert scan_records(_cfg(path, on_bad_record="skip"), tok).bad_records == 1


def test_skip_with_no_valid_record_fails_fast(tmp_path, tok):
    path = _write(tmp_path / "bad.jsonl", ['{"text": 1}', "{", '{"other": "x"}'])
    it = make_iterator(_cfg(path, on_bad_record="skip", num_epochs=3), tok)
    with pytest.raises(UserError, match=r"no valid record in .*bad\.jsonl: 3 of 3 skipped .*first error: "
                                        r".*record 0: field 'text' must be a string"):
        next(it)


def test_empty_documents_fail_instead_of_training_on_nothing(tmp_path, tok):
    path = _write(tmp_path / "empty.jsonl", [{"text": ""}] * 4)
    with pytest.raises(UserError, match="no document in .*empty.jsonl has a token to train on"):
        next(make_iterator(_cfg(path, num_epochs=2), tok))
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "question", "response": ""}] * 3)
    with pytest.raises(UserError, match="has a token to train on"):
        next(make_iterator(_cfg(prompts, record="prompt_response"), tok))


def test_a_few_empty_documents_are_fine(tmp_path, tok):
    path = _write(tmp_path / "mixed.jsonl", [{"text": ""}] * 5 + [{"text": "real text"}] + [{"text": ""}] * 5)
    batches = list(make_iterator(_cfg(path, num_epochs=3), tok))
    assert batches and sum(int(b["loss_mask"].sum()) for b in batches) == 3 * len("real text")


def test_data_check_command(tmp_path, capsys):
    rc = cli.main(["data", "check", str(REPO / "configs" / "tiny.yaml"), "data.max_records=40"])
    out = capsys.readouterr().out
    assert rc == 0 and "40 records (0 bad), 40 documents" in out and out.strip().endswith("ok")
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    rc = cli.main(["data", "check", str(REPO / "configs" / "tiny.yaml"), f"data.sources=[{{path: {bad}}}]"])
    out = capsys.readouterr().out
    assert rc == 1 and "bad record: " in out and "record 1: missing field" in out and "not ok" in out
    rc = cli.main(["data", "check", str(REPO / "configs" / "tiny.yaml"), "--eval"])
    out = capsys.readouterr().out
    assert rc == 0 and "math_test.jsonl" in out
