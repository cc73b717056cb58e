"""Model construction helpers, placed on a mesh (the mesh, architecture and weights of one
config section are :mod:`distill_jax.models.source`'s; which student a run builds is decided in
:mod:`distill_jax.train.assemble`)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from distill_jax import models as M
from distill_jax.models.source import load_model, make_mesh, model_config  # noqa: F401  (re-exported)
from distill_jax.xtok import transfer


def keep_layers(teacher: M.Model, layers: tuple[int, ...], mesh: Mesh,
                rules: Mapping[str, Any] | None = None, **config_changes: Any) -> M.Model:
    """A copy of ``teacher`` keeping only ``layers`` (indices into its stack, in order; all of
    them when empty)."""
    new_cfg = transfer.derived_config(teacher.config, layers=layers, **config_changes)
    params = dict(teacher.params)
    if layers:
        idx = jnp.asarray(layers)
        params["layers"] = jax.tree.map(lambda x: jnp.take(x, idx, axis=0),
                                        teacher.params["layers"])
    shardings = M.param_shardings(new_cfg, mesh, rules)
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(new_cfg.param_dtype), p),
                     out_shardings=shardings)(params)
    return M.Model(new_cfg, params)
