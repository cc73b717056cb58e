"""What a run needs around its step: tokenizers, the teacher signal (live or cached), the data
iterator, and the held-out evaluator, built from the run config for :mod:`distill_jax.train.loop`.

``RunSetup`` decides, once, whether the run is cross-tokenizer (its loss terms are ``alm``,
``sft``, ``uld`` or ``mined``) and whether the teacher comes from a cache, and builds the matching
step, batches and evaluator, so the loop itself stays free of those choices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from distill_jax import data
from distill_jax.config import RunConfig
from distill_jax.losses import terms
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train.step import make_step


def global_batch(local: dict[str, np.ndarray], batch_sharding: Any,
                  keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]))
            for k in keys}


def open_cache(cfg: RunConfig, tokenizer, vocab_size: int | None):
    """The run's teacher cache reader, checked against the teacher (its identity, when the
    config names a preset or a checkpoint present here), the teacher's tokenizer, the run's data and loss
    (``tokenizer`` is the teacher's: the student's unless the run is cross-tokenizer)."""
    from distill_jax.cache import CacheReader
    from distill_jax.cache.build import dataset_fingerprint, teacher_identity
    from distill_jax.tokenizer import tokenizer_fingerprint
    from distill_jax.train.build import model_config
    teacher = None  # unchecked when the config names no teacher, or a checkpoint not on this machine
    if cfg.teacher.preset if not cfg.teacher.hf_path else os.path.exists(
            os.path.join(cfg.teacher.hf_path, "config.json")):
        teacher = teacher_identity(cfg.teacher, model_config(cfg.teacher))
    reader = CacheReader(cfg.teacher.cache)
    reader.check(expected_teacher=teacher,
                 expected_tokenizer_hash=tokenizer_fingerprint(tokenizer),
                 expected_dataset_fingerprint=dataset_fingerprint(cfg.data),
                 vocab_size=vocab_size,
                 # ALM reads log-probs at temperature 1; the divergences at loss.temperature
                 temperature=1.0 if cfg.loss.cross_tokenizer else cfg.loss.temperature)
    return reader


def with_cache(iterator, reader, *, cross_tokenizer: bool = False):
    if reader is None:
        return iterator
    from distill_jax.cache.join import CachedBatches
    return CachedBatches(iterator, reader, cross_tokenizer=cross_tokenizer)


class RunSetup:
    """What the step, the evaluator and the data need to know about the run's teacher signal
    and tokenizers (built once per run)."""

    def __init__(self, cfg: RunConfig, spec, tokenizer, teacher_tokenizer, student_cfg,
                 teacher_cfg, cached: bool):
        self.cfg, self.spec, self.cached = cfg, spec, cached
        self.tokenizer, self.teacher_tokenizer = tokenizer, teacher_tokenizer
        self.student_cfg, self.teacher_cfg = student_cfg, teacher_cfg
        self.xtok = cfg.loss.cross_tokenizer
        self.vocabulary = terms.ALIGNED if self.xtok else terms.SHARED
        self.signal = terms.signal_for(self.vocabulary, cached)
        self.keys = self.signal.batch_keys
        self.xtok_args: dict[str, Any] = {}
        if self.xtok:
            from distill_jax.tokens import word_start_mask
            args = {"student_word_start": word_start_mask(tokenizer, student_cfg.vocab_size)}
            if teacher_cfg is not None:
                args["teacher_word_start"] = word_start_mask(teacher_tokenizer,
                                                             teacher_cfg.vocab_size)
            if terms.VOCAB_MAP in terms.needs(spec.weights):
                from distill_jax.losses.xtok_baselines import mined_mapping
                args["mined_map"] = mined_mapping(tokenizer, teacher_tokenizer,
                                                 student_vocab_size=student_cfg.vocab_size)
            self.xtok_args = args

    def data_iterator(self, data_cfg, reader=None):
        iterator = data.make_process_iterator(
            data_cfg, self.tokenizer, process_index=jax.process_index(),
            process_count=jax.process_count(),
            teacher_tokenizer=self.teacher_tokenizer if self.xtok else None)
        return with_cache(iterator, reader, cross_tokenizer=self.xtok)

    def train_step(self, optimizer, schedule):
        """The run's step ``(state, teacher_params, batch) -> (state, metrics)``."""
        return make_step(self.student_cfg, self.teacher_cfg, self.spec, self.signal, optimizer,
                         schedule, grad_accum=self.cfg.optimizer.grad_accum,
                         chunk_size=self.cfg.loss.chunk_size, tail=self.cfg.loss.tail,
                         **self.xtok_args)

    def eval_step(self):
        """``(params, teacher_params, batch) -> (sums, counts)`` with the live teacher (held-out
        data is never cached); :meth:`means` finishes."""
        return make_step(self.student_cfg, self.teacher_cfg, self.spec,
                         terms.signal_for(self.vocabulary, False),
                         chunk_size=self.cfg.loss.chunk_size, **self.xtok_args)

    def means(self, sums, counts):
        """Metrics (means, sums, counts) from sums and counts added over batches."""
        return terms.summarize(self.spec, sums, counts)


def make_evaluator(setup: RunSetup, batch_sharding):
    """``evaluate(params, teacher_params) -> metrics``: the loss terms on the first
    ``eval.batches`` batches of ``eval.sources`` (unshuffled, the same batches every time)."""
    cfg = setup.cfg
    if not cfg.eval.sources:
        raise ValueError("eval.every > 0 needs eval.sources (held-out data files)")
    if setup.cached and setup.teacher_cfg is None:
        raise ValueError("eval.every with a cached teacher needs the teacher model for the "
                         "held-out data (the cache covers the training data only): give the "
                         "teacher its hf_path/preset, or set eval.every=0")
    eval_data = dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle=False,
                                    num_epochs=None, workers=0)
    step = jax.jit(setup.eval_step())
    keys = terms.signal_for(setup.vocabulary, False).batch_keys

    def evaluate(params, teacher_params) -> dict[str, float]:
        iterator = setup.data_iterator(eval_data)
        total = None
        for _ in range(cfg.eval.batches):
            out = step(params, teacher_params, global_batch(next(iterator), batch_sharding, keys))
            total = out if total is None else jax.tree.map(jax.numpy.add, total, out)
        iterator.close()
        means = setup.means(*total)
        return {f"eval/{k.split('/')[-1]}": float(v) for k, v in means.items()
                if not k.endswith("_sum")}

    return evaluate


def teacher_tokenizer(cfg: RunConfig, tokenizer):
    """The teacher's tokenizer; refuses same-vocabulary terms when it is not the student's."""
    if cfg.teacher is None:
        return tokenizer
    path = cfg.teacher_tokenizer_path()
    if path == cfg.tokenizer_path():
        return tokenizer
    teacher_tokenizer = load_tokenizer(path)
    if not cfg.loss.cross_tokenizer and terms.needs_teacher(cfg.loss.terms):
        from distill_jax.tokenizer import tokenizer_fingerprint
        if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"the teacher's tokenizer ({path}) differs from the student's "
                f"({cfg.tokenizer_path()}), so same-vocabulary terms ({sorted(cfg.loss.terms)}) "
                "cannot compare their distributions: use the cross-tokenizer terms, e.g. "
                "loss.terms={alm: 1.0, sft: 0.1}")
    return teacher_tokenizer
