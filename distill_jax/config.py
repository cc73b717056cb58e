"""The run config: a tree of typed, frozen sections loaded from YAML.

``load_run_config(path, overrides)`` reads e.g. ``configs/tiny.yaml`` with ``key.sub=value``
overrides; an unknown key is rejected with the closest valid name. Each section is a small
dataclass owned by the module that uses it (the model never sees this config).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from distill_jax import configlib
from distill_jax.checkpoint import CheckpointConfig
from distill_jax.data import DataConfig, SourceConfig
from distill_jax.losses import redi, xtok
from distill_jax.metrics import LoggingConfig
from distill_jax.models.config import LoraSpec, ModelConfig
from distill_jax.onpolicy import signal as onpolicy_signal  # registers sampled_reverse_kl
from distill_jax.tokenizer import BYTES, NAMED

CONFIG_FILE = "config.yaml"  # the resolved config of a run, in its run_dir
# Keys that may change between a run and its resumption (everything else must match): run_dir
# is only where the run lives (it may be moved or given as a relative path).
RESUMABLE = ("run_dir", "steps", "checkpoint", "logging", "eval", "optimizer.skip_nonfinite",
             "optimizer.schedule_steps", "plan")


class ResumeConfigError(ValueError):
    """A run directory holds checkpoints of a run with another config."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``hf_path``: a Hugging Face directory. ``preset``: a named
    architecture (``distill_jax.models.presets``; ``tiny-llama`` etc. for tests) — used alone
    for a from-scratch model, or beside ``hf_path`` to check the checkpoint's architecture.
    ``overrides``: ModelConfig fields changed on top (e.g. ``num_layers: 4``)."""

    hf_path: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    seed: int = 0

    def __post_init__(self):
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        numerics = {"dtype", "param_dtype", "remat"}  # this section's own keys
        for key in self.overrides:
            if key == "lora":
                raise configlib.ConfigKeyError(
                    "overrides.lora: set student.lora (rank, alpha, targets, dropout) instead")
            if key in numerics:
                raise configlib.ConfigKeyError(
                    f"overrides.{key}: set {key} directly in the model's section, not in overrides")
            if key not in fields:
                raise configlib.ConfigKeyError(
                    f"unknown model config field overrides.{key!r}{configlib.suggest(key, fields)}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(ModelSource):
    """The frozen teacher (no optimiser state, never checkpointed). ``cache``: a teacher cache
    directory; ``train`` then reads the teacher's top-k distributions from it instead of
    running the teacher, and ``cache`` (the command) writes it. ``tokenizer``: the teacher's
    tokenizer when it differs from the student's (``bytes``, ``smollm2``, ``qwen``, ``mistral`` or
    a directory; default: the run's ``tokenizer``, or ``hf_path``): the run is then
    cross-tokenizer and uses the cross-tokenizer loss terms (``alm``, ``uld``, ``mined``).
    ``quantize``: ``int8`` stores the teacher's matmul weights as int8 with per-channel scales
    (:mod:`distill_jax.models.quant`; half the memory of bf16) for the live teacher and for
    building its cache; ``none`` (default) keeps ``param_dtype``."""

    cache: str | None = None
    tokenizer: str | None = None
    quantize: Literal["none", "int8"] = "none"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How ``distill-jax cache`` writes the teacher cache: ``k`` top log-probs per token,
    their encoding (``q8``: one byte each, quantised within a KL budget of 5e-4 nats; ``bf16``;
    ``f32`` exact), the temperature they are taken at, and the teacher batch size (rows;
    default ``data.batch_size``)."""

    k: int = 64
    logprob_encoding: Literal["bf16", "q8", "f32"] = "q8"
    temperature: float = 1.0
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class StudentConfig(ModelSource):
    """``init``: ``hf`` (load ``hf_path``), ``scratch`` (random, from ``preset``+``overrides``),
    ``teacher_layers`` (copy the teacher, keeping the layers listed in ``layers``; all when
    empty) or ``transfer`` (the same, with the run's tokenizer in place of the teacher's: new
    embeddings initialised by FVT, the mean of the teacher embeddings of each new token's
    teacher tokenization).

    ``lora``: train low-rank adapters instead of the whole student (PEFT semantics): ``rank``,
    ``alpha`` (the adapters' output is scaled by alpha/rank), ``targets`` (some of ``q``, ``k``,
    ``v``, ``o``, ``gate``, ``up``, ``down``; default all) and ``dropout`` (on the adapters'
    input, in training only). The student ``init`` makes is the frozen base; only the adapters
    train, have optimiser state and are checkpointed (with the base's fingerprint).
    ``quantize: int8`` (with ``lora`` only): the frozen base's matmul weights int8 per output
    channel (:mod:`distill_jax.models.quant`), the adapters fp32."""

    init: Literal["hf", "scratch", "teacher_layers", "transfer"] = "scratch"
    layers: tuple[int, ...] = ()
    quantize: Literal["none", "int8"] = "none"
    lora: Optional[LoraSpec] = None

    def __post_init__(self):
        super().__post_init__()
        if self.quantize != "none" and self.lora is None:
            raise configlib.ConfigKeyError(
                f"student.quantize={self.quantize}: a student trained in full cannot have int8 "
                "weights (they take no gradient); remove student.quantize, or train LoRA "
                "adapters on an int8 base (set student.lora), or quantize the frozen teacher "
                "with teacher.quantize: int8")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weighted terms, their options, and the token chunk size of the fused lm_head + loss.

    Same tokenizer: ``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_kl``,
    ``skew_reverse_kl``, ``cross_entropy``. ``tail`` says how a cached (top-k) teacher's
    remaining mass is treated: one extra ``bucket`` on both sides, or dropped (``renormalize``).

    Cross-tokenizer (any tokenizers; see ``distill_jax.losses.xtok``): ``alm`` (approximate
    likelihood matching of aligned chunks), ``sft`` (the student's own next-token
    cross-entropy), ``alm_latents`` (the student's final hidden states after each aligned chunk
    matched to the teacher's, relative squared error; needs a live teacher), and the baselines
    ``uld``, ``mined`` and ``dskd`` (dual-space KD with cross-model attention; live teacher). ``latents_projector``: train a linear projector from the student's
    hidden width to the teacher's for ``alm_latents`` (null: only when the widths differ).
    ALM's options: ``alm_distance``
    (``binary_ce``, ``abs``, ``reverse_binary_kl``), ``alm_tau`` (binarisation temperature),
    ``alm_append_space`` (boundary debias), ``alm_merge_threshold`` (merge chunks until the
    teacher's word-boundary probability exceeds it; null: no merging). ``uld_top_k`` truncates
    ULD's sorted distributions (null: exact). ``mined_mapping``: ``nearest`` (MinED: every
    student token to the teacher token nearest in edit distance, renormalised) or ``exact``
    (only tokens with the same bytes on both sides, and one bucket for each side's other
    mass). ``temperature`` applies to the baselines.
    ``balance: gradmag`` reweighs the terms every step by their gradient magnitude at the
    student's last-layer output (GradMag), so each moves it in proportion to its weight.
    ``redi_alpha``: the weight of the rejected traces in ``redi`` (in [0, 1); pair records,
    ``data.record: pairs``).
    """

    terms: dict[str, float] = dataclasses.field(default_factory=lambda: {"forward_kl": 1.0})
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_size: int = 512
    tail: Literal["bucket", "renormalize"] = "bucket"  # teacher mass outside a cached top-k
    alm_distance: Literal["binary_ce", "abs", "reverse_binary_kl"] = "binary_ce"
    alm_tau: float = 100.0
    alm_append_space: bool = True
    alm_merge_threshold: Optional[float] = 0.1
    uld_top_k: Optional[int] = None
    mined_mapping: Literal["nearest", "exact"] = "nearest"
    balance: Literal["none", "gradmag"] = "none"
    latents_projector: Optional[bool] = None
    redi_alpha: float = 0.8

    def __post_init__(self):
        if not self.terms or not any(w != 0 for w in self.terms.values()):
            raise ValueError(f"loss.terms={self.terms or {}} has no term with a non-zero weight, so "
                             "nothing would be trained; give at least one, e.g. "
                             "loss.terms={forward_kl: 1.0}")
        redi.check_alpha(self.redi_alpha)
        negative = [f"{k}={w}" for k, w in self.terms.items() if w < 0]
        if negative:
            raise ValueError(f"loss.terms: negative weights ({', '.join(negative)}) would maximise "
                             "a loss; use weights >= 0")

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the terms are the cross-tokenizer ones (``alm``, ``sft``, ``uld``, ``mined``,
        ``alm_latents``, ``dskd``)."""
        from distill_jax.losses import terms
        return terms.vocabulary_of(self.terms) == terms.ALIGNED

    def spec(self):
        """The loss spec: a ``LossSpec`` (same tokenizer) or an ``XtokSpec`` (cross-tokenizer)."""
        if self.cross_tokenizer:
            from distill_jax.losses.xtok import XtokSpec
            return XtokSpec(terms=self.terms, distance=self.alm_distance, tau=self.alm_tau,
                            append_space=self.alm_append_space,
                            merge_threshold=self.alm_merge_threshold,
                            temperature=self.temperature, uld_top_k=self.uld_top_k,
                            mined_exact=self.mined_mapping == "exact",
                            balance=self.balance, latents_projector=self.latents_projector,
                            redi_alpha=self.redi_alpha)
        from distill_jax.losses import LossSpec, terms
        return LossSpec(terms=self.terms, temperature=self.temperature,
                        jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha,
                        chunk_terms=terms.chunk_terms(self.terms), balance=self.balance)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. ``lr`` is the peak learning rate reached after ``warmup_steps``; it then
    decays to ``lr * min_lr_ratio`` at step ``schedule_steps`` (null: the run's ``steps``) and
    stays there (``schedule``: cosine, linear or constant). ``grad_accum`` splits each batch into
    that many micro-batches inside the step. A step whose loss, gradient norm or new params are
    not finite stops the run, or with ``skip_nonfinite`` leaves params and optimiser state as
    they were (``train/nonfinite`` = 1 in its metrics)."""

    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    schedule_steps: int | None = None
    skip_nonfinite: bool = False

    def __post_init__(self):
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"optimizer.schedule_steps must be >= 1 (or null for the run's "
                             f"steps), got {self.schedule_steps}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.grad_accum < 1:
            raise ValueError(f"optimizer.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (``-1``: the rest of the devices), logical-axis rule overrides, and
    optionally how many devices to use."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_devices: int | None = None  # use only the first N devices (single process; debugging)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation. In training: the held-out loss every ``every`` steps (0: never) over
    ``batches`` batches of ``sources``.

    ``distill-jax eval`` (:func:`distill_jax.eval.run_eval`): bits per byte and perplexity of
    each model over the first ``max_documents`` records (all when null) of ``sources``, read as
    ``data`` reads records; documents are scored in windows of ``seq_len`` tokens (default
    ``data.seq_len``), ``batch_size`` rows per forward pass, the lm_head ``chunk_size`` tokens at
    a time; teacher/student top-1 agreement and KL(teacher || student) over the same tokens when
    both share a tokenizer; exact-match accuracy on the first ``math_samples`` problems (all
    when null) of the JSONL file ``math`` (``prompt`` plus ``response`` ending ``#### <answer>``),
    generating up to ``max_new_tokens`` tokens, ``batch_size`` sequences at a time: greedy when
    ``num_samples`` is 1, else ``num_samples`` samples per problem at ``temperature`` and a
    majority vote over their answers.

    ``onpolicy`` (runs with an ``onpolicy:`` section, same tokenizer): each evaluation also lets
    the student complete the prompts of ``batches`` prompt batches of ``sources`` (``chat`` /
    ``prompt_response`` records, the run's ``onpolicy.prompt_buckets`` and
    ``max_new_tokens``) and the teacher grade them, with a fixed sampling key (evaluations at
    different steps, and of a resumed run, sample alike). Logged as ``eval/onpolicy/...``: the
    teacher's mean log-prob per sampled token (``teacher_logprob``), the loss terms and
    ``loss`` on those rows, ``mean_completion_length`` and ``eos_share``. The samples are drawn
    at ``onpolicy_temperature`` (null: ``onpolicy.temperature``; 0: greedy) with the run's
    ``top_p``/``top_k``.
    """

    every: int = 0
    batches: int = 4
    sources: tuple[SourceConfig, ...] = ()
    max_documents: int | None = None
    seq_len: int | None = None
    batch_size: int = 8
    chunk_size: int = 1024
    math: str | None = None
    math_samples: int | None = None
    max_new_tokens: int = 256
    num_samples: int = 1
    temperature: float = 0.7
    onpolicy: bool = False
    onpolicy_temperature: Optional[float] = None

    def __post_init__(self):
        if self.onpolicy_temperature is not None and self.onpolicy_temperature < 0:
            raise ValueError(f"eval.onpolicy_temperature={self.onpolicy_temperature}: must be >= 0 "
                             "(0: greedy), or null for onpolicy.temperature")
        positive = {"batches": self.batches, "batch_size": self.batch_size,
                    "chunk_size": self.chunk_size, "max_new_tokens": self.max_new_tokens,
                    "num_samples": self.num_samples, "max_documents": self.max_documents,
                    "math_samples": self.math_samples}
        bad = [f"eval.{k}={v}" for k, v in positive.items() if v is not None and v < 1]
        if self.every < 0:
            bad.append(f"eval.every={self.every} (0 means never)")
        if self.seq_len is not None and self.seq_len < 2:
            bad.append(f"eval.seq_len={self.seq_len} (at least 2, or null for data.seq_len)")
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be positive")
        if self.num_samples > 1 and not self.temperature > 0:
            raise ValueError(f"eval.num_samples={self.num_samples} samples for a majority vote "
                             f"need eval.temperature > 0 (got {self.temperature}); or set "
                             "eval.num_samples=1 for greedy decoding")


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation (see ``distill_jax.onpolicy``): each step the student completes
    the batch's prompts and the live teacher grades its samples through the loss terms
    (``reverse_kl`` is GKD's on-policy objective, ``sampled_reverse_kl`` the one-sample
    estimate; across tokenizers, ``alm`` (+ ``sft``) on the samples re-tokenized for the
    teacher, ``distill_jax.onpolicy.xtok_train``).

    ``lmbda`` (GKD's name and meaning): the share of rows filled with the student's samples
    instead of the dataset's reference completion (across tokenizers: instead of the
    off-policy pipeline's packed rows); ``mix``: ``batch`` (one draw per step: the whole batch
    is sampled with probability lmbda, as GKD and TRL) or ``row`` (one draw per row). The
    rollout: up to ``max_new_tokens`` tokens at ``temperature`` (0: greedy), with
    ``top_p``/``top_k`` filters (null: none), stopping at ``eos_ids`` (null: the tokenizer's
    EOS and its chat template's end-of-turn token). Prompts are left-padded to the smallest of
    ``prompt_buckets`` that holds them (one compilation per bucket); a training row is
    ``bucket + max_new_tokens`` tokens (across tokenizers: ``data.seq_len`` and
    ``data.teacher_seq_len``, which should hold a prompt and its completion)."""

    lmbda: float = 0.5
    mix: Literal["batch", "row"] = "batch"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    prompt_buckets: tuple[int, ...] = onpolicy_signal.DEFAULT_BUCKETS
    eos_ids: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"onpolicy.lmbda={self.lmbda}: the share of on-policy rows must lie "
                             "in [0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"onpolicy.max_new_tokens={self.max_new_tokens}: must be positive")
        if self.temperature < 0:
            raise ValueError(f"onpolicy.temperature={self.temperature}: must be >= 0 (0: greedy)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"onpolicy.top_p={self.top_p}: must lie in (0, 1], or null for none")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"onpolicy.top_k={self.top_k}: must be positive, or null for none")
        if not self.prompt_buckets or min(self.prompt_buckets) < 1:
            raise ValueError(f"onpolicy.prompt_buckets={list(self.prompt_buckets)}: give positive "
                             "prompt lengths, e.g. [64, 128, 256]")

    def settings(self, tokenizer):
        """The rollout settings (``onpolicy.OnPolicySettings``), ``eos_ids`` resolved against
        the run's ``tokenizer``."""
        return onpolicy_signal.settings_from(
            self.lmbda, self.mix, self.max_new_tokens, self.temperature, self.top_p, self.top_k,
            self.eos_ids, self.prompt_buckets, tokenizer)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """The memory plan ``train`` makes before compiling (:mod:`distill_jax.plan`; the same
    table as ``distill-jax plan CONFIG``): with ``enforce``, a run whose predicted peak exceeds
    the device's memory is refused with the plan's message; ``enforce: false`` trains anyway.
    ``device_kind`` (``v5e``, ``v5p``, ``v4``, ``h100``, ``a100-80``, ``a100-40``, ``cpu``, ...)
    and ``memory_gib`` (per device) override what the devices report (on CPU: host RAM)."""

    enforce: bool = True
    device_kind: Optional[str] = None
    memory_gib: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    run_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    # the student's tokenizer: "bytes", "smollm2", "qwen", "mistral" or a directory;
    # default: the student's (else the teacher's) hf_path
    tokenizer: str | None = None
    teacher: TeacherConfig | None = None
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig | None = None
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    onpolicy: OnPolicyConfig | None = None
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.data is None:
            raise ValueError("the config needs a data section (data.sources, data.seq_len, ...)")
        if self.onpolicy is not None:
            self._check_onpolicy()
        if self.eval.onpolicy:
            self._check_onpolicy_eval()
        self._check_pairs()

    def _check_onpolicy_eval(self) -> None:
        """``eval.onpolicy`` samples as the run's ``onpolicy:`` section says (same tokenizer)."""
        if self.onpolicy is None:
            raise ValueError("eval.onpolicy samples completions with the run's on-policy "
                             "settings; add an onpolicy: section (e.g. onpolicy: {lmbda: 1.0}) "
                             "or set eval.onpolicy=false")
        if self.loss.cross_tokenizer:
            raise ValueError("eval.onpolicy supports same-tokenizer on-policy runs only; set "
                             "eval.onpolicy=false for cross-tokenizer terms")

    def _check_pairs(self) -> None:
        """Pair records and the redi term go together, and need no teacher."""
        pairs, terms = self.data.record == "pairs", set(self.loss.terms)
        if redi.REDI in terms and not pairs:
            raise ValueError(f"loss term redi trains on pairs of verified and rejected traces, "
                             f"but data.record is {self.data.record!r}; set data.record=pairs "
                             "with records from `distill-jax traces select --policy pairs`")
        if pairs and redi.REDI not in terms:
            raise ValueError("data.record=pairs holds REDI's pairs of verified and rejected "
                             "traces; add the redi term, e.g. loss.terms={redi: 1.0, sft: 0.1}")
        other = sorted(terms - {redi.REDI, xtok.SFT})
        if pairs and other:
            raise ValueError(f"data.record=pairs trains the redi and sft terms (no teacher "
                             f"runs), not {', '.join(other)}; drop them from loss.terms")

    def _check_onpolicy(self) -> None:
        """On-policy needs prompts and a live teacher (with the student's tokenizer for
        same-vocabulary terms; any tokenizer for the cross-tokenizer ones)."""
        from distill_jax.losses import terms
        if self.data.record not in ("chat", "prompt_response"):
            raise ValueError(f"onpolicy needs prompts, but data.record is {self.data.record!r}; "
                             "set data.record to chat or prompt_response")
        if self.data.loss_on_prompt:
            raise ValueError("onpolicy trains on completions only; set data.loss_on_prompt=false")
        example = "{alm: 1.0, sft: 0.1}" if self.loss.cross_tokenizer else "{reverse_kl: 1.0}"
        if self.teacher is None or not terms.needs_teacher(self.loss.terms):
            raise ValueError("onpolicy needs a live teacher to grade the student's samples: add "
                             "a teacher section and a distillation term, e.g. "
                             f"loss.terms={example}")
        if self.teacher.cache:
            raise ValueError("onpolicy grades the student's own samples, which no cache holds; "
                             "unset teacher.cache (the teacher runs live)")
        if (not self.loss.cross_tokenizer and self.teacher.tokenizer
                and self.teacher.tokenizer != self.tokenizer_path()):
            raise ValueError("onpolicy with same-vocabulary terms needs the teacher to use the "
                             "student's tokenizer; unset teacher.tokenizer, or use the "
                             "cross-tokenizer terms, e.g. loss.terms={alm: 1.0, sft: 0.1}")

    def tokenizer_path(self) -> str:
        for candidate in (self.tokenizer, self.student.hf_path,
                          self.teacher.hf_path if self.teacher else None):
            if candidate:
                return candidate
        raise ValueError("set `tokenizer` (a directory, or one of 'bytes', 'smollm2', 'qwen', "
                         "'mistral') or give the student or "
                         "teacher an hf_path to take the tokenizer from")

    def teacher_tokenizer_path(self) -> str:
        """The teacher's tokenizer: ``teacher.tokenizer``, else the run's tokenizer."""
        if self.teacher is not None and self.teacher.tokenizer:
            return self.teacher.tokenizer
        return self.tokenizer_path()


# Paths a run reads, as (section, key); ``sources`` entries are lists of {path: ...}.
_INPUT_PATHS = (("data", "sources"), ("eval", "sources"), ("eval", "math"), ("teacher", "hf_path"),
                ("student", "hf_path"), ("teacher", "tokenizer"), (None, "tokenizer"))


def _relative_to(value: Any, directory: Path, key: str) -> Any:
    if not isinstance(value, str) or not value:
        return value
    if key == "tokenizer" and value in (BYTES, *NAMED):
        return value  # a tokenizer name, not a path
    if os.path.isabs(value) or value.startswith("~") or "://" in value:
        return value
    return os.path.normpath(os.path.join(directory, value))


def resolve_input_paths(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """One config file's mapping with its relative input paths (data and eval sources,
    ``eval.math``, checkpoint and tokenizer directories) joined to ``directory``, the file's
    directory. Output paths (``run_dir``, ``teacher.cache``) are left relative to the working
    directory."""
    data = dict(data)
    for section, key in _INPUT_PATHS:
        node = data if section is None else data.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        node = dict(node)
        if key == "sources" and isinstance(node[key], list):
            node[key] = [{**s, "path": _relative_to(s.get("path"), directory, "path")}
                         if isinstance(s, dict) else s for s in node[key]]
        else:
            node[key] = _relative_to(node[key], directory, key)
        if section is None:
            data = node
        else:
            data[section] = node
    return data


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config with ``key.sub=value`` overrides into a :class:`RunConfig`.

    Relative paths a run reads (data, eval data, ``eval.math``, model and tokenizer directories)
    are relative to the file that names them (a ``base`` file's to the base file); paths a run
    writes (``run_dir``, ``teacher.cache``) and every path given as an override are relative to
    the working directory.
    """
    return configlib.load(RunConfig, path, overrides, resolve=resolve_input_paths)


def dump_run_config(cfg: RunConfig) -> str:
    return configlib.dump(cfg)


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def resume_config(run_dir: str | Path, cfg: RunConfig,
                  has_checkpoints: bool) -> tuple[RunConfig, list[str]]:
    """``cfg`` with its learning-rate schedule horizon (``optimizer.schedule_steps``) resolved,
    and notes for the log. A run with checkpoints must be resumed with the config recorded in
    ``run_dir/config.yaml`` (only the ``RESUMABLE`` keys may change; else
    :class:`ResumeConfigError` lists each differing key) and keeps the recorded horizon unless
    ``optimizer.schedule_steps`` states a new one. Without checkpoints any config may start."""
    path = Path(run_dir) / CONFIG_FILE
    horizon = cfg.optimizer.schedule_steps or cfg.steps
    notes: list[str] = []
    if has_checkpoints and path.exists():
        import yaml
        raw = yaml.safe_load(path.read_text()) or {}
        try:  # keys added to the config since the run started take their defaults
            old = configlib.to_dict(configlib.from_dict(RunConfig, raw))
        except ValueError:
            old = raw
        changed = [f"{k}: {a} -> {b}" for k, a, b in configlib.diff(old, configlib.to_dict(cfg))
                   if not _resumable(k)]
        if changed:
            raise ResumeConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)}); resume "
                "with the same config, or choose another run_dir")
        recorded = (old.get("optimizer") or {}).get("schedule_steps") or old.get("steps")
        if cfg.optimizer.schedule_steps is None and recorded is not None:
            horizon = recorded
            if cfg.steps != old.get("steps") and cfg.steps != recorded:
                notes.append(f"the learning-rate schedule keeps its horizon of {recorded} steps; "
                             f"set optimizer.schedule_steps={cfg.steps} to re-plan it")
        elif recorded is not None and horizon != recorded:
            notes.append(f"the learning-rate schedule is re-planned from a horizon of {recorded} "
                         f"to {horizon} steps")
    optimizer = dataclasses.replace(cfg.optimizer, schedule_steps=horizon)
    return dataclasses.replace(cfg, optimizer=optimizer), notes


def write_run_config(run_dir: str | Path, cfg: RunConfig) -> None:
    """Write ``run_dir/config.yaml`` atomically (a temporary file renamed over it)."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_run_config(cfg))
    tmp.replace(path)
