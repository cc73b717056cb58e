"""Pair records in the data pipeline (``data.record: pairs``): the packer's semantics through
Grain, determinism, exact resume, process shards, bad and too-long records; and REDI trained
from a config through the CLI, stopped and resumed."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from distill_jax import checkpoint
from distill_jax.config import load_run_config
from distill_jax.data import DataConfig, SourceConfig, make_process_iterator
from distill_jax.data.pairs import FIELDS, make_pair_iterator, pack_pairs, tokenize_pair
from distill_jax.errors import UserError
from distill_jax.losses import redi
from distill_jax.tokenizer import byte_tokenizer
from tests.conftest import REPO

TINY = REPO / "configs" / "redi_tiny.yaml"
N = 23


def _record(i: int, long: bool = False) -> dict:
    a, b = i % 7 + 1, i // 7 + 2
    filler = " and so on" * (12 if long else i % 4)
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}{filler}.\n#### {a + b}"}],
            "rejected": f"{a} + {b} = {a + b + 1}.\n#### {a + b + 1}", "prompt_id": i}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """23 pair records, records 5 and 17 longer than a row."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(_record(i, long=i in (5, 17))) + "\n" for i in range(N)))
    return path


def _cfg(path, **kw) -> DataConfig:
    base = dict(sources=(SourceConfig(str(path)),), record="pairs", seq_len=160, batch_size=2,
                num_epochs=1, shuffle=False, seed=0)
    return DataConfig(**{**base, **kw})


def _all(it) -> list[dict]:
    out = list(it)
    it.close()
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pipeline_packs_as_the_pair_packer(pairs_file, tok):
    """Unshuffled, the pipeline's batches are exactly the packer's over the file's pairs in
    order; the weights and masks have REDI's meaning; too-long pairs are skipped and counted."""
    it = make_pair_iterator(_cfg(pairs_file), tok)
    batches = _all(it)
    records = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    pairs = [tokenize_pair(tok, r, doc_id=i) for i, r in enumerate(records)]
    expected, skipped = pack_pairs(pairs, rows=2, seq_len=160)
    assert skipped == 2 and it.skipped_pair_count == 2 and it.stats["data/skipped_pairs"] == 2
    _assert_same(batches, expected)
    assert set(batches[0]) == set(FIELDS)
    ids = np.concatenate([b["doc_ids"].ravel() for b in batches])
    assert sorted(set(ids[ids >= 0])) == [i for i in range(N) if i not in (5, 17)]
    for b in batches:
        w, seg, mask = b[redi.SEQUENCE_WEIGHT], b["segment_ids"], b["loss_mask"]
        assert b["loss_mask"].dtype == np.float32 and w.dtype == np.float32
        for r in range(w.shape[0]):
            for s in range(1, int(seg[r].max()) + 1):
                on = seg[r] == s
                pos, neg = w[r][on & (w[r] > 0)], w[r][on & (w[r] < 0)]
                if s % 2:  # the chosen sequence: +1/|y+| on every completion target, sft's mask
                    assert not neg.size and pos.sum() == pytest.approx(1.0)
                    assert np.allclose(pos, 1.0 / pos.size)
                    assert (mask[r][on] > 0).sum() == pos.size
                else:      # the rejected one: -1/|y-|, no sft
                    assert not pos.size and neg.sum() == pytest.approx(-1.0)
                    assert not mask[r][on].any()
                # whole sequences, positions restarting, targets the next token
                idx = np.flatnonzero(on)
                assert (np.diff(idx) == 1).all() and (b["positions"][r][idx] == np.arange(idx.size)).all()
                assert (b["targets"][r][idx[:-1]] == b["tokens"][r][idx[1:]]).all()
                assert b["targets"][r][idx[-1]] == 0 and b["tokens"][r][idx[-1]] == tok.eos_token_id
        # a pair's two sequences are in the same row
        for r in range(w.shape[0]):
            assert int(seg[r].max()) % 2 == 0


def test_shuffled_is_deterministic_given_the_seed(pairs_file, tok):
    cfg = _cfg(pairs_file, shuffle=True, num_epochs=2, seed=5)
    a, b = _all(make_pair_iterator(cfg, tok)), _all(make_pair_iterator(cfg, tok))
    _assert_same(a, b)
    other = _all(make_pair_iterator(dataclasses.replace(cfg, seed=6), tok))
    assert any(not np.array_equal(x["doc_ids"], y["doc_ids"]) for x, y in zip(a, other))
    # each epoch holds every usable pair once
    ids = np.concatenate([x["doc_ids"][x["segment_ids"] % 2 == 1] for x in a])
    assert sorted(set(np.unique(ids).tolist())) == [i for i in range(N) if i not in (5, 17)]


