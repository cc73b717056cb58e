"""The model's own small frozen config, with family presets and HF config conversion.

One decoder-only transformer covers Llama, Qwen2/Qwen2.5, Qwen3, Gemma2 and Gemma3 (text);
the differences between families are fields of :class:`ModelConfig`. The run config never
reaches the model: it builds a ``ModelConfig`` and hands only that over.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Literal

Family = Literal["llama", "qwen2", "qwen3", "gemma2", "gemma3_text"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


class ConfigError(ValueError):
    """A model config (ours or a Hugging Face config.json) that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling. ``kind``: "linear" or "llama3"."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# The Hugging Face module of each LoRA target (PEFT's ``target_modules``).
LORA_HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                   "down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the projections ``targets`` (PEFT semantics): each target's output
    gains ``(alpha / rank) * dropout(x) @ A @ B``, A (in, rank) random, B (rank, out) zero at
    init, so the adapted model starts equal to its base. ``dropout`` applies to the adapter's
    input only, in training only. The base weights are frozen; only A and B train."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.targets, (list, str)):
            object.__setattr__(self, "targets",
                               (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank}: the adapter rank must be a positive "
                              "integer, e.g. lora.rank=8")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha}: the scale alpha/rank must be positive; "
                              "set lora.alpha > 0 (e.g. twice the rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout}: must lie in [0, 1) (0: none)")
        if not self.targets:
            raise ConfigError(f"lora.targets is empty: name the projections to adapt, some of "
                              f"{list(LORA_TARGETS)}")
        for t in self.targets:
            if t not in LORA_TARGETS:
                close = difflib.get_close_matches(t, LORA_TARGETS, n=1)
                hf = [k for k, v in LORA_HF_MODULES.items() if v.endswith("." + t)]
                hint = f" (did you mean {(hf or close)[0]!r}?)" if hf or close else ""
                raise ConfigError(f"lora.targets: the model has no projection {t!r}{hint}; "
                                  f"choose among {list(LORA_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={list(self.targets)} names a projection twice")
        # canonical order, so equal specs compare (and hash) equal
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on the adapter's output (PEFT's ``scaling``)."""
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer (hashable, so it can be a static jit arg).

    ``layer_types`` has one entry per layer, "full" or "sliding"; sliding layers attend to the
    last ``sliding_window`` positions (the query's own included) and, where ``local_rope_theta``
    is set (Gemma3), use that rotary base instead of ``rope_theta``.
    """

    family: Family = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    local_rope_theta: float | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    gemma_norm: bool = False  # RMSNorm scales by (1 + w) instead of w
    sandwich_norm: bool = False  # Gemma2/3: post-attention and pre/post-feedforward norms
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size)
    activation: Literal["silu", "gelu_tanh"] = "silu"
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Numerics and memory (not architecture): compute dtype, parameter dtype, remat policy.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: RematPolicy = "none"
    init_std: float = 0.02
    # Low-rank adapters on the projections (None: a plain model); see :class:`LoraSpec`.
    lora: LoraSpec | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers={self.num_layers}"
            )
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ConfigError(f"layer_types may hold only 'full' and 'sliding', got {sorted(bad)}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need sliding_window set to a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat not in ("none", "full", "dots", "dots_no_batch"):
            raise ConfigError(f"unknown remat policy {self.remat!r}")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count (input embeddings optional; an untied lm_head always counts)."""
        d, h, k, hd, f, v = (self.hidden_size, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.intermediate_size, self.vocab_size)
        attn = d * h * hd * 2 + d * k * hd * 2
        if self.qkv_bias:
            attn += (h + 2 * k) * hd
        if self.out_bias:
            attn += d
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        norms = d * (4 if self.sandwich_norm else 2) + (2 * hd if self.qk_norm else 0)
        total = self.num_layers * (attn + mlp + norms) + d  # + the final norm
        if include_embeddings:
            total += v * d
        if not self.tie_word_embeddings:
            total += v * d  # the separate lm_head
        return total

    def matmul_params(self) -> int:
        """Parameters used in matmuls per token (input embedding excluded, lm_head included)."""
        d, h, k, hd, f, v = (self.hidden_size, self.num_heads, self.num_kv_heads,
                             self.head_dim, self.intermediate_size, self.vocab_size)
        return self.num_layers * (d * h * hd * 2 + d * k * hd * 2 + 3 * d * f) + v * d

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, family: Family = "llama", **overrides: Any) -> "ModelConfig":
        """A small random-init config of the given family, for tests and CPU debugging."""
        base: dict[str, Any] = dict(
            family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
        )
        base.update(family_defaults(family, num_layers=overrides.get("num_layers", 2)))
        base.update(overrides)
        return cls(**base)


def family_defaults(family: str, *, num_layers: int, sliding_window: int = 8) -> dict[str, Any]:
    """Architecture switches that define a family."""
    if family == "llama":
        return {}
    if family == "qwen2":
        return dict(qkv_bias=True, rope_theta=1e6)
    if family == "qwen3":
        return dict(qk_norm=True, rope_theta=1e6)
    gemma = dict(gemma_norm=True, sandwich_norm=True, embed_scale=True, activation="gelu_tanh",
                 tie_word_embeddings=True, sliding_window=sliding_window)
    if family == "gemma2":
        return dict(gemma, attn_logit_softcap=50.0, final_logit_softcap=30.0,
                    layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(num_layers)))
    if family == "gemma3_text":
        return dict(gemma, qk_norm=True, rope_theta=1e6, local_rope_theta=1e4,
                    layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding"
                                      for i in range(num_layers)))
    raise ConfigError(f"unknown model family {family!r}; expected one of {FAMILIES}")


# ----------------------------------------------------------------------------- HF conversion
# Fields of a Hugging Face config.json that never change a causal LM's forward (checked against
# transformers 5, which does not read them or reads them only outside the forward): names and
# versions, the storage dtype, token ids, generation defaults, training-only settings (init,
# dropout), classification heads, and settings of other runtimes (transformers.js, Nanotron).
# ``pretraining_tp`` belongs here: transformers 5 ignores it, and older versions only split the
# same matmuls into slices. Any value of these is accepted.
_METADATA = frozenset({
    "_name_or_path", "_commit_hash", "_from_model_config", "architectures",
    "transformers_version", "torch_dtype", "dtype", "model_type", "tokenizer_class", "prefix",
    "is_llama_config", "is_qwen2_config", "transformers.js_config",
    "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "cache_implementation", "initializer_range", "attention_dropout",
    "pretraining_tp", "max_window_layers", "attn_implementation", "_attn_implementation_autoset",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "task_specific_params", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "torchscript", "tf_legacy_loss", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "pruned_heads", "unsloth_fixed",
    # generation defaults (transformers moves these to the generation config)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
    "num_return_sequences", "num_beam_groups", "diversity_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "bad_words_ids", "begin_suppress_tokens", "suppress_tokens", "output_scores",
    "return_dict_in_generate", "epsilon_cutoff", "eta_cutoff", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
    "target_lookbehind",
})
# Switches for computation distill-jax does not implement, which published configs carry at
# their no-op value: accepted only at that value (field: (no-op values, what another value means)).
_NO_OP_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "rope_interleaved": ((False,), "interleaved rotary pairs"),
    "use_mrope": ((False,), "multimodal rotary embedding"),
    "use_bidirectional_attention": ((False, None), "bidirectional attention; causal LMs only"),
}


def _check_no_op(key: str, value: Any, allowed: tuple[Any, ...], meaning: str) -> None:
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise ConfigError(f"{key}={value!r} is not supported ({meaning}); distill-jax implements "
                          f"only {key}={allowed[0]!r}")


def _rope_from_hf(params: dict[str, Any] | None, where: str) -> tuple[float, RopeScaling | None]:
    if not params:
        return 10000.0, None
    params = dict(params)
    theta = float(params.pop("rope_theta", 10000.0))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        if params.get("factor") in (None, 1.0):
            params.pop("factor", None)
        if params:
            raise ConfigError(f"{where}: unhandled rope fields {sorted(params)} for rope_type default")
        return theta, None
    if kind == "linear":
        scaling = RopeScaling("linear", float(params.pop("factor")))
    elif kind == "llama3":
        scaling = RopeScaling(
            "llama3", float(params.pop("factor")), float(params.pop("low_freq_factor")),
            float(params.pop("high_freq_factor")),
            int(params.pop("original_max_position_embeddings")))
    else:
        raise ConfigError(
            f"{where}: rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    if params:
        raise ConfigError(f"{where}: unhandled rope fields {sorted(params)} for rope_type {kind}")
    return theta, scaling


def from_hf_config(hf: dict[str, Any] | str, **overrides: Any) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face ``config.json`` (dict or path).

    Metadata that never changes the computation (names, versions, token ids, generation
    defaults, other runtimes' settings) is accepted whatever its value. Raises
    :class:`ConfigError` naming any other field that is not handled, and any value we do not
    implement (e.g. an unknown rope type, ``rope_interleaved: true``).
    """
    if isinstance(hf, str):
        with open(hf) as f:
            hf = json.load(f)
    hf = dict(hf)
    family = hf.get("model_type")
    if family == "gemma3":  # multimodal wrapper: take the text tower
        raise ConfigError("gemma3 (multimodal) configs are not supported; use a gemma3_text "
                          "checkpoint (Gemma3ForCausalLM), e.g. gemma-3-1b")
    if family not in FAMILIES:
        raise ConfigError(f"model_type {family!r} is not supported; supported: {FAMILIES}")
    used: set[str] = set()

    def take(key: str, default: Any = None) -> Any:
        used.add(key)
        return hf.get(key, default)

    num_layers = take("num_hidden_layers")
    num_heads = take("num_attention_heads")
    hidden = take("hidden_size")
    head_dim = take("head_dim") or hidden // num_heads
    kw: dict[str, Any] = dict(
        family=family, vocab_size=take("vocab_size"), hidden_size=hidden,
        intermediate_size=take("intermediate_size"), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=take("num_key_value_heads") or num_heads, head_dim=head_dim,
        rms_norm_eps=float(take("rms_norm_eps", 1e-6)),
        max_position_embeddings=take("max_position_embeddings", 2048),
        tie_word_embeddings=bool(take("tie_word_embeddings", family.startswith("gemma"))),
        bos_token_id=take("bos_token_id"), eos_token_id=take("eos_token_id"),
        pad_token_id=take("pad_token_id"),
    )
    act = take("hidden_act") if "hidden_act" in hf else None
    act = take("hidden_activation") or act or "silu"
    acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if act not in acts:
        raise ConfigError(f"activation {act!r} is not supported (supported: {sorted(acts)})")
    kw["activation"] = acts[act]
    if family.startswith("gemma") and "hidden_act" in hf and hf.get("hidden_activation") is None:
        kw["activation"] = acts.get(hf["hidden_act"], kw["activation"])

    # Rope: transformers 5 writes rope_parameters; older files have rope_theta / rope_scaling.
    rope = take("rope_parameters")
    if rope is not None and "rope_theta" in hf:  # both layouts: accept when they agree
        used.add("rope_theta")
        thetas = [r.get("rope_theta") for r in (rope.values() if "full_attention" in rope else [rope])]
        if hf["rope_theta"] not in thetas:
            raise ConfigError(f"rope_theta={hf['rope_theta']} disagrees with rope_parameters {rope}")
    if rope is None and ("rope_theta" in hf or "rope_scaling" in hf):
        rope = dict(hf.get("rope_scaling") or {})
        rope["rope_theta"] = hf.get("rope_theta", 10000.0)
        local = hf.get("rope_local_base_freq")
        if family == "gemma3_text":
            rope = {"full_attention": rope,
                    "sliding_attention": {"rope_theta": local or 10000.0, "rope_type": "default"}}
        used.update({"rope_theta", "rope_scaling", "rope_local_base_freq"})
    if family == "gemma3_text" and rope and "full_attention" in rope:
        kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(rope["full_attention"], "full_attention")
        local_theta, local_scaling = _rope_from_hf(rope.get("sliding_attention"), "sliding_attention")
        if local_scaling is not None:
            raise ConfigError("rope scaling on sliding-attention layers is not supported")
        kw["local_rope_theta"] = local_theta
    else:
        kw["rope_theta"], kw["rope_scaling"] = _rope_from_hf(rope, "rope_parameters")
        if family == "gemma3_text":
            kw["local_rope_theta"] = 10000.0

    if family == "llama":
        bias = bool(take("attention_bias", False))
        kw.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(take("mlp_bias", False)))
    else:
        if family == "qwen2":
            kw.update(qkv_bias=True)
        elif take("attention_bias", False):
            raise ConfigError(f"attention_bias=true is not supported for {family}")
        _check_no_op("mlp_bias", take("mlp_bias", False), (False, None),
                     f"{family} has no MLP biases")
    if family in ("qwen3", "gemma3_text"):
        kw["qk_norm"] = True
    if family.startswith("gemma"):
        kw.update(gemma_norm=True, sandwich_norm=True, embed_scale=True,
                  query_pre_attn_scalar=take("query_pre_attn_scalar"),
                  attn_logit_softcap=take("attn_logit_softcapping"),
                  final_logit_softcap=take("final_logit_softcapping"))
        size = take("sliding_window_size")  # an old duplicate of sliding_window (gemma-2-9b)
        if size is not None and size != hf.get("sliding_window"):
            raise ConfigError(f"sliding_window_size={size} disagrees with "
                              f"sliding_window={hf.get('sliding_window')}")

    # Sliding windows: transformers 5 lists layer_types; Qwen gates them by use_sliding_window.
    window = take("sliding_window")
    hf_types = take("layer_types")
    if family in ("qwen2", "qwen3"):
        _check_no_op("use_sliding_window", take("use_sliding_window", False), (False, None),
                     "sliding-window layers in Qwen models")
        if set(hf_types or ()) - {"full_attention"}:
            raise ConfigError(f"layer_types other than full_attention are not supported for "
                              f"Qwen models, got {sorted(set(hf_types))}")
        hf_types = None
        window = None
    if hf_types:
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        unknown = set(hf_types) - set(names)
        if unknown:
            raise ConfigError(f"layer_types {sorted(unknown)} not supported")
        kw["layer_types"] = tuple(names[t] for t in hf_types)
    elif family == "gemma2":
        kw["layer_types"] = tuple("sliding" if i % 2 == 0 else "full" for i in range(num_layers))
    elif family == "gemma3_text":
        pattern = take("sliding_window_pattern") or take("_sliding_window_pattern") or 6
        kw["layer_types"] = tuple("full" if (i + 1) % pattern == 0 else "sliding"
                                  for i in range(num_layers))
    if family == "gemma3_text":  # the pattern is read only where layer_types is absent
        used.update({"sliding_window_pattern", "_sliding_window_pattern"})
    if "sliding" in kw.get("layer_types", ()):
        kw["sliding_window"] = window
    for key, (allowed, meaning) in _NO_OP_ONLY.items():
        if key in hf:
            _check_no_op(key, hf[key], allowed, meaning)
            used.add(key)
    unknown = sorted(k for k in hf if k not in used and k not in _METADATA)
    if "quantization_config" in hf:
        raise ConfigError("quantized checkpoints (quantization_config) are not supported; "
                          "dequantize to a float checkpoint first")
    if unknown:
        raise ConfigError(
            f"config.json fields not handled by distill-jax for {family}: {unknown}. "
            "They may change the model's computation; convert the checkpoint or extend "
            "distill_jax.models.config.from_hf_config.")
    kw.update(overrides)
    return ModelConfig(**kw)


