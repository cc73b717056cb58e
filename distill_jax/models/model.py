"""The functional model: a frozen config plus a plain params dict, and pure functions of both.

``Model`` is a pytree (params are its leaves, the config is static), so it passes straight
through ``jax.jit``, ``jax.grad`` and ``jax.tree.map``. The NNX module graph is rebuilt from the
config (cached) and merged with the params inside whichever function is being traced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distill_jax import sharding as shd
from distill_jax.models import transformer as tfm
from distill_jax.models.config import ModelConfig

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class Model:
    """A model: ``config`` (static) and ``params`` (nested dict of arrays, the only leaves)."""

    config: ModelConfig
    params: dict[str, Any]

    def replace(self, **changes: Any) -> "Model":
        return dataclasses.replace(self, **changes)

    @property
    def axes(self) -> dict[str, Any]:
        """Logical axis names of every parameter, in the same nested-dict layout as params."""
        return logical_axes(self.config)

    def module(self) -> tfm.Transformer:
        """The NNX module with these params merged in (call inside a traced function)."""
        return nnx.merge(_graphdef(self.config), nnx.State(self.params))


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: tfm.build(cfg)))


def _graphdef(cfg: ModelConfig):
    return _abstract(cfg)[0]


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


@functools.lru_cache(maxsize=64)
def _axes_cached(cfg: ModelConfig):
    state = _abstract(cfg)[1]
    out: dict[str, Any] = {}
    for path, var in state.flat_state():
        axes = tuple(var.get_metadata()["axes"])
        if path[0] == "layers":
            axes = ("layers",) + axes
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes
    return out


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Nested dict of logical axis-name tuples, one per parameter."""
    return jax.tree.map(lambda a: a, _axes_cached(cfg), is_leaf=_is_axes)


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Nested dict of ``jax.ShapeDtypeStruct``, one per parameter (nothing allocated)."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def numpy_params(cfg: ModelConfig, rng: "np.random.Generator", std: float) -> dict[str, Any]:
    """Host params for tests and small experiments, without compiling :func:`init`: norm scales
    1 and every other weight normal(0, ``std``) drawn from ``rng`` in :func:`param_shapes`'
    order, as numpy arrays of the params' dtypes."""
    def value(path, shape):
        if path[-1].key == "scale":
            return np.ones(shape.shape, shape.dtype)
        return rng.normal(0.0, std, shape.shape).astype(shape.dtype)
    return jax.tree_util.tree_map_with_path(value, param_shapes(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None):
    """NamedSharding of every parameter on ``mesh`` under the logical-axis ``rules``."""
    return shd.tree_shardings(mesh, logical_axes(cfg), param_shapes(cfg), rules)


def init(cfg: ModelConfig, seed: int = 0, *, mesh: Mesh | None = None,
         rules: Mapping[str, Any] | None = None) -> Model:
    """Random-init params, created directly sharded on ``mesh`` (never materialised whole)."""
    def make():
        return nnx.to_pure_dict(nnx.split(tfm.build(cfg, seed))[1])

    if mesh is None:
        return Model(cfg, jax.jit(make)())
    return Model(cfg, jax.jit(make, out_shardings=param_shardings(cfg, mesh, rules))())


def _defaults(tokens: Array, positions: Array | None, segment_ids: Array | None):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = tfm.positions_from_segments(jnp.asarray(segment_ids))
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)


def hidden_states(model: Model, tokens: Array, *, positions: Array | None = None,
                  segment_ids: Array | None = None, lora_keys: Array | None = None) -> Array:
    """Final hidden states (B, T, D) after the final norm, in the compute dtype.

    ``segment_ids`` (B, T) mark packed documents (tokens attend only within their segment;
    0 is conventionally padding). ``positions`` default to restarting at each segment start.
    ``lora_keys`` (B, 2) key data turn on a LoRA model's adapter dropout (training).
    """
    tokens, positions, segment_ids = _defaults(tokens, positions, segment_ids)
    h, _ = model.module()(tokens, positions, segment_ids, lora_keys=lora_keys)
    return h


def lm_head(model: Model) -> Array:
    """The (D, V) output projection (the transposed input embedding when tied)."""
    p = model.params
    return p["embed"].T if model.config.tie_word_embeddings else p["lm_head"]


def logits_from_hidden(model: Model, h: Array) -> Array:
    """fp32 logits (B, T, V) from hidden states (B, T, D), with final softcapping."""
    return tfm.logits_from_hidden(model.config, h, lm_head(model))


def forward(model: Model, tokens: Array, *, positions: Array | None = None,
            segment_ids: Array | None = None) -> Array:
    """Logits (B, T, V) in fp32. Pure: jit it, grad it, or call it inside your own step."""
    h = hidden_states(model, tokens, positions=positions, segment_ids=segment_ids)
    return logits_from_hidden(model, h)


def cast_params(model: Model, dtype: Any) -> Model:
    """The same model with every parameter cast to ``dtype`` (e.g. for bf16 inference)."""
    return model.replace(params=jax.tree.map(lambda x: x.astype(dtype), model.params),
                         config=model.config.replace(param_dtype=jnp.dtype(dtype).name))
