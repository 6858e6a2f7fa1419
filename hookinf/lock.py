"""The writer lock of a gradient store: one writer at a time, named when it refuses another, never left stuck.

A writer holds an exclusive ``flock`` on ``writer.lock`` in the store's directory from the moment it opens the store
for writing until it closes it, and writes its pid, host and start time into that file. A second writer — another
process, or a second logger in the same process — is refused at once with a :class:`~hookinf.errors.StoreError`
naming the holder. The kernel drops the lock when its holder exits or is killed (``SIGKILL`` included), so a crashed
run never leaves the store locked: the next writer proceeds (and the stale pid in the file is simply overwritten).
Children forked while the lock is held (e.g. data-loader workers) close their copy of it at once, so a worker that
outlives a killed writer does not keep the store locked. Readers take no lock.

The lock is per file, not per store: a future writer of one part of a store (one rank of a distributed run) can lock
a part's own file beside it. Where ``fcntl`` does not exist (Windows) there is no lock: run one writer per store.
``flock`` on a network file system is only as good as that file system's locking (NFSv4 supports it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import weakref
from pathlib import Path
from types import ModuleType

from hookinf.errors import StoreError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_FILE = "writer.lock"

_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class WriterLock:
    """An exclusive lock on a file, held until :meth:`release` (or until the holding process ends).

    Get one with :meth:`acquire`.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, name: str = LOCK_FILE) -> WriterLock:
        """Takes the lock file ``directory / name`` without waiting, and writes this process's name into it.

        Args:
            directory: the store's directory (it must exist).
            name: the lock file's name.

        Returns:
            The held lock.

        Raises:
            StoreError: another writer holds the lock (the message names its pid and host), or the lock file
                cannot be opened or locked.
        """
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise StoreError(
                f"{directory}: cannot open the store's writer lock {path} ({err.strerror or err}); the directory must "
                f"be writable to log into it."
            ) from err
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                holder = _holder(fd)
                os.close(fd)
                raise StoreError(
                    f"{directory}: another writer is logging into this store ({holder}; lock file {path}). Two "
                    f"writers would overwrite each other's shards: wait for it to finish, or stop it (a writer that "
                    f"exits or is killed releases the lock) — or log into another directory."
                ) from err
            except OSError as err:
                os.close(fd)
                raise StoreError(f"{directory}: cannot lock {path} ({err.strerror or err}).") from err
        lock = cls(path, fd)
        _HELD.add(lock)
        with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not stop a resume
            _write_holder(fd)
        return lock

    @property
    def held(self) -> bool:
        """Whether this process still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Releases the lock (idempotent). The lock file stays, with the last holder's name in it."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child may still share the open file
        finally:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a store dropped without close() must not keep its store locked
            self.release()

    def __repr__(self) -> str:
        return f"WriterLock({str(self.path)!r}, held={self.held})"


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    data = json.dumps(record).encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def _holder(fd: int) -> str:
    """Who holds the lock, as written in the lock file (``pid 123 on host h since ...``)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {int(record['pid'])} on host {record['host']}, since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _close_in_child() -> None:
    """After a fork: the child drops its copy of every held lock (without unlocking the parent's)."""
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        _HELD.discard(lock)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
