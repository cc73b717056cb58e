"""Teacher and student construction from their config sections, placed on a mesh (the mesh,
architecture and weights of one section are :mod:`distill_jax.models.source`'s)."""

from __future__ import annotations

from pathlib import Path
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


def _tokenizer(tok: Any):
    """A tokenizer object from an object or a ``load_tokenizer`` spec."""
    from distill_jax.tokenizer import load_tokenizer
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
        return load_model(src, mesh, rules)
    if src.init == "scratch":
        if src.hf_path:
            raise ValueError("student.init=scratch takes preset/overrides, not hf_path "
                             "(use init: hf to load a checkpoint)")
        return load_model(src, mesh, rules)
    if teacher is None:
        raise ValueError(f"student.init={src.init} needs a teacher section")
    if src.hf_path:
        raise ValueError(f"student.init={src.init} copies the teacher; remove student.hf_path "
                         "(or use init: hf to load a checkpoint)")
    changes = dict(dtype=src.dtype, param_dtype=src.param_dtype, remat=src.remat, **src.overrides)
    if src.init == "teacher_layers":
        return keep_layers(teacher, src.layers, mesh, rules, **changes)
    if src.init != "transfer":
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
