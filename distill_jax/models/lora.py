"""LoRA adapters on a functional model: add, split from the frozen base, fold, and export.

A LoRA model is a :class:`~distill_jax.models.Model` whose config carries a
:class:`~distill_jax.models.config.LoraSpec`: each targeted projection ``W`` (ours: input dims
first, output dims last) gains two params in the same module, ``{name}_lora_a`` (in..., r) and
``{name}_lora_b`` (r, out...), with their logical axis names (the rank axis is ``lora``), stacked
over layers like every layer param, so sharding rules, the layer scan and ``nnx.merge`` need
nothing new. The adapted projection is ``x @ W + (alpha / r) * dropout(x) @ A @ B``.

Training keeps the base and the adapters apart (:func:`split` / :func:`join`): the adapters are
the only trained params, the base is a frozen input of the step like the teacher.

Interchange follows PEFT: :func:`merge` folds ``W + (alpha / r) * A @ B`` into a plain model
(``save_hf`` writes it), :func:`save_peft` writes an adapter directory (adapter_config.json +
adapter_model.safetensors with PEFT's names; ``lora_A.weight`` is ``A^T`` (r, in) and
``lora_B.weight`` is ``B^T`` (out, r) in the Hugging Face module's flattened layout) that
``peft.PeftModel.from_pretrained`` loads onto the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from distill_jax import fsutil
from distill_jax.models.config import LORA_HF_MODULES, LoraSpec
from distill_jax.models.hf import write_safetensors
from distill_jax.models import quant
from distill_jax.models.model import Model, param_shardings, param_shapes

SUFFIXES = ("_lora_a", "_lora_b")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# where each target's params live in the params tree (under ``layers``)
_MODULE = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
           "down": "mlp"}


def is_adapter(name: str) -> bool:
    """Whether a param name is a LoRA adapter's."""
    return name.endswith(SUFFIXES)


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base, adapters)``: the params tree cut in two nested dicts, the adapters' leaves
    (``*_lora_a``, ``*_lora_b``) in the second, everything else in the first."""
    base: dict[str, Any] = {}
    adapters: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            b, a = split(value)
            if b:
                base[key] = b
            if a:
                adapters[key] = a
        elif is_adapter(key):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def join(base: Mapping[str, Any] | None, adapters: Mapping[str, Any]) -> Any:
    """The whole params tree from :func:`split`'s two parts (``adapters`` alone when ``base``
    is empty or None: a plain model's params pass through unchanged)."""
    if not base:
        return adapters
    out = dict(base)
    for key, value in adapters.items():
        out[key] = join(out.get(key), value) if isinstance(value, Mapping) else value
    return out


def init_adapters(cfg, seed: int = 0) -> dict[str, Any]:
    """Fresh adapters of the LoRA config ``cfg`` (host numpy, float32): A uniform in
    +-1/sqrt(fan_in) (PEFT's default init), B zero, so the adapted model equals its base."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x10A4]))
    _, shapes = split(param_shapes(cfg))

    def value(path, s):
        name = path[-1].key
        if name.endswith("_lora_b"):
            return np.zeros(s.shape, np.float32)
        fan_in = int(np.prod(s.shape[1:-1]))  # (layers, in..., rank)
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, s.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(value, shapes)


def add_adapters(model: Model, spec: LoraSpec, seed: int = 0, *, mesh: Mesh | None = None,
                 rules: Mapping[str, Any] | None = None) -> Model:
    """``model`` (a plain model: its base) with fresh adapters ``spec`` (see
    :func:`init_adapters`), placed by the logical-axis rules on ``mesh`` (else on the base's
    first device)."""
    if model.config.lora is not None:
        raise ValueError("the model already has LoRA adapters")
    cfg = model.config.replace(lora=spec)
    adapters = init_adapters(cfg, seed)
    if mesh is not None:
        shardings = split(param_shardings(cfg, mesh, rules))[1]
        adapters = jax.tree.map(jax.device_put, adapters, shardings)
    else:
        device = jax.tree.leaves(model.params)[0].sharding
        adapters = jax.tree.map(lambda x: jax.device_put(x, device), adapters)
    return Model(cfg, join(model.params, adapters))


def merge(model: Model) -> Model:
    """The plain model equal to the LoRA ``model``: every adapted ``W`` replaced by
    ``W + (alpha / r) * A @ B`` (in float32, then cast to ``W``'s dtype)."""
    spec = model.config.lora
    if spec is None:
        return model
    model = quant.dequantize(model)  # an int8 base: its weights as trained, in param dtype
    base, adapters = split(model.params)
    layers = dict(base["layers"])
    for target in spec.targets:
        group = _MODULE[target]
        a = adapters["layers"][group][f"{target}_lora_a"]
        b = adapters["layers"][group][f"{target}_lora_b"]
        w = layers[group][target]
        layers[group] = dict(layers[group])
        layers[group][target] = _fold(w, a, b, spec.scale)
    return Model(model.config.replace(lora=None), {**base, "layers": layers})


@jax.jit
def _delta(a, b):
    """``A @ B`` per layer, in ``W``'s layout (layers, in..., out...), float32."""
    n, r = a.shape[0], a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(n, -1, r)
    b2 = b.astype(jnp.float32).reshape(n, r, -1)
    out = jnp.einsum("lir,lro->lio", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*a.shape[:-1], *b.shape[2:])


def _fold(w, a, b, scale: float):
    return (w.astype(jnp.float32) + scale * _delta(a, b)).astype(w.dtype)


def num_adapter_params(cfg) -> int:
    """How many trained params the adapters of the LoRA config ``cfg`` hold."""
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(split(param_shapes(cfg))[1]))


def peft_tensors(model: Model, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names (``base_model.model.model.layers.N.<module>.lora_A
    .weight`` (r, in) and ``...lora_B.weight`` (out, r)), as host arrays."""
    spec = model.config.lora
    if spec is None:
        raise ValueError("the model has no LoRA adapters to export")
    _, adapters = split(model.params)
    out: dict[str, np.ndarray] = {}
    for i in range(model.config.num_layers):
        for target in spec.targets:
            group = adapters["layers"][_MODULE[target]]
            a = np.asarray(jax.device_get(group[f"{target}_lora_a"][i]), np.float32)
            b = np.asarray(jax.device_get(group[f"{target}_lora_b"][i]), np.float32)
            r = spec.rank
            name = f"base_model.model.model.layers.{i}.{LORA_HF_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T).astype(dtype)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T).astype(dtype)
    return out


def peft_config(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``spec`` (``target_modules`` by Hugging Face module
    name)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": sorted(LORA_HF_MODULES[t].split(".")[-1] for t in spec.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }


def save_peft(model: Model, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
              dtype: str = "float32", overwrite: bool = False,
              protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write the LoRA ``model``'s adapters as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that ``peft.PeftModel.from_pretrained(base, path)`` loads onto
    the base model. Atomic, with :func:`distill_jax.models.save_hf`'s rules for ``path``."""
    spec = model.config.lora
    if spec is None:
        raise ValueError("the model has no LoRA adapters: export it with save_hf")
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = peft_tensors(model, np_dtype)
    config = peft_config(spec, base_model_name_or_path)

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / PEFT_WEIGHTS, tensors, {"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))

    fsutil.check_output_dir(path, overwrite=overwrite, protect=list(protect))
    return fsutil.write_output_dir(path, fill, overwrite=overwrite, protect=list(protect),
                                   info={"writer": "save_peft", "peft_type": "LORA",
                                         "dtype": np_dtype.name})
