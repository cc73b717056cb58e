"""Orbax training checkpoints: student state plus the data iterator's position.

Each checkpoint is a step directory written by Orbax into a temporary location and renamed
when complete (so a killed run never leaves a half checkpoint that looks valid); saves can be
asynchronous; the last ``keep`` are kept. The teacher is never checkpointed.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


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


class Checkpointer:
    """Save and restore ``TrainState`` (and optionally a Grain iterator) under ``directory``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, *, with_data: bool = True):
        self.directory = Path(directory).absolute()
        self.with_data = with_data
        handlers: dict[str, Any] = {"state": ocp.StandardCheckpointHandler()}
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

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False) -> bool:
        """Save if ``step`` is due (or ``force``); returns whether a save started."""
        items = {"state": ocp.args.StandardSave(state)}
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
