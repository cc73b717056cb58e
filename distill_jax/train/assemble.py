"""Assembly: a run config in, an assembled run out (:func:`assemble`), for the loop to loop.

Everything a run is built from is decided here, once: the mesh and sharding rules, the
tokenizers (the teacher's, and whether it differs), the student (the one place ``student.init``
is dispatched: :func:`init_student`, :func:`student_config`), the teacher (loaded once, when the
step runs it, the student is made from it, or evaluation needs it beside a cache), the teacher
signal (live or cached, same vocabulary or aligned), the loss spec, the step and evaluation
functions (:func:`distill_jax.train.step.make_step`), the initial state and the data iterator.
:mod:`distill_jax.train.loop` only loops; export and eval rebuild students through the same
functions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from pathlib import Path

from distill_jax import data, models as M, onpolicy, sharding
from distill_jax.checkpoint import params_fingerprint
from distill_jax.config import RunConfig
from distill_jax.models import quant
from distill_jax.losses import terms
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train import build
from distill_jax.models import lora
from distill_jax.train.step import (LOSS, MODEL, SIGNAL_SALT, TrainState, frozen_inputs,
                                    init_loss_params, init_state, make_step, rank_sharding)
from distill_jax.xtok import transfer

# ``student.init`` values that make the student from the teacher (its weights are needed)
FROM_TEACHER = ("teacher_layers", "transfer")


def _tokenizer(tok: Any):
    """A tokenizer object from an object or a ``load_tokenizer`` spec."""
    return load_tokenizer(tok) if isinstance(tok, (str, Path)) else tok


def build_student(src: Any, teacher: M.Model | None, mesh: Mesh,
                  rules: Mapping[str, Any] | None = None, *, student_tokenizer: Any = None,
                  teacher_tokenizer: Any = None) -> M.Model:
    """The student as its ``init`` says: ``hf``, ``scratch``, ``teacher_layers`` or
    ``transfer``.

    ``transfer`` needs ``student_tokenizer`` (the run's tokenizer) and ``teacher_tokenizer``
    (tokenizer objects or ``load_tokenizer`` specs): the student is the teacher's ``layers``
    (all when empty) with the student tokenizer's vocabulary, its embeddings made by FVT.
    """
    if src.init == "hf":
        if not src.hf_path:
            raise ValueError("student.init=hf needs student.hf_path")
        return build.load_model(src, mesh, rules)
    if src.init == "scratch":
        if src.hf_path:
            raise ValueError("student.init=scratch takes preset/overrides, not hf_path "
                             "(use init: hf to load a checkpoint)")
        return build.load_model(src, mesh, rules)
    if teacher is None:
        raise ValueError(f"student.init={src.init} needs a teacher section")
    if src.hf_path:
        raise ValueError(f"student.init={src.init} copies the teacher; remove student.hf_path "
                         "(or use init: hf to load a checkpoint)")
    changes = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat, **src.overrides)
    if src.init == "teacher_layers":
        return build.keep_layers(teacher, src.layers, mesh, rules, **changes)
    if src.init not in FROM_TEACHER:
        raise ValueError(f"unknown student.init {src.init!r}; expected hf, scratch, "
                         "teacher_layers or transfer")
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError("student.init=transfer needs the student's tokenizer (the run's "
                         "`tokenizer`) and the teacher's (`teacher.tokenizer`): pass "
                         "student_tokenizer= and teacher_tokenizer= to build_student")
    student_tokenizer = _tokenizer(student_tokenizer)
    teacher_tokenizer = _tokenizer(teacher_tokenizer)
    vocab = transfer.derived_config(teacher.config, layers=src.layers,
                                    new_tokenizer=student_tokenizer, **changes).vocab_size
    plan = transfer.fvt_plan(teacher_tokenizer, student_tokenizer, new_vocab_size=vocab)
    if jax.process_index() == 0:
        print(f"[student] {plan.report.summary()}", flush=True)
    return transfer.transfer_model(teacher, teacher_tokenizer, student_tokenizer,
                                   layers=src.layers, mesh=mesh, rules=rules, plan=plan, **changes)


def student_config(cfg: RunConfig) -> M.ModelConfig:
    """The student's ModelConfig as :func:`build_student` builds it, without reading weights (a
    ``transfer`` student reads the run's tokenizer for its vocabulary size and special ids)."""
    src = cfg.student
    if src.init not in FROM_TEACHER:
        return build.model_config(src).replace(lora=src.lora)
    new_tokenizer = load_tokenizer(cfg.tokenizer_path()) if src.init == "transfer" else None
    return transfer.derived_config(build.model_config(cfg.teacher), layers=src.layers,
                                   new_tokenizer=new_tokenizer, dtype=src.dtype,
                                   param_dtype=src.param_dtype, remat=src.remat,
                                   **src.overrides).replace(lora=src.lora)


def init_student(cfg: RunConfig, mesh, rules, *, teacher: M.Model | None = None,
                 tokenizer: Any = None, teacher_tokenizer: Any = None) -> M.Model:
    """The run's student as initialised (step 0): :func:`build_student` from the config, the
    teacher loaded here when the init needs it and none is given; the tokenizers default to
    the run's. With ``student.lora`` that student is the frozen base, and fresh adapters are
    added (seeded by ``student.seed``)."""
    if cfg.student.init in FROM_TEACHER and teacher is None:
        if cfg.teacher is None:
            raise ValueError(f"student.init={cfg.student.init} needs a teacher section")
        teacher = build.load_model(cfg.teacher, mesh, rules, quantize=False)
    extra = {}
    if cfg.student.init == "transfer":
        extra = dict(
            student_tokenizer=cfg.tokenizer_path() if tokenizer is None else tokenizer,
            teacher_tokenizer=(cfg.teacher_tokenizer_path() if teacher_tokenizer is None
                               else teacher_tokenizer))
    student = build_student(cfg.student, teacher, mesh, rules, **extra)
    # --- LoRA: the built student is the frozen base; fresh adapters on top
    if cfg.student.lora is not None:
        student = lora.add_adapters(student, cfg.student.lora, cfg.student.seed, mesh=mesh,
                                    rules=rules)
        # an int8 base (the adapters are not matmul weights of the table: they stay fp32)
        student = quant.quantize(student, cfg.student.quantize, mesh=mesh, rules=rules)
    return student


def global_batch(local: dict[str, np.ndarray], batch_sharding: Any,
                  keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded over the data axes (by rows,
    whatever their rank)."""
    out = {}
    for k in keys:
        x = np.asarray(local[k])
        out[k] = jax.make_array_from_process_local_data(rank_sharding(batch_sharding, x.ndim), x)
    return out


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
    """``iterator``'s batches joined with the cache ``reader``'s rows (``iterator`` itself when
    there is no reader)."""
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
        self.signal = run_signal(cfg, cached, tokenizer)
        self.onpolicy = cfg.onpolicy.settings(tokenizer) if cfg.onpolicy is not None else None
        self.keys = terms.batch_keys(self.signal, cfg.loss.terms)
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
                                                 student_vocab_size=student_cfg.vocab_size,
                                                 exact=spec.mined_exact)
            self.xtok_args = args

    @property
    def ranks(self) -> dict[str, int]:
        """The batch keys whose arrays are not (rows, length), with their rank."""
        return dict(self.signal.batch_ranks)

    def data_iterator(self, data_cfg, reader=None):
        """This process's batches of ``data_cfg`` (joined with ``reader``'s rows if given)."""
        iterator = data.make_process_iterator(
            data_cfg, self.tokenizer, process_index=jax.process_index(),
            process_count=jax.process_count(),
            teacher_tokenizer=self.teacher_tokenizer if self.xtok else None)
        return with_cache(iterator, reader, cross_tokenizer=self.xtok)

    def prompt_iterator(self, data_cfg):
        """This process's prompt batches of ``data_cfg`` (on-policy runs)."""
        return onpolicy.make_prompt_iterator(
            data_cfg, self.tokenizer, max_new_tokens=self.onpolicy.max_new_tokens,
            buckets=self.onpolicy.prompt_buckets, process_index=jax.process_index(),
            process_count=jax.process_count())

    def train_step(self, optimizer, schedule):
        """The run's step ``(state, teacher_params, batch) -> (state, metrics)``."""
        return make_step(self.student_cfg, self.teacher_cfg, self.spec, self.signal, optimizer,
                         schedule, grad_accum=self.cfg.optimizer.grad_accum,
                         chunk_size=self.cfg.loss.chunk_size, tail=self.cfg.loss.tail,
                         **self.xtok_args)

    def eval_step(self):
        """``(params, teacher_params, batch) -> (sums, counts)`` with the live teacher (held-out
        data is never cached); :meth:`means` finishes."""
        return make_step(self.student_cfg, self.teacher_cfg, self.spec, self.eval_signal,
                         chunk_size=self.cfg.loss.chunk_size, **self.xtok_args)

    @property
    def eval_signal(self) -> terms.Signal:
        """Held-out data's signal: the run's traces, else its terms' live teacher."""
        if self.signal is terms.TRACES:
            return self.signal
        return terms.signal_for(self.vocabulary, False)

    def means(self, sums, counts):
        """Metrics (means, sums, counts) from sums and counts added over batches."""
        return terms.summarize(self.spec, sums, counts)


def run_signal(cfg: RunConfig, cached: bool, tokenizer=None) -> terms.Signal:
    """The run's teacher signal: the student's own samples when ``cfg.onpolicy`` is set (its
    rollout settings resolved against ``tokenizer``; across tokenizers the samples arrive
    converted, :mod:`distill_jax.onpolicy.xtok_train`), else the built-in signal of its terms'
    vocabulary, live or ``cached``."""
    if cfg.onpolicy is not None:
        if cached:  # config validation refuses this; a guard for hand-built configs
            raise ValueError("onpolicy needs a live teacher; unset teacher.cache")
        if cfg.loss.cross_tokenizer:
            return onpolicy.xtok_onpolicy_signal()
        return onpolicy.onpolicy_signal(
            cfg.onpolicy.settings(tokenizer) if tokenizer is not None
            else onpolicy.OnPolicySettings())
    if cfg.data.record == data.pairs.PAIRS:
        return terms.TRACES
    vocabulary = terms.ALIGNED if cfg.loss.cross_tokenizer else terms.SHARED
    return terms.signal_for(vocabulary, cached)


def _eval_data(cfg: RunConfig):
    """The held-out sources read as the run's data, unshuffled: the same batches every time."""
    return dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle=False,
                               num_epochs=None, workers=0)


