"""The memory plan of a run: per-device bytes from shapes and shardings alone.

:func:`plan_run` reads a run config and, without loading a weight or compiling anything, works
out what one device holds during a training step: the teacher's and the student's params, the
optimiser state, the gradients, the student's activations (the residuals its scanned layers
save for the backward pass under the configured remat policy, per micro-batch), the working
set of one layer, the teacher's hidden states, the chunked loss's buffers, the rollout KV cache
of an on-policy run, and the batch. Shapes come from ``jax.eval_shape`` of the model init
(:func:`distill_jax.models.param_shapes`), shards from the logical-axis rules
(:mod:`distill_jax.sharding`) on a simulated mesh of any size, and the activations from tracing
the student's forward at its per-device shapes with JAX's own residual accounting
(``saved_residuals``, what ``jax.ad_checkpoint.print_saved_residuals`` prints), so they follow
the remat policy exactly as the step's ``vjp`` will.

How the items add up to the peak (what XLA's buffer assignment packs): the resident items
(params, optimiser state, batch) all the time; during the loss the gradients (allocated),
the saved residuals of every layer, the teacher's hidden states and the larger of the loss's
working set and one layer's (the backward recomputation of a rematerialised layer, or the
frozen teacher's forward). ``Plan.total`` is that sum; :func:`xla_peak` is the compiled
figure it is checked against (``tests/test_plan.py``, README "Memory plan").

When the plan does not fit, :meth:`Plan.proposals` re-plans the run with changes that shrink
it (remat on, a larger fsdp axis, more micro-batches, a smaller loss chunk, an int8 teacher,
a LoRA student). A ``student.lora`` run is planned with its base frozen and only the adapters
trained (their optimiser state and gradients).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import sharding as shd
from distill_jax.models import Model, ModelConfig, hidden_states, logical_axes, param_shapes

GiB = 1024 ** 3

# Memory per device by kind (GiB). ``cpu``: this host's RAM.
DEVICE_MEMORY_GIB: dict[str, float | None] = {
    "v5e": 16.0, "v5p": 95.0, "v4": 32.0, "v6e": 32.0, "h100": 80.0, "h200": 141.0,
    "a100-80": 80.0, "a100-40": 40.0, "cpu": None,
}
# jax's device_kind strings -> the table's names
_KIND_ALIASES = (("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v6", "v6e"),
                 ("v4", "v4"), ("h100", "h100"), ("h200", "h200"), ("a100-sxm4-40", "a100-40"),
                 ("a100-pcie-40", "a100-40"), ("a100", "a100-80"), ("cpu", "cpu"))
# fp32 (chunk, vocab) arrays live at once in the chunked loss (student and teacher logits, the
# softmax, the logits' cotangent), read off XLA's buffer assignment of the step (CPU); one more
# under fsdp (see plan_run).
LOSS_CHUNK_ARRAYS = 4
LORA_RANK = 16  # the rank a proposed LoRA student is planned at


class PlanError(ValueError):
    """Bad input to the planner (device kind, device count); the message names the fix."""


def host_memory_bytes() -> int:
    """This machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(kind: str | None = None, memory_gib: float | None = None) -> tuple[str, int]:
    """``(kind, bytes)`` of one device: ``memory_gib`` when given, else the table's entry for
    ``kind`` (``cpu``: this host's RAM), else the first local device's (its allocator limit
    where the backend reports one)."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise PlanError(f"device memory {memory_gib} GiB: give a positive size, e.g. "
                            "--memory 16")
        return kind or "given", int(memory_gib * GiB)
    if kind is not None:
        name = kind.lower()
        if name not in DEVICE_MEMORY_GIB:
            raise PlanError(f"unknown device kind {kind!r}; use one of "
                            f"{', '.join(DEVICE_MEMORY_GIB)} or give the memory (--memory GiB)")
        gib = DEVICE_MEMORY_GIB[name]
        return name, host_memory_bytes() if gib is None else int(gib * GiB)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    found = next((n for a, n in _KIND_ALIASES if a in device.device_kind.lower()), None)
    if stats and stats.get("bytes_limit"):
        return found or device.device_kind, int(stats["bytes_limit"])
    if found is None or device.platform == "cpu":
        return "cpu", host_memory_bytes()
    return device_memory(found)


@dataclasses.dataclass(frozen=True)
class Item:
    """One line of a plan: ``name``, per-device ``bytes``, and how it was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Proposal:
    """A change that makes the run fit (or shrinks it): the config ``overrides`` (dotted keys),
    and the predicted per-device total."""

    change: str
    overrides: tuple[str, ...]
    total: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's per-device memory plan (see the module docstring). ``items`` in table order;
    ``total`` the predicted peak; ``memory`` the device's bytes."""

    items: tuple[Item, ...]
    total: int
    memory: int
    device_kind: str
    mesh: tuple[int, int, int]
    notes: tuple[str, ...] = ()
    proposals: tuple[Proposal, ...] = ()

    @property
    def fits(self) -> bool:
        return self.total <= self.memory

    @property
    def headroom(self) -> int:
        return self.memory - self.total

    @property
    def largest(self) -> Item:
        return max(self.items, key=lambda i: i.bytes)

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def summary(self) -> str:
        """One line: total vs the device, and the largest item."""
        d, f, t = self.mesh
        verdict = "fits" if self.fits else "does not fit"
        return (f"memory plan: {_gib(self.total)} per device of {_gib(self.memory)} "
                f"({self.device_kind}, mesh data={d} fsdp={f} tensor={t}): {verdict}, headroom "
                f"{_gib(self.headroom)}; largest: {self.largest.name} {_gib(self.largest.bytes)}")

    def table(self) -> str:
        """The plan as a text table, with its total, headroom, largest item and proposals."""
        width = max(len(i.name) for i in self.items)
        lines = [f"{'item':<{width}}  {'per device':>11}  note"]
        lines += [f"{i.name:<{width}}  {_gib(i.bytes):>11}  {i.note}" for i in self.items]
        lines.append(f"{'total (peak)':<{width}}  {_gib(self.total):>11}")
        lines.append(self.summary())
        lines += [f"note: {n}" for n in self.notes]
        if self.proposals:
            lines.append("changes that shrink it (predicted peak per device):")
            for p in self.proposals:
                fit = "fits" if p.total <= self.memory else "does not fit"
                over = f"  ({' '.join(p.overrides)})" if p.overrides else ""
                lines.append(f"  {p.change}: {_gib(p.total)}, {fit}{over}")
        return "\n".join(lines)

    def refusal(self) -> str:
        """The one-line message ``train`` refuses with when the plan does not fit."""
        fixes = [p for p in self.proposals if p.total <= self.memory]
        fix = (f"; e.g. {fixes[0].change} ({' '.join(fixes[0].overrides)}) predicts "
               f"{_gib(fixes[0].total)}" if fixes else "")
        return (f"{self.summary()}{fix}; run `distill-jax plan CONFIG` for the table, or set "
                "plan.enforce=false to train anyway")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


