"""Inter-process file locks (``fcntl.flock``) for set-up and writes that must not interleave.

Two sr1 commands started at the same moment on a fresh ``SR1_HOME`` would otherwise race in
MLflow's sqlite table creation and in the DuckDB store's migrations. ``file_lock(path)`` takes
an exclusive lock on ``path`` (created if missing, never deleted: deleting a lock file while
another process waits on it would let a third one in), waiting up to ``timeout`` seconds
(``SR1_LOCK_TIMEOUT`` overrides the default) and then raising an :class:`Sr1Error` that names the
lock file. The lock is re-entrant within a process and serialises its threads, so nested
``with file_lock(p)`` blocks and threads sharing a store never deadlock on themselves.

The kernel drops a flock when its process exits, however it exits: a crashed holder never
leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sr1.errors import Sr1Error

DEFAULT_TIMEOUT_S = 120.0

_registry_guard = threading.Lock()
# lock path -> [thread lock serialising this process's users, open fd or None, depth]
_held: dict[str, list] = {}


def _forget_after_fork() -> None:
    # A forked child (a DataLoader worker, ...) does not hold its parent's locks: it must not
    # think it does, nor unlock the open file description it shares with the parent.
    global _registry_guard, _held
    _registry_guard = threading.Lock()
    _held = {}


os.register_at_fork(after_in_child=_forget_after_fork)


def default_timeout() -> float:
    """``SR1_LOCK_TIMEOUT`` (seconds) if set to a number, else 120."""
    raw = os.environ.get("SR1_LOCK_TIMEOUT")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
    return DEFAULT_TIMEOUT_S


class LockTimeout(Sr1Error):
    """Another process held the lock file for longer than the timeout."""


def _entry(key: str) -> list:
    with _registry_guard:
        e = _held.get(key)
        if e is None:
            e = _held[key] = [threading.RLock(), None, 0]
        return e


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str], timeout: float | None = None, what: str | None = None
) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block; yields the lock path.

    ``what`` names what the lock protects in the timeout message (e.g. "the DuckDB store").
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = str(p.resolve())
    limit = max(0.0, default_timeout() if timeout is None else timeout)
    deadline = time.monotonic() + limit
    entry = _entry(key)
    tlock: threading.RLock = entry[0]
    if not tlock.acquire(timeout=limit):
        raise _timeout_error(p, limit, what)
    try:
        if entry[2] == 0:
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                delay = 0.01
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise _timeout_error(p, limit, what) from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.2)
            except BaseException:
                os.close(fd)
                raise
            entry[1] = fd
        entry[2] += 1
        try:
            yield p
        finally:
            entry[2] -= 1
            if entry[2] == 0:
                fd, entry[1] = entry[1], None
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)
    finally:
        tlock.release()


def _timeout_error(p: Path, limit: float, what: str | None) -> LockTimeout:
    return LockTimeout(
        f"could not lock {p}{f' ({what})' if what else ''} within {limit:g} s: "
        "another process holds it",
        hint="wait for the other sr1 command to finish (see `sr1 runs list`), or raise "
        "SR1_LOCK_TIMEOUT (seconds)",
    )
