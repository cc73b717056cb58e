"""Device meshes and the table from logical axis names to mesh axes.

Model code names axes logically (``embed``, ``heads``, ...); this module is the only place
that knows how those names map onto the (data, fsdp, tensor) mesh. Nothing here reads global
state: the mesh and the rules are passed explicitly.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "lora": None,  # the rank axis of LoRA adapters (small: replicated)
}


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, ...]:
    """Resolve axis sizes, ``-1`` meaning "the rest"; raises if they do not multiply out."""
    sizes = [data, fsdp, tensor]
    given = f"data={data} x fsdp={fsdp} x tensor={tensor}"
    if any(not isinstance(s, (int, np.integer)) or (s < 1 and s != -1) for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive integers or -1, got {given}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {given}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh {given} cannot use the {num_devices} available devices: the fixed axes "
                f"multiply to {known}, which does not divide {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"does not match the {num_devices} available devices; use -1 for one axis to take the rest")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any] | None = None,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical ``axes``. With ``shape`` and ``mesh``, a dimension that the
    mesh axes do not divide stays replicated; a mesh axis is never used twice."""
    rules = DEFAULT_RULES if rules is None else rules
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match the shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules know {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used)
        if mesh is not None:
            missing = [n for n in names if n not in mesh.shape]
            if missing:
                raise ValueError(f"logical axis {name!r} maps to mesh axes {missing} that the mesh "
                                 f"does not have (its axes: {tuple(mesh.shape)}); fix the rules")
            names = tuple(n for n in names if mesh.shape[n] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[n] for n in names):
                names = ()
        used.update(names)
        spec.append(names[0] if len(names) == 1 else (names or None))
    return P(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Mapping[str, Any] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any,
                   rules: Mapping[str, Any] | None = None) -> Any:
    """NamedShardings for a tree of logical axes (tuples) and a matching tree of shapes/arrays."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda ax, s: named_sharding(mesh, ax, np.shape(s) if not hasattr(s, "shape")
                                                     else s.shape, rules),
                        axes_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Mapping[str, Any] | None = None) -> NamedSharding:
    """Sharding of a (batch, length, ...) input: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh=mesh))
