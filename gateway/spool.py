"""The disk spool: where ingest commits (and acks) MQTT messages while PostgreSQL is down for long.

The broker holds unacknowledged messages only up to its queue limit (mosquitto's
``max_queued_messages``, then it drops them). After ``SPOOL_AFTER`` seconds of outage ingest
appends each batch here instead, durably (SQLite, ``synchronous=FULL``), and acks it. Ingest drains
the spool to PostgreSQL when it is back (see :mod:`gateway.ingest`).

What is kept is the message as received (topic, payload, receive time), not the rows built from
it: the drain runs them through the same :func:`gateway.ingest.store_batch` as live messages, so
they become the same readings and rejects, with the same dedupe keys and receive times.

Rows are kept in one table in arrival order (``id``). :attr:`Spool.active` is true while any row
is in it: ingest then spools every new batch too, so the spool drains in order and per-device
order holds. The file is bounded by ``SPOOL_MAX_BYTES`` (the pages its rows use; one batch may
go past it): when full, :meth:`Spool.append` refuses and ingest stops acking.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import trio

from gateway import metrics
from gateway.health import ComponentHealth
from gateway.mqtt import Inbound

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL,
    topic TEXT NOT NULL,
    topic_device TEXT,
    truncated_from INTEGER,
    payload BLOB NOT NULL
)
"""
_INSERT = "INSERT INTO spool (received_at, topic, topic_device, truncated_from, payload) VALUES (?, ?, ?, ?, ?)"
_HEAD = "SELECT id, received_at, topic, topic_device, truncated_from, payload FROM spool ORDER BY id LIMIT ?"
_DELETE = "DELETE FROM spool WHERE id <= ?"
_OLDEST = "SELECT received_at FROM spool ORDER BY id LIMIT 1"

NOT_ACKED = -1
"""The ``generation`` of a message read back from the spool: no connection acks it (it was acked
when spooled)."""


class Spool:
    """A SQLite file of messages waiting for PostgreSQL, oldest first.

    Opened by :meth:`open` (rows left by an earlier run are kept and drained), used by one ingest;
    every call runs in a worker thread, one at a time. ``health`` is the ``spool`` component:
    ``ok`` while empty, ``degraded`` while holding rows, with ``mode`` (``empty``, ``spooling``,
    ``full``), ``rows``, ``bytes`` and ``oldest`` in its detail.
    """

    def __init__(self, path: Path, max_bytes: int, health: ComponentHealth) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.health = health
        self.rows = 0
        self.bytes = 0
        self.oldest: datetime | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self._changed = trio.Event()  # set (and replaced) whenever rows are added or removed

    @property
    def active(self) -> bool:
        """True while the spool holds rows: new batches go to it, behind them."""
        return self.rows > 0

    @property
    def full(self) -> bool:
        """True at ``max_bytes``: :meth:`append` refuses until the drain makes room."""
        return self.bytes >= self.max_bytes

    async def open(self) -> None:
        """Open (or create) the file and count what it holds."""

        def connect() -> sqlite3.Connection:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an acked message must survive a power cut
            conn.execute(_SCHEMA)
            return conn

        self._conn = await trio.to_thread.run_sync(connect)

        def count(conn: sqlite3.Connection) -> None:
            self.rows = int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])  # once: then kept
            self._refresh(conn)

        await self._call(count)

    async def aclose(self) -> None:
        """Close the file (its rows stay for the next start)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    await trio.to_thread.run_sync(conn.close)

    async def append(self, batch: Sequence[Inbound]) -> bool:
        """Commit ``batch`` durably behind the rows already here; False (nothing written) when full."""
        if self.full:
            self._show()
            return False
        rows = [(m.received_at.isoformat(), m.topic, m.topic_device, m.truncated_from, m.payload) for m in batch]

        def insert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, rows)
            self.rows += len(rows)
            self._refresh(conn)

        await self._call(insert)
        metrics.SPOOL_SPOOLED.inc(len(batch))
        return True

    async def head(self, limit: int) -> tuple[int, list[Inbound]]:
        """The oldest ``limit`` messages, and the id to pass to :meth:`remove` once they are stored."""

        def read(conn: sqlite3.Connection) -> list[tuple[int, str, str, str | None, int | None, bytes]]:
            return list(conn.execute(_HEAD, (limit,)))

        rows = await self._call(read)
        last = rows[-1][0] if rows else 0
        return last, [_inbound(r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def remove(self, upto: int) -> None:
        """Delete the messages up to id ``upto`` (stored in PostgreSQL)."""

        def delete(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                deleted = conn.execute(_DELETE, (upto,)).rowcount
            self.rows -= deleted
            self._refresh(conn)

        await self._call(delete)

    async def changed(self) -> None:
        """Wait until rows are next added or removed."""
        await self._changed.wait()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("the spool is not open")
            result = await trio.to_thread.run_sync(fn, conn)
        self._show()
        self._changed.set()
        self._changed = trio.Event()
        return result

    def _refresh(self, conn: sqlite3.Connection) -> None:
        """Used bytes and the oldest receive time (in the worker thread; each a constant-time read)."""
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self.bytes = (pages - free) * size
        oldest = conn.execute(_OLDEST).fetchone()
        self.oldest = datetime.fromisoformat(oldest[0]) if oldest else None

    def _show(self) -> None:
        """Mirror the counts into metrics and the ``spool`` component."""
        full = self.full and self.active
        metrics.SPOOL_ROWS.set(self.rows)
        metrics.SPOOL_BYTES.set(self.bytes)
        metrics.SPOOL_FULL.set(1 if full else 0)
        mode = "full" if full else "spooling" if self.active else "empty"
        oldest = self.oldest.isoformat().replace("+00:00", "Z") if self.oldest else None
        self.health.detail.update(mode=mode, rows=self.rows, bytes=self.bytes, oldest=oldest)
        if self.active:
            why = "full: ingest stops acking (SPOOL_MAX_BYTES)" if full else "holding messages for PostgreSQL"
            self.health.set("degraded", f"spool {why}", code="spool_full" if full else "spool_active")
        else:
            self.health.set("ok")


def _inbound(
    received_at: str, topic: str, topic_device: str | None, truncated_from: int | None, payload: bytes
) -> Inbound:
    return Inbound(
        topic, payload, datetime.fromisoformat(received_at), 0, 0, False, NOT_ACKED, topic_device, truncated_from
    )