# --- shapes and shards ----------------------------------------------------------------------

def abstract_mesh(sizes: tuple[int, int, int]):
    """A (data, fsdp, tensor) mesh of ``sizes`` without devices (for sharding rules only)."""
    return jax.sharding.AbstractMesh(tuple(sizes), shd.MESH_AXES)


def resolve_mesh(mesh_cfg: Any, devices: int | None) -> tuple[int, int, int]:
    """The mesh axis sizes of ``mesh_cfg`` on ``devices`` devices (default: the local ones, or
    ``mesh.num_devices``), ``-1`` resolved."""
    n = devices or mesh_cfg.num_devices or jax.device_count()
    if n < 1:
        raise PlanError(f"--devices {n}: give a positive number of devices")
    try:
        return shd.mesh_shape(n, mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    except ValueError as e:
        raise PlanError(f"{e} (plan for another --devices, or change mesh.data/fsdp/tensor)") \
            from None


def _shard_shape(shape, axes, rules, mesh) -> tuple[int, ...]:
    spec = shd.logical_to_spec(axes, rules, shape, mesh)
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        out.append(-(-dim // math.prod(mesh.shape[n] for n in names)))
    return tuple(out)


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def param_bytes(cfg: ModelConfig, mesh, rules, dtype: Any = None) -> tuple[int, int]:
    """``(per-device, whole)`` bytes of the model's params (``dtype``: instead of theirs)."""
    shapes, axes = param_shapes(cfg), logical_axes(cfg)
    local = whole = 0
    for s, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=_is_axes)):
        dt = dtype or s.dtype
        local += _nbytes(_shard_shape(s.shape, ax, rules, mesh), dt)
        whole += _nbytes(s.shape, dt)
    return local, whole


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def _divisor(name: str, size: int, rules, mesh) -> int:
    return size // _shard_shape((size,), (name,), rules, mesh)[0]


def local_config(cfg: ModelConfig, mesh, rules) -> ModelConfig:
    """The model as one device computes it: heads, MLP and vocabulary divided by the mesh axes
    that shard them (the hidden width is gathered for compute, so it stays whole)."""
    heads = _divisor("heads", cfg.num_heads, rules, mesh)
    kv = _divisor("kv_heads", cfg.num_kv_heads, rules, mesh)
    n, k = cfg.num_heads // heads, cfg.num_kv_heads // kv
    if n % k:  # kv heads replicated while the query heads are split: groups split too
        k = max(1, math.gcd(n, k))
    return cfg.replace(num_heads=n, num_kv_heads=k,
                       intermediate_size=cfg.intermediate_size
                       // _divisor("mlp", cfg.intermediate_size, rules, mesh),
                       vocab_size=cfg.vocab_size // _divisor("vocab", cfg.vocab_size, rules, mesh))


def residual_bytes(cfg: ModelConfig, rows: int, length: int) -> int:
    """Bytes the model's forward saves for its backward (``vjp`` residuals: the scan's stacked
    per-layer residuals under ``cfg.remat``, and the rest), for ``rows`` x ``length`` tokens;
    the params themselves are not counted. Traced, never run."""
    from jax._src.ad_checkpoint import saved_residuals  # jax's own residual accounting

    def forward(params, tokens, positions, segment_ids):
        return hidden_states(Model(cfg, params), tokens, positions=positions,
                             segment_ids=segment_ids)

    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    saved = saved_residuals(forward, param_shapes(cfg), ids, ids, ids)
    return sum(_nbytes(aval.shape, aval.dtype) for aval, where in saved
               if not where.startswith("from the argument"))


# --- the plan -------------------------------------------------------------------------------

def _model_config(src: Any, notes: list[str], role: str) -> ModelConfig:
    """The ModelConfig of a config section; a checkpoint not on this machine is planned from its
    preset (a laptop plan of a pod run)."""
    from distill_jax.train.build import model_config
    if src.hf_path and src.preset and not os.path.exists(os.path.join(src.hf_path,
                                                                      "config.json")):
        notes.append(f"{role}: {src.hf_path} is not here; planned from preset {src.preset}")
        return model_config(dataclasses.replace(src, hf_path=None))
    return model_config(src)


def _student_config(cfg: Any, teacher_cfg: ModelConfig | None, notes: list[str]) -> ModelConfig:
    from distill_jax.train import assemble
    src = cfg.student
    if src.init == "teacher_layers" and teacher_cfg is not None:
        from distill_jax.xtok import transfer
        return transfer.derived_config(teacher_cfg, layers=src.layers, dtype=src.dtype,
                                       param_dtype=src.param_dtype, remat=src.remat,
                                       **src.overrides)
    if src.init in assemble.FROM_TEACHER:
        return assemble.student_config(cfg)
    return _model_config(src, notes, "student")


def plan_run(cfg: Any, *, devices: int | None = None, device_kind: str | None = None,
             memory_gib: float | None = None, proposals: bool = True) -> Plan:
    """The per-device memory plan of the run ``cfg`` (a ``RunConfig``) on a mesh of
    ``devices`` devices (default: this machine's; any number may be simulated) of
    ``device_kind`` (default ``cfg.plan.device_kind``, else this machine's) with
    ``memory_gib`` per device (default ``cfg.plan.memory_gib``, else the kind's). With
    ``proposals``, a plan that does not fit carries changes that would make it fit."""
    from distill_jax.losses import terms
    from distill_jax.train import optim
    from distill_jax.train.assemble import run_signal

    device_kind = device_kind or cfg.plan.device_kind
    memory_gib = memory_gib if memory_gib is not None else cfg.plan.memory_gib
    kind, memory = device_memory(device_kind, memory_gib)
    sizes = resolve_mesh(cfg.mesh, devices)
    mesh = abstract_mesh(sizes)
    rules = {**shd.DEFAULT_RULES, **cfg.mesh.rules}
    notes: list[str] = []

    needs_teacher = terms.needs_teacher(cfg.loss.terms)
    cached = bool(cfg.teacher is not None and cfg.teacher.cache and needs_teacher)
    live = cfg.teacher is not None and needs_teacher and not cached
    teacher_cfg = _model_config(cfg.teacher, notes, "teacher") if cfg.teacher else None
    student_cfg = _student_config(cfg, teacher_cfg, notes)
    signal = run_signal(cfg, cached)

    # rows: the global batch over the axes the "batch" rule names, then grad_accum micro-batches
    rows = cfg.data.batch_size
    rows_dev = _shard_shape((rows,), ("batch",), rules, mesh)[0]
    accum = cfg.optimizer.grad_accum
    micro_dev = -(-rows_dev // accum)
    length = cfg.data.seq_len
    if cfg.onpolicy is not None:  # a training row is the longest prompt bucket + the rollout
        length = max(cfg.onpolicy.prompt_buckets) + cfg.onpolicy.max_new_tokens

    items: list[Item] = []
    lora_spec = cfg.student.lora
    student_cfg = student_cfg.replace(lora=None)  # the base; adapters are counted apart
    s_local, s_whole = param_bytes(student_cfg, mesh, rules)
    t_local = 0
    if live:
        t_local, _ = param_bytes(teacher_cfg, mesh, rules)
        t_dtype = teacher_cfg.param_dtype
        if cfg.teacher.quantize == "int8":  # one byte a weight (scales and norms negligible)
            t_local, t_dtype = t_local // jnp.dtype(teacher_cfg.param_dtype).itemsize, "int8"
        items.append(Item("teacher params", t_local,
                          f"{teacher_cfg.num_params() / 1e9:.2f}B x {t_dtype}"))
    trained = param_shapes(student_cfg)
    share = s_local / s_whole  # the trained params are sharded as the student's
    detail = f"{student_cfg.num_params() / 1e9:.2f}B x {student_cfg.param_dtype}"
    if lora_spec is not None:  # a frozen base plus fp32 adapters, the only trained params
        from distill_jax.models import lora
        trained = lora.split(param_shapes(student_cfg.replace(lora=lora_spec)))[1]
        n_adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained))
        if cfg.student.quantize == "int8":  # one byte a base weight
            s_local //= jnp.dtype(student_cfg.param_dtype).itemsize
            detail = detail.replace(f"x {student_cfg.param_dtype}", "x int8")
        s_local += int(n_adapters * 4 * share)
        detail += f" frozen + {n_adapters / 1e6:.2f}M LoRA (rank {lora_spec.rank}) x float32"
    items.append(Item("student params", s_local, detail))
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    opt_whole = sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(
        jax.eval_shape(optimizer.init, {"model": trained})))
    items.append(Item("optimizer state", int(opt_whole * share),
                      "AdamW moments, sharded as the params"
                      + (" (the adapters')" if lora_spec is not None else "")))
    grads = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trained)) * 4 * share)
    items.append(Item("gradients", grads * (2 if accum > 1 else 1),
                      "fp32" + (", accumulator + one micro-batch's" if accum > 1 else "")))

    local_s = local_config(student_cfg, mesh, rules)
    act = residual_bytes(local_s, micro_dev, length)
    act += _nbytes((micro_dev, length, student_cfg.hidden_size), student_cfg.dtype)  # h
    items.append(Item("activations", act,
                      f"saved residuals, remat={student_cfg.remat}, {micro_dev} rows x "
                      f"{length} per micro-batch"))
    # one layer at a time: the backward's recomputation of a rematerialised layer (its full
    # residuals), with fsdp its gathered weights
    layer = _gathered_layer(student_cfg, mesh, rules)
    if student_cfg.remat != "none":
        layer += residual_bytes(local_s.replace(num_layers=1, remat="none",
                                                layer_types=local_s.layer_types[:1]),
                                micro_dev, length)
    items.append(Item("layer working set", layer, "backward of one student layer"))
    t_hidden = t_forward = 0
    if live:  # the frozen teacher runs first, over row groups of micro_dev rows
        t_forward = _forward_bytes(local_config(teacher_cfg, mesh, rules), micro_dev, length)
        t_forward += _gathered_layer(teacher_cfg, mesh, rules)
        items.append(Item("teacher forward", t_forward, "one teacher layer over a row group"))
        if not cfg.loss.cross_tokenizer:
            t_hidden = _nbytes((rows_dev, length, teacher_cfg.hidden_size), teacher_cfg.dtype)
            items.append(Item("teacher hidden states", t_hidden,
                              "the whole batch's, compute dtype"))

    vocab_local = local_s.vocab_size
    chunk = min(cfg.loss.chunk_size, micro_dev * length)
    arrays = LOSS_CHUNK_ARRAYS if live else LOSS_CHUNK_ARRAYS - 1
    # fsdp shards the hidden width the lm_head contracts over: XLA computes partial logits and
    # all-reduces them (one more (chunk, vocab) buffer), and the head stays sharded
    embed_div = _divisor("embed", student_cfg.hidden_size, rules, mesh)
    arrays += embed_div > 1
    loss = arrays * _nbytes((chunk, vocab_local), jnp.float32)
    head = (student_cfg.hidden_size // embed_div, vocab_local)
    heads = _nbytes(head, jnp.float32)  # the head-gradient accumulator (the scan's carry)
    if student_cfg.dtype != student_cfg.param_dtype:
        heads += _nbytes(head, student_cfg.dtype)  # the head cast to the compute dtype
    if live and not cfg.loss.cross_tokenizer and teacher_cfg.dtype != teacher_cfg.param_dtype:
        heads += _nbytes((teacher_cfg.hidden_size // embed_div, vocab_local), teacher_cfg.dtype)
    items.append(Item("loss buffers", loss + heads,
                      f"{arrays} fp32 ({chunk}, {vocab_local}) chunks + lm_head grad/copies"))

    if cfg.onpolicy is not None:
        kv = 2 * _nbytes((student_cfg.num_layers, rows_dev, length, local_s.num_kv_heads,
                          student_cfg.head_dim), student_cfg.dtype)
        items.append(Item("rollout KV cache", kv, f"{rows_dev} rows x {length} slots"))

    batch = 0
    for key in terms.batch_keys(signal, cfg.loss.terms):
        rank = signal.rank(key)
        shape = (rows_dev,) + (length,) * (rank >= 2) + (cfg.cache.k,) * (rank >= 3)
        if key.startswith("teacher_topk"):
            shape = (rows_dev, length, cfg.cache.k)
        batch += _nbytes(shape, jnp.int32)
    items.append(Item("batch", batch, f"{rows_dev} rows per device"))

    by = {i.name: i.bytes for i in items}
    resident = sum(by.get(k, 0) for k in ("teacher params", "student params", "optimizer state",
                                          "batch"))
    # the teacher's forward comes first (before any student activation); then the student's
    # forward, the loss over its saved residuals, and its backward
    student_phase = (by["gradients"] + by["activations"] + t_hidden
                     + max(by["loss buffers"], by["layer working set"]))
    total = resident + by.get("rollout KV cache", 0) + max(t_hidden + t_forward, student_phase)
    plan = Plan(tuple(items), int(total), memory, kind, sizes, tuple(notes))
    if proposals and not plan.fits:
        plan = dataclasses.replace(plan, proposals=tuple(_proposals(
            cfg, plan, devices=math.prod(sizes), kind=kind, memory=memory,
            teacher_cfg=teacher_cfg if live else None, student_cfg=student_cfg)))
    return plan


def _forward_bytes(cfg: ModelConfig, rows: int, length: int) -> int:
    """Peak intermediates of one layer's forward alone (no backward to save for): the
    attention's fp32 scores and probabilities, or the MLP's gate, up and product."""
    attention = 2 * _nbytes((rows, cfg.num_heads, length, length), jnp.float32)
    mlp = 3 * _nbytes((rows, length, cfg.intermediate_size), cfg.dtype)
    return max(attention, mlp) + 2 * _nbytes((rows, length, cfg.hidden_size), cfg.dtype)


def _gathered_layer(cfg: ModelConfig, mesh, rules) -> int:
    """One layer's weights as gathered over fsdp for compute (0 without fsdp)."""
    if mesh.shape["fsdp"] == 1:
        return 0
    one = cfg.replace(num_layers=1, layer_types=cfg.layer_types[:1])
    full, _ = param_bytes(one, abstract_mesh((1, 1, mesh.shape["tensor"])), rules,
                          dtype=cfg.dtype)
    embed = _nbytes((cfg.vocab_size, cfg.hidden_size), cfg.dtype) // mesh.shape["tensor"]
    head = 0 if cfg.tie_word_embeddings else embed
    return max(0, full - embed - head)


def _proposals(cfg: Any, plan: Plan, *, devices: int, kind: str, memory: int,
               teacher_cfg: ModelConfig | None, student_cfg: ModelConfig) -> list[Proposal]:
    """Changes that shrink the plan, each re-planned."""
    out: list[Proposal] = []

    def replan(change: str, **sections: dict[str, Any]) -> None:
        new = cfg
        overrides = []
        for section, values in sections.items():
            new = dataclasses.replace(new, **{section: dataclasses.replace(
                getattr(new, section), **values)})
            overrides += [f"{section}.{k}={v}" for k, v in values.items()]
        try:
            p = plan_run(new, devices=devices, device_kind=kind,
                         memory_gib=memory / GiB, proposals=False)
        except ValueError:
            return
        if p.total < plan.total:
            out.append(Proposal(change, tuple(overrides), p.total))

    if cfg.student.remat != "full":
        replan("remat the student's layers (full)", student={"remat": "full"})
    data, fsdp, tensor = plan.mesh
    if data > 1:
        replan(f"fsdp over all {data * fsdp} data-parallel devices",
               mesh={"data": 1, "fsdp": data * fsdp})
    rows_dev = -(-cfg.data.batch_size // (data * fsdp))
    accum = cfg.optimizer.grad_accum
    while accum * 2 <= rows_dev and cfg.data.batch_size % (accum * 2) == 0:
        accum *= 2  # the fewest micro-batches that fit, else the most the batch allows
        p = plan_run(dataclasses.replace(cfg, optimizer=dataclasses.replace(
            cfg.optimizer, grad_accum=accum)), devices=devices, device_kind=kind,
            memory_gib=memory / GiB, proposals=False)
        if p.fits:
            break
    if accum != cfg.optimizer.grad_accum:
        replan(f"{accum} micro-batches", optimizer={"grad_accum": accum})
    if cfg.loss.chunk_size > 128:
        replan("a smaller loss chunk", loss={"chunk_size": max(128, cfg.loss.chunk_size // 4)})
    if len(out) > 1:  # everything above at once
        new = cfg
        overrides = []
        for p in out:
            for o in p.overrides:
                key, value = o.split("=", 1)
                section, name = key.split(".", 1)
                value = int(value) if value.lstrip("-").isdigit() else value
                new = dataclasses.replace(new, **{section: dataclasses.replace(
                    getattr(new, section), **{name: value})})
                overrides.append(o)
        try:
            p = plan_run(new, devices=devices, device_kind=kind, memory_gib=memory / GiB,
                         proposals=False)
            out.append(Proposal("all of the above", tuple(overrides), p.total))
        except ValueError:
            pass
    if (teacher_cfg is not None and cfg.teacher.quantize == "none"
            and any(i.name == "teacher params" for i in plan.items)):
        replan("an int8 teacher (per-channel weights)", teacher={"quantize": "int8"})
    if cfg.student.lora is None:  # adapters on every projection; only they train
        from distill_jax.models.config import LoraSpec
        new = dataclasses.replace(cfg, student=dataclasses.replace(
            cfg.student, lora=LoraSpec(rank=LORA_RANK)))
        try:
            p = plan_run(new, devices=devices, device_kind=kind, memory_gib=memory / GiB,
                         proposals=False)
            if p.total < plan.total:
                out.append(Proposal(f"a LoRA student (rank {LORA_RANK})",
                                    (f"student.lora.rank={LORA_RANK}",), p.total))
        except ValueError:
            pass
    return out


# --- the compiled figure ---------------------------------------------------------------------

def xla_peak(cfg: Any) -> dict[str, int]:
    """XLA's figures for the run's jitted train step on this machine's devices (compiled from
    abstract inputs: nothing allocated): ``memory_analysis()``'s argument, output, alias and
    temp sizes, and ``peak`` = argument + output - alias + temp (per device)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from distill_jax import models as M
    from distill_jax.train import optim
    from distill_jax.train.assemble import RunSetup, teacher_tokenizer
    from distill_jax.train.build import make_mesh
    from distill_jax.models import lora
    from distill_jax.train.step import (MODEL, LOSS, TrainState, frozen_inputs, jit_train_step,
                                        rank_sharding)
    from distill_jax.tokenizer import load_tokenizer

    mesh, rules = make_mesh(cfg.mesh)
    notes: list[str] = []
    teacher_cfg = _model_config(cfg.teacher, notes, "teacher") if cfg.teacher else None
    student_cfg = _student_config(cfg, teacher_cfg, notes).replace(lora=cfg.student.lora)
    tokenizer = load_tokenizer(cfg.tokenizer_path())
    cached = bool(cfg.teacher is not None and cfg.teacher.cache)
    setup = RunSetup(cfg, cfg.loss.spec(), tokenizer, teacher_tokenizer(cfg, tokenizer),
                     student_cfg, teacher_cfg, cached)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    step = setup.train_step(optimizer, optim.make_schedule(cfg.optimizer, cfg.steps))

    def abstract(mcfg):
        sh = M.param_shardings(mcfg, mesh, rules)
        return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                            M.param_shapes(mcfg), sh)

    replicated = NamedSharding(mesh, P())
    base = None
    params = {MODEL: abstract(student_cfg), LOSS: {}}
    if student_cfg.lora is not None:  # the adapters train; the base is a frozen input
        base, params[MODEL] = lora.split(params[MODEL])
    by_path = {jax.tree_util.keystr(p): x.sharding
               for p, x in jax.tree_util.tree_leaves_with_path(params)}

    def opt_leaf(path, x):
        key = jax.tree_util.keystr(path)
        sharding = next((s for p, s in by_path.items() if key.endswith(p)), replicated)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    opt_state = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(optimizer.init, params))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                       params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated))
    teacher = abstract(teacher_cfg) if setup.signal.prepare is not None and teacher_cfg else None
    teacher = frozen_inputs(student_cfg, teacher, base)
    batch_sh = shd.batch_sharding(mesh, 2, rules)
    rows, length = cfg.data.batch_size, cfg.data.seq_len
    batch = {}
    for key in setup.keys:
        rank = setup.signal.rank(key)
        shape = (rows,) + (length,) * (rank >= 2) + (cfg.cache.k,) * (rank >= 3)
        dtype = jnp.float32 if key == "loss_mask" else jnp.int32
        batch[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=rank_sharding(batch_sh, rank))
    jitted = jit_train_step(step, state, teacher, batch_sh, setup.keys, setup.ranks)
    with jax.set_mesh(mesh):  # as the training loop traces it
        m = jitted.lower(state, teacher, batch).compile().memory_analysis()
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
