"""Teacher cache: per-document teacher outputs on disk (tensorstore zarr v3, sharded, zstd).

    from distill_jax.cache import CacheSpec, Manifest, CacheWriter, CacheReader, verify
    spec = CacheSpec(k=64, vocab_size=151_936)              # logprob_encoding="q8" | "bf16" | "f32"
    m = Manifest(spec, teacher={"name": ..., "config_hash": ..., "weights_hash": ...},
                 tokenizer_hash=tokenizer_fingerprint(tok), dataset_fingerprint=fp)
    with CacheWriter(path, m, num_docs=n, process_index=i, process_count=c) as w:
        for d in w.pending_doc_ids():
            w.write_document(d, {"topk_ids": ..., "topk_logprobs": ..., "actual_logprob": ...,
                                 "tail_logmass": ..., "boundary_logmass": ...})
        w.finalize()
    r = CacheReader(path); r.check(expected_tokenizer_hash=..., expected_dataset_fingerprint=..., k=64)
    rows = r.read_tokens(batch["doc_ids"], batch["doc_offsets"])   # top-k in ascending id order

Building one from a run config (``distill-jax cache CONFIG``): :mod:`distill_jax.cache.build`
(``build_cache``, ``dataset_fingerprint``, ``word_start_mask``); it cuts every document into
fixed windows of the run's ``seq_len`` (``Manifest.window``), so the cache does not depend on
packing, batch size or process count (up to float rounding; a resumed build is bitwise the same).

Format, encodings and the exactly-once argument: :mod:`distill_jax.cache.store`.
"""

from distill_jax.cache.store import (
    CacheDamagedError,
    CacheError,
    CacheMismatchError,
    CacheReader,
    CacheSpec,
    CacheWriter,
    Manifest,
    VerifyReport,
    decode_rows,
    encode_rows,
    read_manifest,
    verify,
)
from distill_jax.cache.build import BuildResult, build_cache, dataset_fingerprint, word_start_mask

__all__ = [
    "BuildResult",
    "CacheDamagedError",
    "CacheError",
    "CacheMismatchError",
    "CacheReader",
    "CacheSpec",
    "CacheWriter",
    "Manifest",
    "VerifyReport",
    "build_cache",
    "dataset_fingerprint",
    "decode_rows",
    "encode_rows",
    "read_manifest",
    "verify",
    "word_start_mask",
]
