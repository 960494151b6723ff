"""The embedded store: stdlib sqlite3, driven from Trio worker threads.

One writer connection and a ``CapacityLimiter(1)`` make this process the single writer, so every
write is serialised and event ids trivially grow in commit order. API reads (and the backlog
count) run on their own read-only connections and threads (``_READERS`` of them): WAL lets a
reader keep its snapshot while the writer commits, so a slow query never delays a stored
reading. Times are fixed-width UTC text and JSON is text (see the migration).
Each call runs under a time limit (``DATABASE_QUERY_TIMEOUT``; ``API_QUERY_TIMEOUT`` for API
reads), enforced inside SQLite by each connection's progress handler (a worker thread cannot be
cancelled), and lock waits are bounded by ``busy_timeout``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import trio

from gateway.errors import QueryTimeout, StoreCorrupt, StoreRefused, StoreUnavailable
from gateway.health import ComponentHealth
from gateway.jsonenc import dumps, loads
from gateway.rollups import (
    SQLITE_BACKFILL,
    SQLITE_PENDING,
    SQLITE_RAW_READ,
    SQLITE_ROLLUP,
    SQLITE_ROLLUP_READ,
    Aggregate,
    AggregateQuery,
    Bucket,
    rollup_interval,
    sync_plan,
)
from gateway.safetext import safe_json, safe_text
from gateway.settings import DatabaseSettings
from gateway.store import migrate as _migrate
from gateway.store._common import Deduped, by_message, json_text, now_utc, require_messages, ts_parse, ts_text
from gateway.store._query import SQLITE, PageRead, mark_degraded, mark_ok, message_page, new_health, reject_page
from gateway.store.base import (
    Backlog,
    CompletionPublishes,
    Event,
    EventsByMessage,
    Failure,
    InsertOutcome,
    MessageQuery,
    Migration,
    NewEvent,
    NewMessage,
    NewPublish,
    NewReject,
    OutboxItem,
    OutboxStats,
    Page,
    Partitions,
    PruneTable,
    PublishBuilder,
    PublishFailure,
    RefusedReject,
    RejectSelection,
    ReplayedReject,
    StoredMessage,
    StoredReject,
)

T = TypeVar("T")
_Leased = TypeVar("_Leased", StoredMessage, OutboxItem)

_MSG_COLS = (
    "id, device_id, device_ts, received_at, seq, measurements, status, battery, source,"
    " processed_at, attempts, last_error, dead_at, schema_version"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (device_id, dedupe_key, device_ts, received_at, seq, measurements, status,"
    " battery, source, topic, schema_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id, dedupe_key) DO NOTHING"
)
_LAST_MESSAGE_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
_SELECT_DUPLICATE = "SELECT id FROM messages WHERE device_id = ? AND dedupe_key = ?"
_INSERT_REJECT = (
    "INSERT INTO rejects (received_at, source, topic, payload, reason, errors, schema_version)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_CLAIM = (
    f"UPDATE messages SET lease_owner = ?, lease_until = ? WHERE id IN ("
    " SELECT id FROM messages WHERE processed_at IS NULL AND dead_at IS NULL"
    " AND (lease_until IS NULL OR lease_until < ?) AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
    f" ORDER BY id LIMIT ?) RETURNING {_MSG_COLS}"
)
_MARK_PROCESSED = (
    "UPDATE messages SET processed_at = ?, lease_owner = NULL, lease_until = NULL"
    " WHERE id IN (SELECT value FROM json_each(?)) AND lease_owner = ? RETURNING id"
)
_MARK_FAILED = (
    "UPDATE messages SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,"
    " dead_at = CASE WHEN ? IS NULL THEN ? END, lease_owner = NULL, lease_until = NULL"
    " WHERE id = ? AND lease_owner = ?"
)
_INSERT_EVENT = "INSERT INTO events (type, data, created_at, device_id, message_id) VALUES (?, ?, ?, ?, ?)"
_LAST_EVENT_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
_EVENT_COLS = "id, type, data, created_at, device_id, message_id"
_REJECT_COLS = "id, received_at, source, topic, payload, reason, errors, schema_version, replayed_at, message_id"
# A replay's chunk: by ids (a JSON array), or by receive window and reason; ids above the cursor.
_SELECT_REJECTS = (
    f"SELECT {_REJECT_COLS} FROM rejects WHERE id > ?"
    " AND (? IS NULL OR id IN (SELECT value FROM json_each(?)))"
    " AND (? IS NULL OR received_at >= ?) AND (? IS NULL OR received_at < ?) AND (? IS NULL OR reason = ?)"
    " ORDER BY id LIMIT ?"
)
_MARK_REPLAYED = "UPDATE rejects SET replayed_at = ?, message_id = ?, schema_version = ? WHERE id = ?"
_REJECT_AGAIN = "UPDATE rejects SET reason = ?, errors = ?, schema_version = ? WHERE id = ?"
# Each device's newest message at a cost per device, not per row: the recursive CTE steps from
# one device to the next in messages_device_ts, the inner lookup reads that device's newest entry
# from the same index (which holds the rowid, so "device_ts DESC, id DESC" needs no sort).
_LATEST_PER_DEVICE = f"""
WITH RECURSIVE devices(device_id) AS (
    SELECT (SELECT device_id FROM messages ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT m.device_id FROM messages m WHERE m.device_id > d.device_id ORDER BY m.device_id LIMIT 1)
    FROM devices d WHERE d.device_id IS NOT NULL
)
SELECT {_MSG_COLS} FROM messages WHERE id IN (
    SELECT (SELECT m.id FROM messages m WHERE m.device_id = d.device_id ORDER BY m.device_ts DESC, m.id DESC LIMIT 1)
    FROM devices d WHERE d.device_id IS NOT NULL
)
ORDER BY device_ts DESC, id DESC
LIMIT ?
"""
_BACKLOG = (
    "SELECT count(*), (SELECT received_at FROM messages WHERE processed_at IS NULL AND dead_at IS NULL"
    " ORDER BY id LIMIT 1), (SELECT count(*) FROM messages WHERE dead_at IS NOT NULL)"
    " FROM messages WHERE processed_at IS NULL AND dead_at IS NULL"
)

# The writer's durability (see _connect; lease-only writes opt out in _transaction).
_SYNCHRONOUS = "FULL"
# Read-only connections beside the writer: API reads wait for each other, never for the writer.
_READERS = 2
# DELETE of the oldest expired rows, one batch per transaction (the writer is held briefly).
_PRUNE = {
    "events": "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ? ORDER BY id LIMIT ?)",
    "rejects": "DELETE FROM rejects WHERE id IN (SELECT id FROM rejects WHERE received_at < ? ORDER BY id LIMIT ?)",
    "messages": (
        "DELETE FROM messages WHERE id IN (SELECT id FROM messages"
        " WHERE received_at < ? AND processed_at IS NOT NULL ORDER BY id LIMIT ?)"
    ),
}

_OUTBOX_COLS = "id, payload, subtopic, attempts, created_at, message_id, event_id"
_INSERT_OUTBOX = "INSERT INTO outbox (created_at, subtopic, payload, message_id, event_id) VALUES (?, ?, ?, ?, ?)"
_CLAIM_OUTBOX = (
    "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE id IN ("
    " SELECT id FROM outbox WHERE dead_at IS NULL AND (lease_until IS NULL OR lease_until < ?)"
    " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
    f" ORDER BY id LIMIT ?) RETURNING {_OUTBOX_COLS}"
)
_RENEW_OUTBOX = "UPDATE outbox SET lease_until = ? WHERE lease_owner = ? AND dead_at IS NULL"
_RELEASE_OUTBOX = "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?"
_OUTBOX_FAILED = (
    "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, dead_at = ?,"
    " lease_owner = NULL, lease_until = NULL WHERE id = ?"
)
_OUTBOX_STATS = (
    "SELECT count(*), (SELECT created_at FROM outbox WHERE dead_at IS NULL ORDER BY id LIMIT 1),"
    " (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL) FROM outbox WHERE dead_at IS NULL"
)

# sqlite3 error texts that mean "the query (or schema) is wrong", not "try again later".
_CORRUPT_HINTS = ("no such table", "no such column", "syntax error", "malformed", "not a database")


class SqliteStore:
    """:class:`~gateway.store.base.Store` on a SQLite file (``DATABASE_URL=sqlite:///PATH``).

    The connection opens on first use (so ``migrate()`` works without ``run()``); ``run()``
    opens it, migrates, and closes it when cancelled.
    """

    kind = "sqlite"

    def __init__(self, settings: DatabaseSettings, health: ComponentHealth | None = None) -> None:
        self._settings = settings
        self._path = settings.sqlite_path
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._deadline = math.inf
        self._readers: list[_Reader] = []  # idle reader connections
        self._read_limiter = trio.CapacityLimiter(_READERS)
        self.health = new_health(health)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, apply migrations, report started, then wait. Runs until cancelled.

        Raises StoreUnavailable when the file cannot be opened, StoreCorrupt on a bad migration.
        """
        try:
            await self.migrate()
            self._set_ok()
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (they reopen on next use)."""
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)
        # Hold every reader slot, so no read is using a connection while they close.
        tokens = [object() for _ in range(_READERS)]
        for token in tokens:
            await self._read_limiter.acquire_on_behalf_of(token)
        try:
            for reader in self._readers:
                reader.conn.close()
            self._readers.clear()
        finally:
            for token in tokens:
                self._read_limiter.release_on_behalf_of(token)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if str(self._path) != ":memory:":
                self._path.parent.mkdir(parents=True, exist_ok=True)
            # FULL: in WAL mode NORMAL can lose a committed (already acked) transaction on power loss.
            pragmas = ("PRAGMA journal_mode=WAL", f"PRAGMA synchronous={_SYNCHRONOUS}")
            self._conn = self._open(pragmas, self._over_deadline)
        return self._conn

    def _open_reader(self) -> _Reader:
        reader = _Reader(self._open(("PRAGMA query_only=1",), None))
        reader.conn.set_progress_handler(reader.over_deadline, 10_000)
        return reader

    def _open(self, pragmas: tuple[str, ...], progress: Callable[[], int] | None) -> sqlite3.Connection:
        """A connection to the database with ``pragmas``, the busy timeout and a deadline check."""
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(
            self._path, timeout=self._settings.query_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            for pragma in pragmas:
                conn.execute(pragma)
            conn.execute(f"PRAGMA busy_timeout={int(self._settings.query_timeout * 1000)}")
            if progress is not None:
                conn.set_progress_handler(progress, 10_000)
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_work(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> Callable[[], T]:
        """``fn`` on an idle reader connection (opened when none is idle), in one read
        transaction: one snapshot for all its statements."""

        def work() -> T:
            # The limiter admits at most _READERS threads, so pop/append never run short.
            reader = self._readers.pop() if self._readers else self._open_reader()
            reader.deadline = time.monotonic() + timeout
            try:
                reader.conn.execute("BEGIN")
                return fn(reader.conn)
            finally:
                reader.deadline = math.inf
                if reader.conn.in_transaction:
                    reader.conn.execute("ROLLBACK")
                self._readers.append(reader)

        return work

    def _over_deadline(self) -> int:
        # Non-zero aborts the running statement with OperationalError("interrupted").
        return 1 if time.monotonic() > self._deadline else 0

    async def _call(
        self, fn: Callable[[sqlite3.Connection], T], *, read: bool = False, seconds: float | None = None
    ) -> T:
        """Run ``fn`` with the connection in the worker thread, translating sqlite3 errors.

        ``read=True``: on a reader connection (beside the writer), under ``seconds`` (default
        ``API_QUERY_TIMEOUT``); running out of time raises QueryTimeout.
        """
        if seconds is None:
            seconds = self._settings.api_query_timeout if read else self._settings.query_timeout
        timeout = seconds

        def work() -> T:
            conn = self._connect()
            self._deadline = time.monotonic() + timeout
            try:
                return fn(conn)
            finally:
                self._deadline = math.inf

        try:
            if read and str(self._path) != ":memory:":  # a memory database has one connection
                result = await trio.to_thread.run_sync(self._read_work(fn, timeout), limiter=self._read_limiter)
            else:
                result = await trio.to_thread.run_sync(work, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if any(hint in text for hint in _CORRUPT_HINTS):
                raise StoreCorrupt(f"sqlite: {text}") from exc
            if text == "interrupted":
                text = f"query took longer than {timeout:g} s"
                if read:  # one slow query; the database itself is fine
                    raise QueryTimeout(text) from exc
            self._set_degraded(text)
            raise StoreUnavailable(f"sqlite: {text}") from exc
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"sqlite: {exc}") from exc
        except OSError as exc:
            self._set_degraded(str(exc))
            raise StoreUnavailable(f"sqlite: cannot open {self._path}: {exc.strerror or exc}") from exc
        if self.health.state != "ok":
            self._set_ok()
        return result

    def _set_ok(self) -> None:
        mark_ok(self.health)

    def _set_degraded(self, error: str) -> None:
        mark_degraded(self.health, error)

    # -- migrations ----------------------------------------------------------------------

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations in order, each in a transaction, then make the kept rollup
        intervals those of ``ROLLUP_INTERVALS`` (backfilling new ones); returns the migrations
        applied now."""
        files = _migrate.load_migrations("sqlite")

        def apply(conn: sqlite3.Connection) -> list[Migration]:
            # Migrations may rewrite whole tables (0002 on 1M rows: ~9 s here): allow them longer
            # than a query, as on PostgreSQL.
            self._deadline = time.monotonic() + self._settings.query_timeout * 10
            conn.execute(_migrate.BOOTSTRAP["sqlite"])
            done: list[Migration] = []
            for mig in files:
                with _transaction(conn):
                    row = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (mig.version,))
                    if row.fetchone():
                        continue
                    for statement in _statements(mig.sql):
                        conn.execute(statement)
                    at = now_utc()
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (mig.version, mig.name, ts_text(at)),
                    )
                done.append(Migration(mig.version, mig.name, at))
            _sync_rollups(conn, self._settings.rollup_intervals)
            return done

        return await self._call(apply)

    async def migration_status(self) -> list[Migration]:
        """Every known migration, with ``applied_at`` for the applied ones."""
        files = _migrate.load_migrations("sqlite")

        def read(conn: sqlite3.Connection) -> dict[int, tuple[str, datetime]]:
            conn.execute(_migrate.BOOTSTRAP["sqlite"])
            rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
            return {v: (n, ts_parse(a)) for v, n, a in rows}

        return _migrate.merge_status(files, await self._call(read))

    # -- operations ----------------------------------------------------------------------

    async def ping(self) -> None:
        """A round trip to the database file."""
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    async def write_batch(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        """Insert messages (idempotently) and rejects in one transaction; one outcome per message.

        One worker-thread hop: the rows are built in the thread (the event loop stays free) and
        inserted with ``executemany``.
        """
        if not messages and not rejects:
            return []
        batch = Deduped(messages)

        def write(conn: sqlite3.Connection) -> list[InsertOutcome]:
            try:
                msg_rows = _message_rows(batch.unique)
                rej_rows = [
                    (
                        ts_text(r.received_at),
                        r.source,
                        r.topic and safe_text(r.topic),
                        r.payload,
                        r.reason,
                        safe_json(r.errors),
                        r.schema_version,
                    )
                    for r in rejects
                ]
                with _transaction(conn):
                    unique = _insert_messages(conn, msg_rows) if msg_rows else []
                    if rej_rows:
                        conn.executemany(_INSERT_REJECT, rej_rows)
            except (sqlite3.DataError, sqlite3.IntegrityError, OverflowError, ValueError) as exc:
                # Rolled back; a value of some row cannot be stored (the caller isolates it).
                raise StoreRefused(f"sqlite refused a value: {type(exc).__name__}: {exc}") from exc
            return batch.outcomes(unique)

        return await self._call(write)

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        """Lease up to ``limit`` due, unprocessed, not dead messages (oldest first) to ``owner``."""

        return await self._lease(_CLAIM, _message, owner, limit, lease_seconds)

    async def complete(
        self,
        owner: str,
        processed: list[int],
        failed: list[Failure],
        events: list[NewEvent],
        publishes: CompletionPublishes | None = None,
    ) -> EventsByMessage:
        """Mark processed/failed, append events and outbox rows, only for messages still leased to
        ``owner``; returns those messages → their events."""
        require_messages(events)

        rollups = bool(self._settings.rollup_intervals)

        def complete(conn: sqlite3.Connection) -> EventsByMessage:
            now = ts_text(now_utc())
            with _transaction(conn):
                owned: set[int] = set()
                if processed:
                    rows = conn.execute(_MARK_PROCESSED, (now, json.dumps(processed), owner)).fetchall()
                    owned.update(r[0] for r in rows)
                    if rollups and rows:
                        # In the transaction that marks them: counted once, whatever crashes.
                        conn.execute(SQLITE_ROLLUP, (json.dumps([r[0] for r in rows]),))
                for f in failed:
                    retry = ts_text(f.retry_at) if f.retry_at is not None else None
                    cur = conn.execute(_MARK_FAILED, (f.error, retry, retry, now, f.message_id, owner))
                    if cur.rowcount:
                        owned.add(f.message_id)
                appended = _append(conn, [e for e in events if e.message_id in owned])
                stored = by_message(processed, failed, owned, appended)
                if publishes is not None:
                    _enqueue(conn, [p for p in publishes(stored) if p.message_id is None or p.message_id in owned])
                return stored

        return await self._call(complete)

    async def append_events(self, events: list[NewEvent], publishes: PublishBuilder | None = None) -> list[Event]:
        """Append events not tied to a lease (alerts) and their outbox rows; returns the events with ids."""

        def append(conn: sqlite3.Connection) -> list[Event]:
            with _transaction(conn):
                stored = _append(conn, events)
                if publishes is not None:
                    _enqueue(conn, publishes(stored))
                return stored

        if not events:
            return []
        return await self._call(append)

    async def read_events(
        self,
        after_id: int,
        limit: int,
        types: frozenset[str] | None = None,
        device_id: str | None = None,
    ) -> list[Event]:
        """Events with ``id > after_id`` in id order, optionally filtered by type and device."""
        where = ["id > ?"]
        params: list[Any] = [after_id]
        if types is not None:
            where.append("type IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(sorted(types)))
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        sql = f"SELECT {_EVENT_COLS} FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        params.append(limit)
        rows = await self._call(lambda conn: conn.execute(sql, params).fetchall())
        out = []
        for r in rows:
            raw = r[2].encode()
            out.append(Event(r[0], r[1], loads(raw), ts_parse(r[3]), r[4], raw, None, r[5]))
        return out

    async def event_bounds(self) -> tuple[int, int]:
        """(oldest kept id, newest id); (0, 0) when there are none."""
        row = await self._call(lambda conn: conn.execute("SELECT min(id), max(id) FROM events").fetchone())
        return (row[0], row[1]) if row[0] is not None else (0, 0)

    async def prune_events(self, older_than: datetime) -> int:
        """Delete events created before ``older_than``; returns how many."""

        return await self.prune("events", older_than, 2**62)

    async def prune(self, table: PruneTable, older_than: datetime, limit: int) -> int:
        """Delete up to ``limit`` of the oldest expired rows of ``table``; returns how many."""

        def prune(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                return conn.execute(_PRUNE[table], (ts_text(older_than), limit)).rowcount

        return await self._call(prune)

    async def maintain_partitions(self, now: datetime, older_than: datetime | None, limit: int) -> Partitions:
        """SQLite has no partitions: retention is the batched delete (:meth:`prune`)."""
        return Partitions()

    async def query_messages(self, query: MessageQuery) -> Page:
        """A page of messages, newest first, with the total matching and the next cursor.

        Raises ValueError for a malformed cursor, a limit below 1 or a value without a key.
        """
        read = message_page(SQLITE, query, _MSG_COLS, self._settings.api_total_limit)
        total, rows = await self._call(partial(_read_page, read), read=True)
        return read.page(total, rows, _message)

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One message by id, or None."""
        sql = f"SELECT {_MSG_COLS} FROM messages WHERE id = ?"
        row = await self._call(lambda conn: conn.execute(sql, (message_id,)).fetchone(), read=True)
        return _message(row) if row is not None else None

    async def latest_per_device(self, limit: int) -> list[StoredMessage]:
        """Each device's newest message, at most ``limit`` devices, newest first (see Store)."""
        rows = await self._call(
            lambda conn: conn.execute(_LATEST_PER_DEVICE, (limit,)).fetchall(),
            read=True,
            seconds=self._settings.query_timeout,
        )
        return [_message(r) for r in rows]

    async def query_rejects(self, limit: int, cursor: str | None = None) -> Page:
        """A page of rejects, newest first. Raises ValueError for a malformed cursor."""
        read = reject_page(SQLITE, limit, cursor, _REJECT_COLS, self._settings.api_total_limit)
        total, rows = await self._call(partial(_read_page, read), read=True)
        return read.page(total, rows, _reject)

    async def aggregate(self, query: AggregateQuery) -> Aggregate:
        """Buckets from the rollups when they cover the range, else from the raw rows (one read
        snapshot). Raises ValueError for an empty or too long range."""
        start, end = query.span()
        interval = rollup_interval(query.bucket, self._settings.rollup_intervals)
        if query.source == "raw":
            interval = None
        params = {
            "bucket": query.bucket,
            "interval": interval,
            "device": query.device_id,
            "m": query.measurement,
            "start": ts_text(start),
            "end": ts_text(end),
        }

        def read(conn: sqlite3.Connection) -> Aggregate:
            if interval is not None and not conn.execute(SQLITE_PENDING, params).fetchone()[0]:
                rows = conn.execute(SQLITE_ROLLUP_READ, params).fetchall()
                return Aggregate("rollup", [_bucket(r) for r in rows], interval)
            return Aggregate("raw", [_bucket(r) for r in conn.execute(SQLITE_RAW_READ, params).fetchall()])

        return await self._call(read, read=True)

    async def backlog(self) -> Backlog:
        """How many messages wait (and the oldest arrival), and how many are dead."""
        count, oldest, dead = await self._call(
            lambda conn: conn.execute(_BACKLOG).fetchone(), read=True, seconds=self._settings.query_timeout
        )
        return Backlog(count, ts_parse(oldest) if oldest else None, dead)

    async def select_rejects(self, selection: RejectSelection, limit: int) -> list[StoredReject]:
        """Up to ``limit`` rejects of ``selection``, oldest id first."""
        sel = selection
        ids = json.dumps(list(sel.ids)) if sel.ids is not None else None
        start = ts_text(sel.start_time) if sel.start_time is not None else None
        end = ts_text(sel.end_time) if sel.end_time is not None else None
        params = (sel.after_id, ids, ids, start, start, end, end, sel.reason, sel.reason, limit)
        rows = await self._call(lambda conn: conn.execute(_SELECT_REJECTS, params).fetchall())
        return [_reject(r) for r in rows]

    async def replay_rejects(self, replayed: list[ReplayedReject], refused: list[RefusedReject]) -> list[InsertOutcome]:
        """Store the readings of ``replayed`` and mark their rejects; refresh ``refused``; in one
        transaction."""
        batch = Deduped([r.message for r in replayed])

        def replay(conn: sqlite3.Connection) -> list[InsertOutcome]:
            now = ts_text(now_utc())
            try:
                rows = _message_rows(batch.unique)
                again = [
                    (r.reject.reason, safe_json(r.reject.errors), r.reject.schema_version, r.reject_id) for r in refused
                ]
                with _transaction(conn):
                    outcomes = batch.outcomes(_insert_messages(conn, rows)) if rows else []
                    marks = [
                        (now, o.id, r.message.schema_version, r.reject_id)
                        for r, o in zip(replayed, outcomes, strict=True)
                    ]
                    conn.executemany(_MARK_REPLAYED, marks)
                    conn.executemany(_REJECT_AGAIN, again)
            except (sqlite3.DataError, sqlite3.IntegrityError, OverflowError, ValueError) as exc:
                raise StoreRefused(f"sqlite refused a value: {type(exc).__name__}: {exc}") from exc
            return outcomes

        return await self._call(replay)

    async def watch(
        self,
        on_message: Callable[[], None],
        on_event: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Only this process writes, so there is nothing to hear: report started and wait."""
        task_status.started()
        await trio.sleep_forever()

    # -- outbox --------------------------------------------------------------------------

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Lease up to ``limit`` due, not dead outbox rows (oldest first) to ``owner``."""

        return await self._lease(_CLAIM_OUTBOX, _outbox_item, owner, limit, lease_seconds)

    async def _lease(
        self, sql: str, row: Callable[[Any], _Leased], owner: str, limit: int, lease_seconds: float
    ) -> list[_Leased]:
        """Run a claim statement (owner, lease end, now, now, limit) and return its rows by id."""

        def claim(conn: sqlite3.Connection) -> list[_Leased]:
            now = now_utc()
            now_text, until = ts_text(now), ts_text(now + timedelta(seconds=lease_seconds))
            with _transaction(conn, durable=False):  # a lost lease is only claimed again
                rows = conn.execute(sql, (owner, until, now_text, now_text, limit)).fetchall()
            return sorted((row(r) for r in rows), key=lambda item: item.id)

        if limit < 1:
            return []
        return await self._call(claim)

    async def renew_outbox(self, owner: str, lease_seconds: float) -> int:
        """Extend every lease ``owner`` holds; returns how many."""
        until = ts_text(now_utc() + timedelta(seconds=lease_seconds))
        return await self._write(_RENEW_OUTBOX, (until, owner), durable=False)

    async def release_outbox(self, owner: str) -> int:
        """Drop every lease ``owner`` holds; returns how many."""
        return await self._write(_RELEASE_OUTBOX, (owner,), durable=False)

    async def outbox_done(self, ids: list[int]) -> None:
        """Delete rows the broker confirmed."""
        if ids:
            # Not durable: a row a power loss brings back is sent again (at least once).
            sql = "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))"
            await self._write(sql, (json.dumps(ids),), durable=False)

    async def outbox_failed(self, failures: list[PublishFailure]) -> None:
        """Record refusals (attempts+1, last_error, retry time or dead); releases the leases."""
        now = ts_text(now_utc())
        rows = [
            (f.error, ts_text(f.retry_at) if f.retry_at else None, None if f.retry_at else now, f.id) for f in failures
        ]

        def record(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(_OUTBOX_FAILED, rows)

        if rows:
            await self._call(record)

    async def outbox_stats(self) -> OutboxStats:
        """How many publishes wait (and since when) and how many are dead-lettered."""
        pending, oldest, dead = await self._call(lambda conn: conn.execute(_OUTBOX_STATS).fetchone())
        return OutboxStats(pending, ts_parse(oldest) if oldest else None, dead)

    async def _write(self, sql: str, params: tuple[Any, ...], *, durable: bool = True) -> int:
        def write(conn: sqlite3.Connection) -> int:
            with _transaction(conn, durable=durable):
                return conn.execute(sql, params).rowcount

        return await self._call(write)


class _Reader:
    """A read-only connection with its own deadline, which its progress handler checks."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.deadline = math.inf

    def over_deadline(self) -> int:
        # Non-zero aborts the running statement with OperationalError("interrupted").
        return 1 if time.monotonic() > self.deadline else 0


def _message_rows(messages: list[NewMessage]) -> list[tuple[Any, ...]]:
    """The ``_INSERT_MESSAGE`` rows: times as text, measurements as JSON text, the topic storable."""
    rows = []
    last: datetime | None = None
    received = ""
    for m in messages:
        if m.received_at is not last:  # one receive time per read burst: format it once
            last, received = m.received_at, ts_text(m.received_at)
        topic = m.topic and safe_text(m.topic)
        rows.append(
            (
                m.device_id,
                m.dedupe_key,
                ts_text(m.device_ts),
                received,
                m.seq,
                json_text(m.measurements),
                m.status,
                m.battery,
                m.source,
                topic,
                m.schema_version,
            )
        )
    return rows


def _insert_messages(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[InsertOutcome]:
    """Insert rows unique within the batch; returns each one's id and whether it was there already.

    We hold the write lock, so AUTOINCREMENT ids of new rows are consecutive after ``before``: with
    no conflict, executemany (~1.5x faster than a loop) tells us every id. Otherwise look each key
    up; ids above ``before`` are new.
    """
    row = conn.execute(_LAST_MESSAGE_ID).fetchone()
    before = row[0] if row else 0
    changes = conn.total_changes
    conn.executemany(_INSERT_MESSAGE, rows)
    inserted = conn.total_changes - changes
    after = conn.execute(_LAST_MESSAGE_ID).fetchone()[0]
    if inserted == len(rows) and after == before + inserted:
        return [InsertOutcome(i, False) for i in range(before + 1, after + 1)]
    found = (conn.execute(_SELECT_DUPLICATE, (r[0], r[1])).fetchone()[0] for r in rows)
    return [InsertOutcome(i, i <= before) for i in found]


@contextmanager
def _transaction(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error).

    ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``: ~0.1 ms of CPU
    and 0.5 ms less per commit here), for writes a power loss may undo harmlessly: taking or
    renewing a lease, deleting a confirmed outbox row (sent again: at least once). The next
    durable commit syncs the log with these frames in it; a crash of the process loses nothing.
    """
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        # IMMEDIATE takes the write lock up front, so a busy database fails at BEGIN, not mid-way.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if not durable:
            conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS}")


def _statements(script: str) -> Iterator[str]:
    """Split a SQL script into complete statements (so it can run inside our transaction)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()):
        raise StoreCorrupt("migration ends with an incomplete statement")


def _append(conn: sqlite3.Connection, events: list[NewEvent]) -> list[Event]:
    """Insert ``events`` with one executemany (inside the caller's transaction); returns them with ids."""
    if not events:
        return []
    now = now_utc()
    now_text = ts_text(now)
    encoded = [e.json if e.json is not None else dumps(e.data) for e in events]
    row = conn.execute(_LAST_EVENT_ID).fetchone()
    before = row[0] if row else 0
    conn.executemany(
        _INSERT_EVENT,
        [(e.type, raw.decode(), now_text, e.device_id, e.message_id) for e, raw in zip(events, encoded, strict=True)],
    )
    # We hold the write lock, so the AUTOINCREMENT ids of these rows follow ``before`` one by one.
    after = conn.execute(_LAST_EVENT_ID).fetchone()[0]
    if after != before + len(events):
        raise StoreCorrupt(f"event ids not consecutive: {before} + {len(events)} != {after}")
    return [
        Event(before + 1 + n, e.type, e.data, now, e.device_id, raw, None, e.message_id)
        for n, (e, raw) in enumerate(zip(events, encoded, strict=True))
    ]


def _sync_rollups(conn: sqlite3.Connection, intervals: tuple[int, ...]) -> None:
    """Add (and backfill from the processed readings) the rollup intervals not kept yet, drop
    those no longer wanted; one transaction (this process is the only writer)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rollup_intervals'").fetchone():
        return  # migrations stopped short of 0005 (tests of older migrations)
    kept = {r[0] for r in conn.execute("SELECT interval_s FROM rollup_intervals")}
    plan = sync_plan(intervals, kept)
    if not plan.add and not plan.drop:
        return
    with _transaction(conn):
        for seconds in plan.drop:
            conn.execute("DELETE FROM rollups WHERE interval_s = ?", (seconds,))
            conn.execute("DELETE FROM rollup_intervals WHERE interval_s = ?", (seconds,))
        for seconds in plan.add:
            conn.execute(
                "INSERT INTO rollup_intervals (interval_s, added_at) VALUES (?, ?)", (seconds, ts_text(now_utc()))
            )
            conn.execute(SQLITE_BACKFILL, (seconds,))


def _bucket(r: Any) -> Bucket:
    # SQLite's sum() of integers is an integer: figures are floats as on PostgreSQL.
    return Bucket(ts_parse(r[0]), r[1], float(r[2]), float(r[3]), float(r[4]))


def _read_page(read: PageRead, conn: sqlite3.Connection) -> tuple[int, list[Any]]:
    """The capped total and the rows of one page, in the caller's read transaction."""
    total = conn.execute(read.count_sql, read.count_params).fetchone()[0]
    return total, conn.execute(read.page_sql, read.page_params).fetchall()


def _reject(r: Any) -> StoredReject:
    return StoredReject(
        r[0],
        ts_parse(r[1]),
        r[2],
        r[3],
        bytes(r[4]),
        r[5],
        json.loads(r[6]),
        r[7],
        ts_parse(r[8]) if r[8] else None,
        r[9],
    )


def _message(r: Any) -> StoredMessage:
    return StoredMessage(
        id=r[0],
        device_id=r[1],
        device_ts=ts_parse(r[2]),
        received_at=ts_parse(r[3]),
        seq=r[4],
        measurements=loads(r[5]),
        status=r[6],
        # A REAL column gives back an int from UPDATE ... RETURNING (the claim) when the value is
        # integral: float() keeps battery one JSON number type (87.0) in SSE and REST alike.
        battery=None if r[7] is None else float(r[7]),
        source=r[8],
        processed_at=ts_parse(r[9]) if r[9] else None,
        attempts=r[10],
        last_error=r[11],
        dead=r[12] is not None,
        schema_version=r[13],
    )


def _enqueue(conn: sqlite3.Connection, publishes: list[NewPublish]) -> None:
    if publishes:
        now = ts_text(now_utc())
        rows = [(now, p.subtopic, p.payload, p.message_id, p.event_id) for p in publishes]
        conn.executemany(_INSERT_OUTBOX, rows)


def _outbox_item(r: Any) -> OutboxItem:
    return OutboxItem(r[0], bytes(r[1]), r[2], r[3], ts_parse(r[4]), r[5], r[6])
