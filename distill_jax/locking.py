"""An exclusive, non-blocking lock on a file, held for the life of a process's work.

``fcntl.flock`` locks belong to the open file, so the kernel drops them when the holder exits,
however it exits (SIGKILL included): a dead holder never leaves a stale lock. The holder writes
``pid host start-time`` into the file so that a refused process can say who holds it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket


class LockedError(ValueError):
    """The lock is held by another process."""


class ExclusiveLock:
    """``with ExclusiveLock(path, "run directory"):`` or ``acquire()`` / ``release()``;
    ``acquire`` raises :class:`LockedError` naming the holder instead of waiting."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = os.fspath(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "ExclusiveLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host, since = (holder + ["?", "?", "?"])[:3]
            raise LockedError(f"{self.what} {self.path} is in use by pid {pid} on host {host} "
                              f"since {since}; wait for it to finish or stop it") from None
        start = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {start}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