def _summed(iterator, batches: int, run_batch):
    """``run_batch(i, batch) -> (sums, counts)`` added up over the first ``batches`` batches of
    ``iterator`` (closed after)."""
    total = None
    try:
        for i in range(batches):
            out = run_batch(i, next(iterator))
            total = out if total is None else jax.tree.map(jax.numpy.add, total, out)
    finally:
        iterator.close()
    return total


def make_evaluator(setup: RunSetup, batch_sharding):
    """``evaluate(params, teacher_params) -> metrics``: the loss terms on the first
    ``eval.batches`` batches of ``eval.sources`` (unshuffled, the same batches every time), and
    with ``eval.onpolicy`` the on-policy metrics of :func:`make_onpolicy_evaluator`."""
    cfg = setup.cfg
    if not cfg.eval.sources:
        raise ValueError("eval.every > 0 needs eval.sources (held-out data files)")
    if setup.cached and setup.teacher_cfg is None:
        raise ValueError("eval.every with a cached teacher needs the teacher model for the "
                         "held-out data (the cache covers the training data only): give the "
                         "teacher its hf_path/preset, or set eval.every=0")
    eval_data = _eval_data(cfg)
    step = jax.jit(setup.eval_step())
    keys = terms.batch_keys(setup.eval_signal, cfg.loss.terms)
    onpolicy_eval = make_onpolicy_evaluator(setup, batch_sharding) if cfg.eval.onpolicy else None

    def evaluate(params, teacher_params) -> dict[str, float]:
        means = setup.means(*_summed(
            setup.data_iterator(eval_data), cfg.eval.batches,
            lambda _, b: step(params, teacher_params, global_batch(b, batch_sharding, keys))))
        out = {f"eval/{k.split('/')[-1]}": float(v) for k, v in means.items()
               if not k.endswith("_sum")}
        if onpolicy_eval is not None:
            out.update(onpolicy_eval(params, teacher_params))
        return out

    return evaluate


