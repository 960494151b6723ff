"""SQLite is for one gateway: an exclusive lock on a file beside the database, held while it runs.

``serve`` takes the lock before anything else opens the database; a second gateway on the same file
is refused at start-up (:class:`~gateway.errors.StartupRefused`, exit code 3). The lock is an
``flock`` on ``<database>.lock``: the kernel drops it with the process however it ends (SIGKILL,
power cut on a local disk), so a restart after a crash is never refused by a stale lock. The lock
file is left in place (removing it would let a third process lock a fresh file while the second
still holds the old one). ``gateway migrate`` does not take it: migrations are transactional and
safe beside a running gateway.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from gateway.errors import StartupRefused
from gateway.settings import DatabaseSettings

log = logging.getLogger("gateway.store")


def lock_path(database: Path) -> Path:
    """The lock file beside a SQLite database (``gateway.db`` → ``gateway.db.lock``)."""
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def single_instance(settings: DatabaseSettings) -> Iterator[None]:
    """Hold the SQLite database for this process until the block ends; nothing for PostgreSQL.

    Raises StartupRefused("database", ...) when another process holds it.
    """
    if settings.kind != "sqlite" or str(settings.sqlite_path) == ":memory:":
        yield
        return
    database = settings.sqlite_path.resolve()  # one lock for every spelling of the path
    path = lock_path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: a script action's child must not inherit the lock and keep it after we die.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            refused = StartupRefused(
                "database",
                f"another gateway (pid {holder}) is using {database}: SQLite is for one instance;"
                " to run several, share a PostgreSQL database (ops/SCALING.md)",
            )
            log.error("cannot start: %s", refused)
            raise refused from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
