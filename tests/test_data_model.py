"""Packed batches from the real pipeline, through the model: every segment's logits equal
those of the same tokens run alone, so no document attends to another."""

from pathlib import Path

import jax
import numpy as np

from distill_jax import data, models as M
from distill_jax.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_rows_do_not_leak_across_documents():
    cfg = data.DataConfig(sources=(data.SourceConfig(str(REPO / "configs/data/math_test.jsonl")),),
                          record="chat", seq_len=1024, batch_size=2, shuffle=True, seed=3)
    batch = next(data.make_iterator(cfg, byte_tokenizer()))
    model = M.init(M.ModelConfig.tiny("gemma2", vocab_size=259, num_layers=2), seed=0)
    fwd = jax.jit(M.forward)
    packed = np.asarray(fwd(model, batch["tokens"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"]))
    checked = 0
    for row in range(2):
        seg = batch["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            alone = np.asarray(fwd(model, batch["tokens"][row, idx][None]))[0]
            assert np.abs(packed[row, idx] - alone).max() <= 1e-5
            checked += 1
    assert checked >= 3, "the rows should hold several documents"