ONPOLICY_EVAL_SALT = 0x0E7A1  # the on-policy evaluation's fixed sampling keys: (seed, salt, batch)


def make_onpolicy_evaluator(setup: RunSetup, batch_sharding):
    """``evaluate(params, teacher_params) -> metrics`` on held-out prompts: the student completes
    the prompts of the first ``eval.batches`` prompt batches of ``eval.sources`` (the run's
    prompt buckets and ``max_new_tokens``) and the teacher grades them, through the step's
    evaluation form with the on-policy signal's (``onpolicy.eval_signal``: every row sampled, at
    ``eval.onpolicy_temperature``). Batch ``i`` samples with the key ``(seed, salt, i)``, the
    same at every evaluation, so evaluations of one run compare (and a resumed run evaluates as
    the uninterrupted one). Metrics (``onpolicy.EVAL_PREFIX`` + name): the loss terms and
    ``loss`` on the sampled rows, ``tokens`` they score, and the rollout's ``sampled_rows``,
    ``generated_tokens``, ``mean_completion_length``, ``eos_share`` and ``teacher_logprob``."""
    cfg = setup.cfg
    if setup.onpolicy is None or setup.xtok:  # config validation refuses these
        raise ValueError("eval.onpolicy needs a same-tokenizer run with an onpolicy: section")
    if not cfg.eval.sources:
        raise ValueError("eval.onpolicy needs eval.sources (held-out prompt records)")
    signal = onpolicy.eval_signal(setup.onpolicy, cfg.eval.onpolicy_temperature)
    step = jax.jit(make_step(setup.student_cfg, setup.teacher_cfg, setup.spec, signal,
                             chunk_size=cfg.loss.chunk_size))
    keys = terms.batch_keys(signal, cfg.loss.terms)
    base_key = jax.random.fold_in(jax.random.key(cfg.seed), ONPOLICY_EVAL_SALT)
    eval_data = _eval_data(cfg)

    def evaluate(params, teacher_params) -> dict[str, float]:
        sums, counts = _summed(
            setup.prompt_iterator(eval_data), cfg.eval.batches,
            lambda i, b: step(params, teacher_params, global_batch(b, batch_sharding, keys),
                              jax.random.fold_in(base_key, i)))
        means = {k: v for k, v in setup.means(sums, counts).items()
                 if k.startswith("distill/") and not k.endswith("_sum")}
        means.update(onpolicy.rollout_means(sums))
        return {onpolicy.EVAL_PREFIX + k.split("/")[-1]: float(v) for k, v in means.items()}

    return evaluate


