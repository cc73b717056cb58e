"""An exclusive, non-blocking lock on a directory's lock file, for single-writer directories.

    from distill_jax.locking import LockedError, exclusive_lock
    with exclusive_lock(part_dir / "LOCK", what="cache part 0"):
        ...  # this process is the only writer; a second one gets LockedError at once

The lock is ``fcntl.flock`` on ``path`` (created if missing), held until :meth:`FileLock.release`
or the end of the ``with`` block. The kernel drops it when the holding process dies, however it
dies (SIGKILL included), so a dead holder never blocks the next writer: there are no stale locks
to clean up. While held, the file names its holder (pid, host, start time), which a refused
process reads back into its error message.

The lock file is written in place, not by tmp + rename: a flock belongs to the file's inode, and
a rename would give the path a new, unlocked inode. For the same reason the file is never deleted.
A child made by ``fork`` (without ``exec``) shares the open file and so the lock, until it exits.
On network file systems flock is only as exclusive as the file system makes it (Linux NFSv4 maps
it to a byte-range lock; older NFS may not lock across hosts).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Iterator

__all__ = ["FileLock", "LockedError", "exclusive_lock"]


class LockedError(ValueError):
    """Another live process holds the lock; the message names it (pid, host, since when)."""


class FileLock:
    """An exclusive lock on ``path`` (``what`` names the locked thing in messages).

    ``acquire()`` raises :class:`LockedError` at once if another process (or another open of the
    same file in this process) holds it; ``release()`` lets it go. Also a context manager.
    """

    def __init__(self, path: str | os.PathLike, what: str | None = None):
        self.path = os.fspath(path)
        self.what = what or self.path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FileLock":
        """Take the lock now or raise :class:`LockedError` naming its holder; returns self."""
        if self._fd is not None:
            raise RuntimeError(f"{self.what}: lock already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            name = self.path if self.what == self.path else f"{self.what} ({self.path})"
            raise LockedError(f"{name} is in use by {holder}; wait for it to finish or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # drops the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the lock go (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the holder's details go with the lock
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:  # dropped without release(): closing the file drops the lock
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str | None = None) -> Iterator[FileLock]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; raises :class:`LockedError`
    (naming the holder) when another process holds it."""
    lock = FileLock(path, what).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):  # written at this moment, or not ours
        return {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    return f"pid {info['pid']} on host {info.get('host', '?')} since {info.get('since', '?')}"