def test_resume_is_exact_mid_epoch_and_across_epochs(pairs_file, tok):
    cfg = _cfg(pairs_file, shuffle=True, num_epochs=3, seed=1)
    it = make_pair_iterator(cfg, tok)
    states, batches = [], []
    for b in it:
        states.append(it.get_state())
        batches.append(b)
    assert len(batches) > 12
    for k in (1, 5, len(batches) // 2, len(batches) - 2):
        resumed = make_pair_iterator(cfg, tok, state=json.loads(json.dumps(states[k - 1])))
        _assert_same(_all(resumed), batches[k:])
    assert states[-1]["skipped_pairs"] == 6 and states[-1]["batches"] == len(batches)
    with pytest.raises(ValueError, match="same process layout"):
        make_pair_iterator(cfg, tok, process_index=0, process_count=2, state=states[0])
    with pytest.raises(ValueError, match="pair data iterator state"):
        make_pair_iterator(cfg, tok, state={"doc_index": 0, "token_offset": 0})


def test_processes_read_disjoint_shards_and_one_reads_their_global_batch(pairs_file, tok):
    cfg = _cfg(pairs_file, batch_size=4, num_shards=2)
    one = _all(make_process_iterator(cfg, tok))
    halves = [_all(make_process_iterator(cfg, tok, process_index=p, process_count=2))
              for p in range(2)]
    n = min(len(one), len(halves[0]), len(halves[1]))
    for i in range(n):
        for k in FIELDS:
            np.testing.assert_array_equal(one[i][k],
                                          np.concatenate([halves[0][i][k], halves[1][i][k]]))
    ids = [set(np.concatenate([b["doc_ids"].ravel() for b in h]).tolist()) - {-1} for h in halves]
    assert not ids[0] & ids[1]


def test_bad_records_raise_naming_the_line_or_are_skipped_and_counted(tmp_path, tok):
    rows = [_record(i) for i in range(6)]
    rows[2] = {"messages": rows[2]["messages"]}  # no rejected completion
    rows[4] = {"messages": rows[4]["messages"][:1], "rejected": "x"}  # no chosen reply
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"p.jsonl \(line 3\): record 2: missing field .rejected."):
        next(make_pair_iterator(_cfg(path), tok))
    it = make_pair_iterator(_cfg(path, on_bad_record="skip"), tok)
    batches = _all(it)
    assert it.bad_record_count == 2
    ids = set(np.concatenate([b["doc_ids"].ravel() for b in batches]).tolist()) - {-1}
    assert ids == {0, 1, 3, 5}
    # nothing usable: one line naming the fix, not an endless loop
    with pytest.raises(UserError, match=r"6 of 6 records are bad records .* or pairs longer "
                                        r"than data.seq_len=20 \(raise it\)"):
        next(make_pair_iterator(_cfg(path, seq_len=20, num_epochs=None,
                                     on_bad_record="skip"), tok))


def test_parquet_pairs_read_like_jsonl(pairs_file, tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    records = [json.loads(x) for x in pairs_file.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    _assert_same(_all(make_pair_iterator(_cfg(tmp_path / "pairs.parquet"), tok)),
                 _all(make_pair_iterator(_cfg(pairs_file), tok)))


# ----------------------------------------------------------------------------- training


def _run_cfg(run_dir, *over):
    return load_run_config(TINY, [f"run_dir={run_dir}", "logging.progress=false",
                                  "logging.every=1", *over])


def test_config_refusals_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"redi .* data.record is 'chat'; set data.record=pairs"):
        _run_cfg(tmp_path, "data.record=chat")
    with pytest.raises(ValueError, match=r"data.record=pairs .*; add the redi term"):
        _run_cfg(tmp_path, "loss.terms={sft: 1.0}")
    with pytest.raises(ValueError, match=r"not alm; drop them from loss.terms"):
        _run_cfg(tmp_path, "loss.terms={redi: 1.0, alm: 1.0}")
    with pytest.raises(ValueError, match=r"loss.redi_alpha must be in \[0, 1\)"):
        _run_cfg(tmp_path, "loss.redi_alpha=1.5")


def test_redi_tiny_trains_from_the_cli_and_resumes_exactly(tmp_path):
    """``distill-jax train configs/redi_tiny.yaml`` from a pairs file written here: REDI and sft
    train (the loss falls), the redi normaliser counts the batch's pairs, held-out evaluation
    runs on pairs; a run stopped at step 3 and resumed ends with the uninterrupted run's
    metrics and params (the pair stream's position is in the checkpoint)."""
    from distill_jax import cli
    from distill_jax.train.loop import run
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(_record(i)) + "\n" for i in range(16)))
    over = [f"data.sources=[{{path: {path}}}]", f"eval.sources=[{{path: {path}}}]", "steps=6",
            "eval.every=3", "checkpoint.every=100", "data.seq_len=256"]
    whole = tmp_path / "whole"
    assert cli.main(["train", str(TINY), f"run_dir={whole}", "logging.every=1",
                     "logging.progress=false", *over]) == 0
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "distill/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # the normaliser is the number of whole pairs of each step's global batch
    it = make_process_iterator(_run_cfg(whole, *over).data, byte_tokenizer())
    pairs = [float(sum(len(set(row[row % 2 == 1].tolist())) for row in next(it)["segment_ids"]))
             for _ in range(6)]
    assert [r["distill/redi_pairs"] for r in steps] == pairs and min(pairs) >= 8
    assert steps[-1]["distill/loss"] < steps[0]["distill/loss"]
    assert {"eval/redi", "eval/sft"} <= set(steps[2])
    parts = tmp_path / "parts"
    run(_run_cfg(parts, *over), max_steps_this_call=3)
    assert checkpoint.latest_step(parts / "checkpoints") == 3
    run(_run_cfg(parts, *over))

    def metrics(run_dir):
        skip = ("time", "perf/")
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith(skip)}
                for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
                if "distill/loss" in r}

    assert metrics(whole) == metrics(parts)
    a = checkpoint.load_state_dict(whole / "checkpoints")["params"]
    b = checkpoint.load_state_dict(parts / "checkpoints")["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