def onpolicy_eval_of(cfg: RunConfig, student: M.Model, teacher: M.Model, tokenizer,
                     batch_sharding) -> dict[str, float]:
    """The ``eval.onpolicy`` metrics (:func:`make_onpolicy_evaluator`) of ``student`` (a LoRA
    student: its base joined with the adapters) graded by ``teacher``, both placed on the
    mesh of ``batch_sharding``; ``tokenizer`` is the run's. What ``distill-jax eval`` reports
    for a run with ``eval.onpolicy``: the numbers training logs at the same step."""
    setup = RunSetup(cfg, cfg.loss.spec(), tokenizer, tokenizer, student.config, teacher.config,
                     False)
    base, trained = ((None, student.params) if student.config.lora is None
                     else lora.split(student.params))
    params = {MODEL: trained, LOSS: init_loss_params(setup.spec, student.config, teacher.config,
                                                     student.params, cfg.seed)}
    evaluate = make_onpolicy_evaluator(setup, batch_sharding)
    return evaluate(params, frozen_inputs(student.config, teacher.params, base))


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


@dataclasses.dataclass
class Run:
    """An assembled run (:func:`assemble`): everything the loop needs, decided once.

    ``teacher`` is the model the step runs (None when the loss needs none or it comes from a
    cache), ``eval_teacher`` the one held-out evaluation runs (the same model, or the teacher
    loaded beside a cache), ``reader`` the cache reader (or None)."""

    cfg: RunConfig
    mesh: Mesh
    rules: Any
    spec: Any
    tokenizer: Any
    teacher_tokenizer: Any
    student: M.Model
    teacher: M.Model | None
    eval_teacher: M.Model | None
    signal: terms.Signal
    reader: Any
    setup: RunSetup

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch arrays the step reads (its signal's and those its terms declare)."""
        return self.setup.keys

    @property
    def teacher_params(self) -> Any:
        """The step's frozen argument: the teacher's params (None without a teacher), and for a
        LoRA student its frozen base beside them (``step.frozen_inputs``)."""
        return self._frozen(self.teacher)

    # --- LoRA: the student's params split into frozen base and trained adapters
    def _frozen(self, teacher: M.Model | None) -> Any:
        base = lora.split(self.student.params)[0] if self.student.config.lora else None
        return frozen_inputs(self.student.config, teacher.params if teacher else None, base)

    @property
    def trained_params(self) -> Any:
        """The student params the optimiser trains: all of them, or a LoRA student's adapters."""
        if self.student.config.lora is None:
            return self.student.params
        return lora.split(self.student.params)[1]

    @property
    def base_fingerprint(self) -> str | None:
        """A LoRA student's frozen base fingerprint (checkpoints record it; None otherwise)."""
        if self.student.config.lora is None:
            return None
        return params_fingerprint(lora.split(self.student.params)[0])

    def initial_state(self, optimizer) -> TrainState:
        """A fresh state: the student's trained params (a LoRA student's adapters only), the
        loss terms' params (projectors), the optimiser state and the run's RNG."""
        loss_params = {}
        if self.teacher is not None:
            loss_params = init_loss_params(self.spec, self.student.config, self.teacher.config,
                                           self.student.params, self.cfg.seed)
        return init_state(self.trained_params, optimizer, self.cfg.seed, loss_params)

    @property
    def batch_ranks(self) -> dict[str, int]:
        """The batch keys whose arrays are not (rows, length), with their rank."""
        return self.setup.ranks

    def tokens_per_step(self, local_batch: Mapping[str, Any]) -> int:
        """Token slots one step trains on (the throughput metrics' numerator): the global
        batch's rows times their length (on-policy: the prompt bucket plus
        ``max_new_tokens``)."""
        if self.cfg.onpolicy is not None and not self.setup.xtok:
            length = np.shape(local_batch["prompt_tokens"])[1] + self.cfg.onpolicy.max_new_tokens
        else:
            length = self.cfg.data.seq_len
        return self.cfg.data.batch_size * int(length)

    def data_iterator(self):
        """The training batches: prompt batches for an on-policy run (across tokenizers, the
        two-phase batches of :meth:`next_batch`), else packed rows (joined with the cache's
        rows when the signal is cached)."""
        if self.cfg.onpolicy is not None and self.setup.xtok:
            return self._xtok_onpolicy_batches()
        if self.cfg.onpolicy is not None:
            return self.setup.prompt_iterator(self.cfg.data)
        return self.setup.data_iterator(self.cfg.data, self.reader)

    # -- on-policy across tokenizers (distill_jax.onpolicy.xtok_train) ------------------------
    def _xtok_onpolicy_batches(self):
        s, data_cfg = self.setup.onpolicy, self.cfg.data
        eos = self.tokenizer.eos_token_id
        return onpolicy.XtokBatches(
            self.setup.prompt_iterator(data_cfg) if s.lmbda > 0 else None,
            self.setup.data_iterator(data_cfg) if s.lmbda < 1 else None,
            lmbda=s.lmbda, mix=s.mix, seed=self.cfg.seed,
            rows=data_cfg.batch_size // jax.process_count(),
            sample=onpolicy.make_sampler(
                self.student.config, s,
                lambda ndim: rank_sharding(sharding.batch_sharding(self.mesh, 2, self.rules),
                                           ndim), SIGNAL_SALT),
            student_tokenizer=self.tokenizer, teacher_tokenizer=self.teacher_tokenizer,
            config=data_cfg, stop_ids=tuple(e for e in s.eos_ids if e != eos),
            process_index=jax.process_index(), process_count=jax.process_count())

    def next_batch(self, iterator, state: TrainState, step: int) -> dict[str, np.ndarray]:
        """This process's batch for step ``step`` (0-based) from ``iterator``
        (:meth:`data_iterator`'s): its next batch, or for an on-policy cross-tokenizer run the
        student's samples under ``state`` converted for the teacher, mixed with the data."""
        if isinstance(iterator, onpolicy.XtokBatches):
            params = state.params[MODEL]
            if self.student.config.lora is not None:  # the adapters, on the frozen base
                params = lora.join(lora.split(self.student.params)[0], params)
            return iterator.next_batch(step, params, state.rng)
        return next(iterator)

    def train_step(self, optimizer, schedule):
        """The unjitted step ``(state, teacher_params, batch) -> (state, metrics)``."""
        return self.setup.train_step(optimizer, schedule)

    def evaluator(self, batch_sharding):
        """``evaluate(params) -> metrics`` on the held-out batches (see :func:`make_evaluator`)."""
        setup = self.setup
        if self.signal.cached and self.eval_teacher is not None:
            setup = RunSetup(self.cfg, self.spec, self.tokenizer, self.teacher_tokenizer,
                             self.student.config, self.eval_teacher.config, False)
        evaluate = make_evaluator(setup, batch_sharding)
        teacher_params = self._frozen(self.eval_teacher)
        return lambda params: evaluate(params, teacher_params)


def assemble(cfg: RunConfig) -> Run:
    """Assemble the run ``cfg`` describes: refusals that need no weights first (terms the
    signal cannot serve, mismatched tokenizers), then the teacher (at most once), the student,
    the cache reader (checked against the run) and the step's setup."""
    mesh, rules = build.make_mesh(cfg.mesh)
    spec = cfg.loss.spec()
    needs_teacher = terms.needs_teacher(cfg.loss.terms)
    cached = bool(cfg.teacher is not None and cfg.teacher.cache and needs_teacher)
    terms.check_signal(cfg.loss.terms, run_signal(cfg, cached))  # before loading anything
    tokenizer = load_tokenizer(cfg.tokenizer_path())
    teacher_tok = teacher_tokenizer(cfg, tokenizer)
    live = needs_teacher and not cached
    eval_beside_cache = cached and cfg.eval.every > 0 and bool(cfg.teacher.hf_path
                                                                or cfg.teacher.preset)
    loaded = None
    if cfg.teacher is not None and (live or cfg.student.init in FROM_TEACHER
                                    or eval_beside_cache):
        # full precision first: a student copied from the teacher starts from its real weights
        loaded = build.load_model(cfg.teacher, mesh, rules, quantize=False)
    student = init_student(cfg, mesh, rules, teacher=loaded, tokenizer=tokenizer,
                           teacher_tokenizer=teacher_tok)
    if loaded is not None and cfg.teacher.quantize != "none":
        loaded = quant.quantize(loaded, cfg.teacher.quantize, mesh=mesh, rules=rules)
    teacher = loaded if live else None  # a cached teacher never runs in the step
    reader = None
    if cached:
        reader = open_cache(cfg, teacher_tok,
                            None if cfg.loss.cross_tokenizer else student.config.vocab_size)
    setup = RunSetup(cfg, spec, tokenizer, teacher_tok, student.config,
                     teacher.config if teacher else None, cached)
    return Run(cfg=cfg, mesh=mesh, rules=rules, spec=spec, tokenizer=tokenizer,
               teacher_tokenizer=teacher_tok, student=student, teacher=teacher,
               eval_teacher=loaded if (live or eval_beside_cache) else None, signal=setup.signal,
               reader=reader, setup=setup)


def build_run_cache(cfg: RunConfig, **options: Any):
    """Build (or resume) the teacher cache of the run ``cfg`` at ``teacher.cache``:
    :func:`distill_jax.cache.build_cache` with the run's teacher, data and cache sections, its
    tokenizer(s) (the teacher's for a cross-tokenizer run) and mesh. ``options``: the builder's
    keyword options (``max_batches``, ``flush_tokens``, ...)."""
    from distill_jax.cache.build import build_cache
    if cfg.teacher is None or not cfg.teacher.cache:
        raise ValueError("set teacher.cache (the cache directory) and a teacher section to build "
                         "a cache")
    cross = cfg.loss.cross_tokenizer
    return build_cache(cfg.teacher.cache, cfg.teacher, cfg.data, cfg.cache,
                       tokenizer=load_tokenizer(cfg.tokenizer_path()),
                       teacher_tokenizer=load_tokenizer(cfg.teacher_tokenizer_path()) if cross
                       else None,
                       mesh=build.make_mesh(cfg.mesh), chunk_tokens=cfg.loss.chunk_size,
                       **options)
