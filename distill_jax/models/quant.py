"""Int8 weight-only quantisation of a frozen model (a teacher), per output channel.

Every matmul weight (attention ``q k v o``, MLP ``gate up down``, the embedding and an untied
``lm_head``) is stored as int8 values ``q`` with one fp32 scale per output channel:
``w ~= q * scale``, ``scale = max|w| / 127`` over the weight's input (contracted) axes, and
``q = round(w / scale)`` clipped to [-127, 127]. A channel that is all zeros gets scale 1 and
zeros (never a division by zero). Norm scales and biases stay in their dtype (they are tiny).

The output channels, per weight (axes as in :mod:`distill_jax.models.transformer`):

- ``q``, ``k``, ``v`` ``(layers, embed, heads, head_dim)``: a scale per (layer, head, head_dim);
- ``o`` ``(layers, heads, head_dim, embed)``: per (layer, embed);
- ``gate``, ``up`` ``(layers, embed, mlp)``: per (layer, mlp); ``down`` ``(layers, mlp, embed)``:
  per (layer, embed);
- ``embed`` ``(vocab, embed)``: per vocabulary row, which is both the lookup's row and, tied, the
  output head's channel; ``lm_head`` ``(embed, vocab)``: per vocabulary column.

A quantised weight is a :class:`QArray` leaf pair in the params pytree (``q`` int8 and
``scale`` fp32, each with its own sharding: the scale is sharded like the weight on its kept
axes and replicated on its size-1 axes). The model's code reads a weight as ``param[...]``; a
``QArray`` answers that with the dequantised weight in the compute dtype, so inside the layer
scan only one layer's weights exist in full precision at a time, and the teacher's resident
memory is the int8 values: half of bf16, a quarter of fp32 (plus one scale per channel).

Only a frozen model may be quantised: gradients do not flow into int8 values. The teacher of a
run (``teacher.quantize: int8``) is quantised after any student was copied from it, so a
student cut from the teacher starts from its full-precision weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_jax.models.model import Model, param_shardings

__all__ = ["MODES", "QArray", "dequantize", "is_quantized", "param_bytes", "quantize",
           "quantize_array", "value"]

MODES = ("none", "int8")

# weight name -> its input (contracted) axes, counted without the stacked ``layers`` axis
_CONTRACTED = {"q": (0,), "k": (0,), "v": (0,), "o": (0, 1), "gate": (0,), "up": (0,),
               "down": (0,), "embed": (1,), "lm_head": (0,)}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"],
                   meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight ``q`` and its fp32 per-channel ``scale`` (size 1 on the contracted
    axes). ``dtype``: what reading it (``x[...]``, ``x.astype``, ``x.T``) returns."""

    q: jax.Array
    scale: jax.Array
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """``q * scale`` (computed in fp32) in ``dtype`` (default: this array's ``dtype``)."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype or self.dtype)

    def __getitem__(self, key: Any) -> jax.Array:
        if key is Ellipsis:
            return self.dequantize()
        return self.dequantize()[key]

    def astype(self, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)

    @property
    def T(self) -> jax.Array:  # noqa: N802  (numpy's name)
        return self.dequantize().T


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def value(x: Any) -> Any:
    """A parameter's full-precision value: ``x`` itself, or a :class:`QArray` dequantised."""
    return x.dequantize() if isinstance(x, QArray) else x


def quantize_array(w: Any, contracted: tuple[int, ...], dtype: Any = None) -> QArray:
    """Int8 values and per-channel fp32 scales of ``w`` (max-abs over the ``contracted``
    axes, zero channels scaled by 1). ``dtype``: what the result dequantises to (default
    ``w``'s)."""
    w32 = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contracted, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QArray(q, scale, jnp.dtype(dtype or jnp.asarray(w).dtype).name)


def _plan(params: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """path -> contracted axes (with the ``layers`` offset) of every weight to quantise."""
    out = {}

    def visit(node, path):
        for key, x in node.items():
            if isinstance(x, Mapping):
                visit(x, path + (key,))
            elif key in _CONTRACTED and not isinstance(x, QArray):
                offset = 1 if path and path[0] == "layers" else 0
                out[path + (key,)] = tuple(a + offset for a in _CONTRACTED[key])
    visit(params, ())
    return out


def _scale_sharding(sharding: Any, shape: tuple[int, ...]) -> Any:
    """The weight's sharding with its size-1 (contracted) axes replicated."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(
        *[None if n == 1 else s for s, n in zip(spec, shape)]))


def _set(tree: dict, path: tuple[str, ...], x: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: x}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], x)}


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def quantize(model: Model, mode: str = "int8", *, mesh: Mesh | None = None,
             rules: Mapping[str, Any] | None = None) -> Model:
    """``model`` with its matmul weights int8 per output channel (``mode="none"``: unchanged).

    Each weight is quantised by its own jitted call and then dropped, so the peak is the model
    plus one weight's int8 copy. The int8 values keep the weight's sharding (``mesh``/``rules``:
    the model's, used when the weights carry no sharding), and read back as the model's compute
    dtype. Quantise only a frozen model (a teacher): int8 values take no gradient."""
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return model
    cfg = model.config
    shardings = param_shardings(cfg, mesh, rules) if mesh is not None else None
    params = model.params
    for path, contracted in _plan(params).items():
        w = _get(params, path)
        sh = _get(shardings, path) if shardings is not None else getattr(w, "sharding", None)
        scale_shape = tuple(1 if i in contracted else n for i, n in enumerate(w.shape))
        out_sh = None if sh is None else QArray(sh, _scale_sharding(sh, scale_shape), cfg.dtype)
        fn = jax.jit(functools.partial(quantize_array, contracted=contracted, dtype=cfg.dtype),
                     out_shardings=out_sh)
        params = _set(params, path, fn(w))
    return model.replace(params=params)


def dequantize(model: Model) -> Model:
    """The model with every :class:`QArray` read back as an array of the params' dtype."""
    dt = model.config.param_dtype
    return model.replace(params=jax.tree.map(
        lambda x: x.dequantize(dt) if isinstance(x, QArray) else x, model.params,
        is_leaf=is_qarray))


def is_quantized(model_or_params: Any) -> bool:
    """Whether any weight of a model (or params tree) is a :class:`QArray`."""
    params = model_or_params.params if isinstance(model_or_params, Model) else model_or_params
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=is_qarray))


def param_bytes(model_or_params: Any) -> int:
    """Bytes of a model's (or params tree's) arrays, int8 values and scales included."""
    params = model_or_params.params if isinstance(model_or_params, Model) else model_or_params
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))

