"""Orbax training checkpoints: student state plus the data iterator's position.

Each checkpoint is a step directory written by Orbax into a temporary location and renamed
when complete (so a killed run never leaves a half checkpoint that looks valid); saves can be
asynchronous; the last ``keep`` are kept. The teacher is never checkpointed.

Damage after the fact (a truncated or overwritten file) is caught on restore: each checkpoint
carries a digest of every state leaf (``checksums``, a small JSON item committed with the
checkpoint), computed on the device at save time. The digest of a leaf is the sum, modulo 2**32,
of its elements' bit patterns (as unsigned integers) times ``2 * index + 1``: exact integer
arithmetic, so it does not depend on the sharding, and any single changed bit changes it.
:meth:`Checkpointer.restore_valid` restores the newest checkpoint that loads, matches its
digests and holds only finite numbers, and moves the newer damaged ones aside.

A LoRA student's checkpoints hold its adapters only (the state's params), plus the fingerprint
of the frozen base they were trained on (``base``, a small JSON item): restoring onto another
base is refused (:class:`BaseMismatchError`), never mistaken for damage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKSUMS = "checksums"  # the digest item of each checkpoint
BASE = "base"  # a LoRA student's checkpoints: the frozen base's fingerprint
DAMAGED_SUFFIX = "_damaged"  # damaged checkpoints are moved to <checkpoints>_damaged/<step>


class CheckpointRestoreError(ValueError):
    """A run directory has checkpoints but none of them restores intact."""


class BaseMismatchError(ValueError):
    """A LoRA checkpoint's adapters were trained on another base model than the one given."""


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """``every``: save every N steps (and always at the end); ``keep``: how many to keep;
    ``async_save``: write in the background while training continues."""

    every: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint.every and checkpoint.keep must be >= 1, got {self}")


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(digest, all finite) of one array; see the module docstring."""
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = (x.astype(jnp.uint8) if x.dtype == jnp.bool_
            else jax.lax.bitcast_convert_type(x, uint)).astype(jnp.uint32)
    weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * 2 + 1
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.sum(bits * weights, dtype=jnp.uint32), finite


@jax.jit
def _digests(state: Any) -> list[tuple[jax.Array, jax.Array]]:
    return [_leaf_digest(x) for x in jax.tree.leaves(state)]


def state_digests(state: Any) -> tuple[dict[str, int], list[str]]:
    """``({leaf path: digest}, [paths of leaves holding NaN or inf])`` of a state (blocks until
    the state is computed)."""
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    pairs = jax.device_get(_digests(state))
    return ({k: int(d) for k, (d, _) in zip(names, pairs)},
            [k for k, (_, ok) in zip(names, pairs) if not bool(ok)])


def params_fingerprint(params: Any) -> str:
    """A short fingerprint of a params tree (its paths, shapes, dtypes and every leaf's digest,
    see the module docstring): equal for the same values however they are sharded."""
    digests, _ = state_digests(params)
    shapes = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype))
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    raw = json.dumps([sorted(digests.items()), shapes], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line, without TensorStore's spec dump."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = text.split(" See full TensorStore details")[0]
    return text if len(text) <= 200 else text[:200] + "..."


class Checkpointer:
    """Save and restore ``TrainState`` (and optionally a Grain iterator) under ``directory``.

    ``base_fingerprint``: a LoRA student's frozen base (:func:`params_fingerprint`), recorded
    in every checkpoint and checked before any is restored."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, with_data: bool = True,
                 base_fingerprint: str | None = None):
        self.directory = Path(directory).absolute()
        self.with_data = with_data
        self.base_fingerprint = base_fingerprint
        handlers: dict[str, Any] = {"state": ocp.StandardCheckpointHandler(),
                                    CHECKSUMS: ocp.JsonCheckpointHandler(),
                                    BASE: ocp.JsonCheckpointHandler()}
        if with_data:
            import grain
            handlers["data"] = grain.checkpoint.CheckpointHandler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, save_interval_steps=cfg.every,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True,
            create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)
        _OPEN.add(self)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` writes a checkpoint."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator: Any = None, *,
             force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether a save started. The digests
        are computed first, so a due save waits for ``state`` to be computed."""
        if not (force or self.due(step)):
            return False
        digests, _ = state_digests(state)
        items = {"state": ocp.args.StandardSave(state),
                 CHECKSUMS: ocp.args.JsonSave({"digest": "sum(bits * (2i+1)) mod 2**32",
                                               "leaves": digests})}
        if self.base_fingerprint is not None:
            items[BASE] = ocp.args.JsonSave({"fingerprint": self.base_fingerprint})
        if self.with_data:
            import grain
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None, like_state: Any, data_iterator: Any = None) -> Any:
        """Restore ``step`` (default: latest) into arrays shaped and sharded like
        ``like_state``; the data iterator (if given) is moved to its saved position."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(_abstract(like_state))}
        if self.with_data:
            import grain
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _damage(self, step: int, state: Any) -> str | None:
        """Why the restored ``state`` of ``step`` is not what was saved, or None."""
        digests, nonfinite = state_digests(state)
        if (self.directory / str(step) / CHECKSUMS).is_dir():
            saved = self._manager.restore(step, args=ocp.args.Composite(
                **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]["leaves"]
            changed = [k for k in saved if digests.get(k) != saved[k]]
            if changed or set(saved) != set(digests):
                return f"its contents changed since it was saved ({', '.join(changed[:3])})"
        if nonfinite:
            return f"it holds NaN or inf ({', '.join(nonfinite[:3])})"
        return None

    def restore_valid(self, like_state: Any, data_iterator: Any = None) -> tuple[Any, list[str]]:
        """Restore the newest intact checkpoint (see the module docstring): ``(state, notes)``,
        the notes naming each newer checkpoint skipped, why, and where it was moved;
        ``(None, [])`` when there is no checkpoint. Raises :class:`CheckpointRestoreError` when
        there are checkpoints but none is intact."""
        for step in self.all_steps():
            check_base(self.directory, step, self.base_fingerprint)
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(step, like_state, data_iterator)
                why = self._damage(step, state)
            except Exception as e:  # any failure to read it back: try an older one
                state, why = None, f"it does not restore ({_first_line(e)})"
            if why is None:
                return state, [self._set_aside(s, why) for s, why in skipped]
            skipped.append((step, why))
        if not skipped:
            return None, []
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} is intact: "
            + "; ".join(f"step {s}: {why}" for s, why in skipped)
            + f"; move {self.directory} away to train from scratch")

    def _set_aside(self, step: int, why: str) -> str:
        """Move a damaged checkpoint out of the way (a new one is written at its step)."""
        aside = self.directory.with_name(self.directory.name + DAMAGED_SUFFIX) / str(step)
        if jax.process_index() == 0:
            n = 0
            while aside.exists():
                n += 1
                aside = aside.with_name(f"{step}.{n}")
            aside.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(aside)
        ocp.multihost.sync_global_processes(f"distill_jax_set_aside_{step}")
        self._manager.reload()
        return f"skipped checkpoint {step}: {why}; moved it to {aside}"

    def wait(self) -> None:
        """Block until any asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish any asynchronous save and release the manager (idempotent)."""
        if self in _OPEN:
            _OPEN.discard(self)
            self._manager.wait_until_finished()
            self._manager.close()


# Checkpointers not closed yet: an error that ends a run leaves its manager open, and an async
# save still in flight at interpreter exit fails noisily ("Event loop is closed").
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


def close_all() -> None:
    """Finish the saves of, and close, every checkpointer still open (after an error)."""
    for ckpt in list(_OPEN):
        ckpt.close()


def saved_base_fingerprint(directory: str | Path, step: int) -> str | None:
    """The base fingerprint a LoRA checkpoint records (None: not a LoRA checkpoint)."""
    item = Path(directory) / str(step) / BASE
    files = sorted(item.iterdir()) if item.is_dir() else []
    for f in files:
        try:
            return json.loads(f.read_text())["fingerprint"]
        except (ValueError, KeyError, OSError):
            continue
    return None


def check_base(directory: str | Path, step: int, fingerprint: str | None) -> None:
    """Raise :class:`BaseMismatchError` unless checkpoint ``step`` was trained on the base with
    ``fingerprint`` (None: a plain student, whose checkpoints record no base)."""
    saved = saved_base_fingerprint(directory, step)
    if saved == fingerprint:
        return
    if saved is None:
        raise BaseMismatchError(f"checkpoint {step} in {directory} holds a whole student, not LoRA "
                                "adapters: resume it without student.lora, or choose another run_dir")
    if fingerprint is None:
        raise BaseMismatchError(f"checkpoint {step} in {directory} holds LoRA adapters only: set "
                                "the run's student.lora to resume it, or choose another run_dir")
    raise BaseMismatchError(
        f"checkpoint {step} in {directory} holds LoRA adapters trained on another base model "
        f"(base fingerprint {saved}, this run's {fingerprint}): give the student the base it "
        "was trained on (the same student.hf_path weights, preset and seed), or choose another "
        "run_dir")


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint step in a checkpoints directory (None if there is none)."""
    steps = [int(p.name) for p in Path(directory).iterdir()
             if p.name.isdigit() and (p / "state").is_dir()] if Path(directory).is_dir() else []
    return max(steps) if steps else None


def load_state_dict(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """A checkpoint's state as plain nested dicts of arrays (``params``, ``opt_state``, ``step``,
    ``rng``), without knowing the model; e.g. for export or inspection."""
    directory = Path(directory).absolute()
    step = latest_step(directory) if step is None else step
    if step is None or not (directory / str(step) / "state").is_dir():
        raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in "
                                f"{directory}")
    path = directory / str(step) / "state"
    ckptr = ocp.StandardCheckpointer()
    from absl import logging as absl_logging
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "metadata file does not exist" is expected
    try:
        meta = ckptr.metadata(path)
    finally:
        absl_logging.set_verbosity(level)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta.tree if hasattr(meta, "tree") else meta)
    return ckptr.restore(path, target)
