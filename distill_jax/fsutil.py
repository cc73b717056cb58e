"""Writing an output directory (an export) without ever deleting what this library did not write.

:func:`write_output_dir` is the one place that creates or replaces an exported directory
(:func:`distill_jax.models.save_hf`, ``distill-jax export``, ``distill-jax convert-gguf``). Its
rules, checked by :func:`check_output_dir` before anything is written:

* a missing directory is created (parents too); an existing empty directory is used;
* an existing file, a non-empty directory, the current directory or one of its parents, the home
  directory, the filesystem root and any path in ``protect`` (e.g. the run being exported) or a
  parent of one are refused (:class:`OutputDirError`);
* with ``overwrite=True`` a non-empty directory is replaced only when it holds a previous export:
  a ``distill_jax_export.json`` marker (written into every export, listing its files) and no
  entry beyond the files that marker lists. A directory holding anything else is refused.

The new directory is filled in a temporary sibling (same parent, so renames stay on one
filesystem), then renamed into place; a previous export is first renamed aside and removed only
once the new one is in place, so a crash at any point leaves the old or the new export complete
(a crash may leave a hidden ``.NAME.tmp-*`` or ``.NAME.old-*`` directory beside it).
Directories get ``mkdir``'s mode and files ``open``'s (both honour the umask).

:func:`write_atomic` is the one writer of single files that must never be seen half-written
(cache manifests, trace parts, figures' JSON): a fsynced temporary file in the same directory,
renamed into place, then the directory fsynced.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

MARKER = "distill_jax_export.json"
MARKER_FORMAT = "distill-jax export"


class OutputDirError(ValueError):
    """The output directory cannot be written safely; the message says why and what to do."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8 with ``\\n`` newlines) to ``path`` through a fsynced
    temporary file in the same directory and a rename, then fsync the directory: a reader sees
    the old file or the whole new one, never a part. Parents are created; the file gets
    ``open``'s mode (the umask). Concurrent writers of the same bytes are safe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path.parent))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _is_same_or_parent(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The export marker of directory ``path``, or None when it has no valid one."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT \
            or not isinstance(marker.get("files"), list):
        return None
    return marker


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Raise :class:`OutputDirError` unless ``path`` may be (re)written by an export.

    Returns the real (symlink-free, absolute) directory that will be written.
    """
    shown = os.fspath(path)
    real = _real(path)
    guarded = [(Path(real.anchor), "the filesystem root"), (_real("~"), "the home directory")]
    guarded += [(_real(p), f"the source {os.fspath(p)}") for p in protect]
    guarded += [(Path.cwd().resolve(), "the current directory")]
    for keep, name in guarded:
        if _is_same_or_parent(real, keep):
            how = "is" if real == keep else "contains"
            raise OutputDirError(f"output directory {shown} {how} {name} and is never replaced; "
                                 "choose a new directory")
    if not real.exists():
        if os.path.lexists(real):
            raise OutputDirError(f"output directory {shown} is a broken symbolic link; remove "
                                 "it or choose a new directory")
        return real
    if not real.is_dir():
        raise OutputDirError(f"output directory {shown} is a file; choose a new directory")
    entries = {e.name for e in real.iterdir()}
    if not entries:
        return real
    marker = read_marker(real)
    if marker is None:
        raise OutputDirError(f"output directory {shown} is not empty and holds no previous export; "
                             "choose a new directory or remove it yourself")
    foreign = sorted(entries - set(marker["files"]) - {MARKER})
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputDirError(f"output directory {shown} holds a previous export plus files it "
                             f"did not write ({listed}); move them out or choose a new directory")
    if not overwrite:
        raise OutputDirError(f"output directory {shown} holds a previous export; pass --overwrite "
                             "(overwrite=True) to replace it, or choose a new directory")
    return real


def _sibling(path: Path, tag: str) -> Path:
    """A new, empty directory beside ``path`` made with ``mkdir`` (so it honours the umask)."""
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _file_mode(directory: Path) -> int:
    """The mode ``open`` gives a new file in ``directory`` under the current umask."""
    probe = directory / f".mode-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def write_output_dir(path: str | os.PathLike, fill: Callable[[Path], None], *,
                     overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
                     info: Mapping[str, Any] | None = None) -> Path:
    """Write directory ``path`` with ``fill(tmp_dir)`` following the rules of this module.

    ``fill`` writes the files into an empty temporary directory; a marker listing them (and
    ``info``) is added. Returns ``path`` made absolute (symlinks kept as given).
    """
    protect = tuple(protect)
    real = check_output_dir(path, overwrite=overwrite, protect=protect)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(real, "tmp")
    old: Path | None = None
    try:
        fill(tmp)
        mode = _file_mode(tmp)
        files = sorted(e.name for e in tmp.iterdir())
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                f.chmod(mode)  # some writers (e.g. safetensors) create private files
        marker = {"format": MARKER_FORMAT, **dict(info or {}), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # Check again just before the swap: the directory may have changed while filling.
        check_output_dir(path, overwrite=overwrite, protect=protect)
        if real.is_dir() and any(real.iterdir()):
            old = _sibling(real, "old")
            os.replace(real, old)  # ``old`` is empty, so this is a plain rename
            try:
                os.replace(tmp, real)
            except BaseException:
                os.replace(old, real)
                old = None
                raise
        else:
            os.replace(tmp, real)  # replaces an empty directory, fails on a non-empty one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.is_dir() and not any(old.iterdir()):
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Path(path).expanduser().absolute()
