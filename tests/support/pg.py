"""PostgreSQL for tests: a throwaway server per session, a fresh database per test, and
stoppable servers for outage tests. Also the ``store`` fixture over both backends.

- ``pg_cluster`` (session): :class:`PgServer` started in a temp dir on a free port (initdb +
  pg_ctl as the ``postgres`` user, ~0.5 s), or :class:`ExternalPg` when ``TEST_DATABASE_URL``
  is set. Neither possible → the test FAILS saying what to install.
- ``pg_url`` (function): URL of a fresh, empty database on that cluster.
- ``pg_server_factory`` (function): ``factory() -> PgServer`` starts a SEPARATE server that a
  test may ``stop()``/``start()`` (same port, same data); all are destroyed after the test.
- ``store`` (function, parametrised ``sqlite``/``postgres``): a running, migrated store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import pytest
import trio

from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import Store

PG_BIN = Path(os.environ.get("TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
INSTALL_HINT = (
    "PostgreSQL tests need either TEST_DATABASE_URL=postgresql://user@host:port/db (a server where that"
    " user may CREATE DATABASE) or the server binaries for a throwaway instance: "
    f"`apt-get install postgresql-15` (initdb and pg_ctl in {PG_BIN}, run as user 'postgres'), "
    "or set TEST_PG_BIN to their directory."
)


# tmpfs when there is one: CREATE DATABASE copies files, several times faster in memory.
_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def psql(url: str, sql: str) -> str:
    """Run ``sql`` with psql against ``url`` (autocommit); returns stdout. Raises on error."""
    done = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql failed: {done.stderr.strip()}")
    return done.stdout


class Cluster(Protocol):
    """What ``pg_cluster`` provides."""

    def url(self, dbname: str = "postgres") -> str: ...

    def create_database(self) -> str: ...

    def drop_database(self, url: str) -> None: ...


class PgServer:
    """A throwaway PostgreSQL 15 server owned by a test.

    ``PgServer.create()`` runs initdb in a fresh temp dir and starts it on a free port;
    ``stop()`` / ``start()`` keep the port and data (for outage tests); ``destroy()`` stops it
    and removes the directory. Blocking calls: from Trio use ``await server.astop()`` /
    ``await server.astart()`` (they run in a worker thread so the event loop keeps going).
    """

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"

    @classmethod
    def create(cls, port: int | None = None) -> PgServer:
        """initdb + start; raises RuntimeError (with :data:`INSTALL_HINT`) when impossible."""
        if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
            raise RuntimeError(f"no initdb in {PG_BIN}. {INSTALL_HINT}")
        # Not under pytest's tmp dir: the postgres user must be able to reach it.
        root = Path(tempfile.mkdtemp(prefix="gw-pg-", dir=_TMP))
        shutil.chown(root, "postgres", "postgres")
        server = cls(root, port or free_port())
        try:
            server._as_postgres(
                str(PG_BIN / "initdb"),
                "-D",
                str(server.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            )
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    def _as_postgres(self, *cmd: str) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        """Start (again) on the same port; returns when it accepts connections."""
        # Durability off: a test server is thrown away, and this makes CREATE DATABASE cheap.
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``fast`` disconnects clients; ``immediate`` is a crash)."""
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        """Whether the postmaster is up."""
        return (self.data / "postmaster.pid").exists()

    async def astart(self) -> None:
        """:meth:`start` from Trio, in a worker thread."""
        await trio.to_thread.run_sync(self.start)

    async def astop(self, mode: str = "fast") -> None:
        """:meth:`stop` from Trio, in a worker thread."""
        await trio.to_thread.run_sync(self.stop, mode)

    def destroy(self) -> None:
        """Stop if running and delete the directory."""
        if self.running:
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        psql(self.url(), f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`create_database` (connections are cut)."""
        name = urlsplit(url).path.lstrip("/")
        psql(self.url(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class ExternalPg:
    """A server given by ``TEST_DATABASE_URL``: databases are created next to the given one."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, dbname: str = "postgres") -> str:
        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{dbname}"))

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        psql(self._url, f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        psql(self._url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """The session's PostgreSQL (see module docstring). Fails, never skips, when unavailable."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield ExternalPg(external)
        return
    try:
        server = PgServer.create()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot start a throwaway PostgreSQL: {exc}\n{INSTALL_HINT}", pytrace=False)
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """URL of a fresh, empty database (dropped after the test)."""
    url = pg_cluster.create_database()
    try:
        yield url
    finally:
        pg_cluster.drop_database(url)


@pytest.fixture
def pg_server_factory() -> Iterator[Callable[[], PgServer]]:
    """``factory()`` starts a separate throwaway server the test may stop and restart."""
    servers: list[PgServer] = []

    def factory() -> PgServer:
        try:
            server = PgServer.create()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            pytest.fail(f"cannot start a throwaway PostgreSQL: {exc}\n{INSTALL_HINT}", pytrace=False)
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.destroy()


def db_settings(url: str, **overrides: object) -> DatabaseSettings:
    """DatabaseSettings for tests: short timeouts and quick retries."""
    values: dict[str, object] = {
        "DATABASE_URL": url,
        "DATABASE_CONNECT_TIMEOUT": 3.0,
        "DATABASE_QUERY_TIMEOUT": 5.0,
        "DATABASE_RETRY_MIN": 0.05,
        "DATABASE_RETRY_MAX": 0.5,
        "DATABASE_POOL_MAX": 12,
    }
    values.update(overrides)
    return DatabaseSettings.model_validate(values)


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> DatabaseSettings:
    """Settings for each backend: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return db_settings(f"sqlite:///{tmp_path}/gateway.db")
    return db_settings(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(store_settings: DatabaseSettings) -> AsyncIterator[Store]:
    """A running, migrated store of each backend (``store.run`` in a background nursery)."""
    async with open_store(store_settings) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        yield st
        nursery.cancel_scope.cancel()