def _rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    if scaling is None:
        return {"rope_theta": theta, "rope_type": "default"}
    if scaling.kind == "linear":
        return {"rope_theta": theta, "rope_type": "linear", "factor": scaling.factor}
    return {"rope_theta": theta, "rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


def to_hf_config(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict (transformers 5 layout) of a :class:`ModelConfig`."""
    if cfg.lora is not None:
        raise ConfigError("a model with LoRA adapters has no Hugging Face config of its own: fold "
                          "the adapters in first (distill_jax.models.lora.merge)")
    f = cfg.family
    expected = family_defaults(f, num_layers=cfg.num_layers)
    for key in ("gemma_norm", "sandwich_norm", "embed_scale"):
        if getattr(cfg, key) != expected.get(key, False):
            raise ConfigError(f"{f} checkpoints cannot express {key}={getattr(cfg, key)}")
    if cfg.qk_norm != (f in ("qwen3", "gemma3_text")):
        raise ConfigError(f"{f} checkpoints cannot express qk_norm={cfg.qk_norm}")
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[f]], "model_type": f,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "dtype": dtype,
    }
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation]
    if f == "llama":
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError("llama checkpoints have one attention_bias for q/k/v and o")
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, hidden_act=act)
    else:
        if cfg.out_bias or cfg.mlp_bias or (cfg.qkv_bias != (f == "qwen2")):
            raise ConfigError(f"{f} checkpoints cannot express these bias settings")
    if f in ("qwen2", "qwen3"):
        hf.update(hidden_act=act, use_sliding_window=False, sliding_window=None,
                  layer_types=["full_attention"] * cfg.num_layers)
        if "sliding" in cfg.layer_types:
            raise ConfigError(f"{f} export with sliding-window layers is not supported")
    if f == "qwen3":
        hf["attention_bias"] = False
    if f.startswith("gemma"):
        hf.update(hidden_activation=act, attention_bias=False,
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                  attn_logit_softcapping=cfg.attn_logit_softcap,
                  final_logit_softcapping=cfg.final_logit_softcap,
                  sliding_window=cfg.sliding_window,
                  layer_types=[{"full": "full_attention", "sliding": "sliding_attention"}[t]
                               for t in cfg.layer_types])
    if f == "gemma3_text":
        hf["rope_parameters"] = {
            "full_attention": _rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": _rope_to_hf(cfg.local_rope_theta or 10000.0, None)}
    else:
        if cfg.local_rope_theta is not None:
            raise ConfigError(f"{f} checkpoints cannot express local_rope_theta")
        hf["rope_parameters"] = _rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    return hf


def rope_inv_freq(theta: float, head_dim: int, scaling: RopeScaling | None) -> list[float]:
    """Inverse frequencies (float64 Python floats), with linear or llama3 scaling applied."""
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return [x / scaling.factor for x in inv]
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    out = []
    for x in inv:
        wl = 2 * math.pi / x
        if wl < high_wl:
            out.append(x)
        elif wl > low_wl:
            out.append(x / scaling.factor)
        else:
            smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor)
            out.append((1 - smooth) * x / scaling.factor + smooth * x)
    return out
