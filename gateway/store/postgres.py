"""The PostgreSQL store: asyncpg through trio-asyncio. The only module that imports either.

Each operation borrows a connection from a Trio-side pool (:class:`_Pool`: no asyncio task, no
reset round trip) and runs as one asyncio coroutine (transaction, queries) crossing the bridge
once; the connection is terminated if the call outlives ``query_timeout`` (a Trio backstop
behind it). Connection errors and timeouts become :class:`~gateway.errors.StoreUnavailable`; a
terminated or broken connection is dropped and the next call opens a new one. Writes are
batched into a few round trips (``unnest`` arrays): on this stack a store call costs ~200 µs of
CPU and each further round trip inside it ~150-180 µs, while bulk costs nothing extra.

The LISTEN connection ignores NOTIFYs sent by this instance's own pool connections: their
consumers were woken in process already.

Event ids come from an identity column, taken under a transaction-level advisory lock held
until commit, so ids grow in commit order across connections and instances: a reader that
polls ``id > last`` never misses one. A processor batch commits in one statement (marks, lock,
events: :data:`_COMPLETE`), or four round trips with outbox rows (BEGIN, it, the outbox, COMMIT):
each round trip costs ~100 µs of gateway CPU here (asyncio and the loopback TCP send), so they are
counted like crossings.

API reads (:meth:`PostgresStore._read`) run in a transaction with ``SET LOCAL statement_timeout``
(``API_QUERY_TIMEOUT``: the server stops the query, the connection stays usable) and at most half
the pool at once, so the writer always finds a connection.

If the database is down at start, :meth:`PostgresStore.run` still reports started (degraded) and
keeps retrying; until the pool exists every operation raises StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio

from gateway.backoff import Backoff
from gateway.errors import QueryTimeout, StoreAccessRefused, StoreCorrupt, StoreRefused, StoreUnavailable
from gateway.health import ComponentHealth
from gateway.jsonenc import dumps, loads
from gateway.rollups import (
    PG_BACKFILL,
    PG_PENDING,
    PG_RAW_READ,
    PG_ROLLUP_CTE,
    PG_ROLLUP_READ,
    Aggregate,
    AggregateQuery,
    Bucket,
    rollup_interval,
    sync_plan,
)
from gateway.safetext import safe_json, safe_text
from gateway.settings import DatabaseSettings
from gateway.store import migrate as _migrate
from gateway.store import partitions
from gateway.store._common import Deduped, by_message, json_text, require_messages
from gateway.store._query import POSTGRES, PageRead, mark_degraded, mark_ok, message_page, new_health, reject_page
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
from gateway.store.partitions import RangePartition

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = Any  # asyncpg.Connection (untyped library)

HEALTH_INTERVAL = 5.0  # seconds between health checks while ok
LISTEN_KEEPALIVE = 10.0  # seconds between checks of the LISTEN connection
_EVENTS_LOCK = 0x6761_7465_7761_7901  # pg_advisory_xact_lock key: event id order
_MIGRATE_LOCK = 0x6761_7465_7761_7902  # pg_advisory_xact_lock key: one migrator at a time

# Errors that mean "the database cannot be reached right now".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A connection left mid-protocol by a server restart ("cannot switch to state ...").
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)

# Connect-time answers no retry can fix: invalid authorization (28xxx: unknown role, bad password),
# unknown database (3D000), no CONNECT privilege (42501).
_REFUSED_SQLSTATES = ("28", "3D000", "42501")

_MSG_COLS = (
    "id, device_id, device_ts, received_at, seq, measurements, status, battery, source,"
    " processed_at, attempts, last_error, dead_at, schema_version"
)
# A batch in ONE statement, so ONE round trip (each costs ~100 us of our CPU through the bridge,
# more than 500 rows of encoding; a COPY to a staging table needs five: BEGIN, two for the COPY,
# the INSERT ... SELECT, COMMIT). Column arrays in NewMessage order (``zip(*messages)``), each
# array encoded in C; readings and rejects commit together. Ids are taken in ``ord`` (batch)
# order, so when every reading is new the sorted ids are the readings' ids. pg_notify per new
# row queues ONE notification: PostgreSQL folds identical ones within a transaction.
_INSERT_BATCH = """
WITH u AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                         $7::float8[], $8::text[], $9::timestamptz[], $10::text[], $11::int[])
                  WITH ORDINALITY AS u(d, ts, s, k, m, st, b, src, ra, t, v, ord)
), keyed AS (
    -- The idempotency key (migration 0004: messages is partitioned, its key lives here). nextval
    -- is evaluated after the sort, so ids are drawn in ``ord`` order.
    INSERT INTO message_keys (device_id, dedupe_key, message_id)
    SELECT d, k, nextval('messages_id_seq') FROM u ORDER BY ord
    ON CONFLICT (device_id, dedupe_key) DO NOTHING
    RETURNING device_id, dedupe_key, message_id
), new AS (
    INSERT INTO messages (id, device_id, device_ts, seq, dedupe_key, measurements, status, battery, source,
                          received_at, topic, schema_version)
    SELECT keyed.message_id, d, ts, s, k, m::jsonb, st, b, src, ra, t, v
    FROM u JOIN keyed ON keyed.device_id = u.d AND keyed.dedupe_key = u.k
    RETURNING id, pg_notify('gateway_messages', '')
), rejected AS (
    INSERT INTO rejects (received_at, source, topic, payload, reason, errors, schema_version)
    SELECT ra, src, t, p, r, e::jsonb, v
    FROM unnest($12::timestamptz[], $13::text[], $14::text[], $15::bytea[], $16::text[], $17::text[], $18::int[])
         AS u(ra, src, t, p, r, e, v)
)
SELECT id FROM new
"""
_SELECT_EXISTING = """
SELECT mk.message_id, mk.device_id, mk.dedupe_key
FROM message_keys mk JOIN unnest($1::text[], $2::text[]) AS u(d, k) ON mk.device_id = u.d AND mk.dedupe_key = u.k
"""
# The same before migration 0004 (messages not partitioned, its own unique key): tests write
# through the store at older versions, then migrate.
_INSERT_BATCH_0003 = """
WITH new AS (
    INSERT INTO messages (device_id, device_ts, seq, dedupe_key, measurements, status, battery, source,
                          received_at, topic)
    SELECT d, ts, s, k, m::jsonb, st, b, src, ra, t
    FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::float8[],
                $8::text[], $9::timestamptz[], $10::text[]) WITH ORDINALITY AS u(d, ts, s, k, m, st, b, src, ra, t, ord)
    ORDER BY ord
    ON CONFLICT (device_id, dedupe_key) DO NOTHING
    RETURNING id, pg_notify('gateway_messages', '')
), rejected AS (
    INSERT INTO rejects (received_at, source, topic, payload, reason, errors)
    SELECT ra, src, t, p, r, e::jsonb
    FROM unnest($11::timestamptz[], $12::text[], $13::text[], $14::bytea[], $15::text[], $16::text[])
         AS u(ra, src, t, p, r, e)
)
SELECT id FROM new
"""
_SELECT_EXISTING_0003 = """
SELECT m.id, m.device_id, m.dedupe_key
FROM messages m JOIN unnest($1::text[], $2::text[]) AS u(d, k) ON m.device_id = u.d AND m.dedupe_key = u.k
"""
_CLAIM = f"""
UPDATE messages SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
WHERE id IN (
    SELECT id FROM messages
    WHERE processed_at IS NULL AND dead_at IS NULL
      AND (lease_until IS NULL OR lease_until < now())
      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    ORDER BY id LIMIT $2
    FOR UPDATE SKIP LOCKED)
RETURNING {_MSG_COLS}
"""
# One statement marks the batch, takes the event lock and appends the events of the messages still
# leased to us: atomic by itself, so without publishes one round trip is the whole commit. The lock
# (held to commit) is taken before any event id is drawn: the insert's rows come through the join
# with ``locked`` (a volatile CTE, evaluated once, first); so ids grow in commit order across
# connections and instances. NOTIFY is queued with it and sent at commit. Rows: (false, message id)
# for each message still ours, (true, event id, created_at) for each event appended. ``$10``
# (append_events) keeps every event; otherwise only those of the messages still ours.
_COMPLETE = f"""
WITH done AS (
    UPDATE messages SET processed_at = now(), lease_owner = NULL, lease_until = NULL
    WHERE id = ANY($1::bigint[]) AND lease_owner = $2
    RETURNING id
), failed AS (
    UPDATE messages m
    SET attempts = m.attempts + 1, last_error = f.err, next_attempt_at = f.retry,
        dead_at = CASE WHEN f.retry IS NULL THEN now() END, lease_owner = NULL, lease_until = NULL
    FROM unnest($3::bigint[], $4::text[], $5::timestamptz[]) AS f(id, err, retry)
    WHERE m.id = f.id AND m.id = ANY($3::bigint[]) AND m.lease_owner = $2  -- ANY: by the primary key
    RETURNING m.id
), owned AS (
    SELECT id FROM done UNION ALL SELECT id FROM failed
), locked AS (
    SELECT pg_advisory_xact_lock({_EVENTS_LOCK}), pg_notify('gateway_events', '')
), appended AS (
    INSERT INTO events (type, data, device_id, message_id)
    SELECT u.t, u.d::jsonb, u.dev, u.mid
    FROM unnest($6::text[], $7::text[], $8::text[], $9::bigint[]) WITH ORDINALITY AS u(t, d, dev, mid, ord)
    CROSS JOIN locked
    WHERE $10 OR u.mid IN (SELECT id FROM owned)
    ORDER BY u.ord
    RETURNING id, created_at
)
SELECT false, id, NULL::timestamptz FROM owned
UNION ALL
SELECT true, id, created_at FROM appended
"""
# The same with rollups (ROLLUP_INTERVALS): the processed rows also go to their buckets, in the
# same statement (so still one round trip, and a crash cannot count a reading twice or miss it).
_COMPLETE_ROLLUPS = _COMPLETE.replace(
    "WHERE id = ANY($1::bigint[]) AND lease_owner = $2\n    RETURNING id\n)",
    "WHERE id = ANY($1::bigint[]) AND lease_owner = $2\n    RETURNING id, device_id, device_ts, measurements\n), "
    + PG_ROLLUP_CTE,
)
assert _COMPLETE_ROLLUPS != _COMPLETE
_READ_EVENTS = """
SELECT id, type, data::text, created_at, device_id, message_id FROM events
WHERE id > $1 AND ($2::text[] IS NULL OR type = ANY($2::text[])) AND ($3::text IS NULL OR device_id = $3)
ORDER BY id LIMIT $4
"""
_REJECT_COLS = "id, received_at, source, topic, payload, reason, errors, schema_version, replayed_at, message_id"
# A replay's chunk: by ids, or by receive window and reason; ids above the cursor, in id order.
_SELECT_REJECTS = f"""
SELECT {_REJECT_COLS} FROM rejects
WHERE id > $1 AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
  AND ($3::timestamptz IS NULL OR received_at >= $3) AND ($4::timestamptz IS NULL OR received_at < $4)
  AND ($5::text IS NULL OR reason = $5)
ORDER BY id LIMIT $6
"""
_MARK_REPLAYED = """
UPDATE rejects SET replayed_at = now(), message_id = u.m, schema_version = u.v
FROM unnest($1::bigint[], $2::bigint[], $3::int[]) AS u(id, m, v) WHERE rejects.id = u.id
"""
_REJECT_AGAIN = """
UPDATE rejects SET reason = u.r, errors = u.e::jsonb, schema_version = u.v
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[]) AS u(id, r, e, v) WHERE rejects.id = u.id
"""
# DELETE of the oldest expired rows, one batch per transaction (row locks are held briefly).
_PRUNE = {
    "events": "SELECT id FROM events WHERE created_at < $1 ORDER BY id LIMIT $2",
    "rejects": "SELECT id FROM rejects WHERE received_at < $1 ORDER BY id LIMIT $2",
    "messages": ("SELECT id FROM messages WHERE received_at < $1 AND processed_at IS NOT NULL ORDER BY id LIMIT $2"),
}
_PRUNE_SQL = "WITH d AS (DELETE FROM {table} WHERE id IN ({select}) RETURNING 1) SELECT count(*) FROM d"
# Readings go with their dedupe keys (message_keys, migration 0004).
_PRUNE_MESSAGES = f"""
WITH d AS (DELETE FROM messages WHERE id IN ({_PRUNE["messages"]}) RETURNING id, device_id, dedupe_key),
k AS (DELETE FROM message_keys mk USING d
      WHERE mk.device_id = d.device_id AND mk.dedupe_key = d.dedupe_key AND mk.message_id = d.id)
SELECT count(*) FROM d
"""
# The partitions of messages: (name, is DEFAULT, lower or NULL for MINVALUE, upper).
_PARTITIONS = r"""
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT',
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']*)''\)'))[1]::timestamptz,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']*)''\)'))[1]::timestamptz
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'messages'::regclass
"""
# Each EXISTS matches a partial index (messages_backlog, messages_dead): no scan of the partition.
_PENDING_IN = (
    "SELECT EXISTS (SELECT 1 FROM {name} WHERE processed_at IS NULL AND dead_at IS NULL)"
    " OR EXISTS (SELECT 1 FROM {name} WHERE dead_at IS NOT NULL)"
)
# One batch of a partition's keys, walking it by id (its primary key): linear, whatever its size.
_DROP_KEYS = """
WITH p AS (SELECT id, device_id, dedupe_key FROM {name} WHERE id > $1 ORDER BY id LIMIT $2),
d AS (DELETE FROM message_keys mk USING p
      WHERE mk.device_id = p.device_id AND mk.dedupe_key = p.dedupe_key AND mk.message_id = p.id)
SELECT count(*), coalesce(max(id), $1) FROM p
"""
_PARTITION_LOCK = 0x6761_7465_7761_7903  # pg_advisory_xact_lock key: one partition maintainer at a time
# CREATE/ATTACH/DROP of a partition wait for a lock on messages, and ingest would queue behind
# them: they give up after this long and are tried again at the next housekeeping.
_PARTITION_LOCK_TIMEOUT_MS = 2000
# Each device's newest message, at a cost per device rather than per row: PostgreSQL 15 has no
# skip scan, so DISTINCT ON (device_id) (or GROUP BY) reads the whole messages_device_ts index.
# The recursive CTE jumps from one device to the next in that index (one descent each), and the
# LATERAL lookup reads each device's newest entry from the same index backwards (LIMIT 1).
_LATEST_PER_DEVICE = f"""
WITH RECURSIVE devices(device_id) AS (
    (SELECT device_id FROM messages ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT m.device_id FROM messages m WHERE m.device_id > d.device_id ORDER BY m.device_id LIMIT 1)
    FROM devices d WHERE d.device_id IS NOT NULL
)
SELECT newest.* FROM devices d CROSS JOIN LATERAL (
    SELECT {_MSG_COLS} FROM messages m WHERE m.device_id = d.device_id ORDER BY m.device_ts DESC, m.id DESC LIMIT 1
) newest
ORDER BY newest.device_ts DESC, newest.id DESC
LIMIT $1
"""
_BACKLOG = """
SELECT (SELECT count(*) FROM messages WHERE processed_at IS NULL AND dead_at IS NULL),
       (SELECT received_at FROM messages WHERE processed_at IS NULL AND dead_at IS NULL ORDER BY id LIMIT 1),
       (SELECT count(*) FROM messages WHERE dead_at IS NOT NULL)
"""

_OUTBOX_COLS = "id, payload, subtopic, attempts, created_at, message_id, event_id"
_INSERT_OUTBOX = """
INSERT INTO outbox (subtopic, payload, message_id, event_id)
SELECT s, p, m, e FROM unnest($1::text[], $2::bytea[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS u(s, p, m, e, ord)
ORDER BY ord
"""
_CLAIM_OUTBOX = f"""
UPDATE outbox SET lease_owner = $1, lease_until = now() + make_interval(secs => $3)
WHERE id IN (
    SELECT id FROM outbox
    WHERE dead_at IS NULL AND (lease_until IS NULL OR lease_until < now())
      AND (next_attempt_at IS NULL OR next_attempt_at <= now())
    ORDER BY id LIMIT $2
    FOR UPDATE SKIP LOCKED)
RETURNING {_OUTBOX_COLS}
"""
_RENEW_OUTBOX = """
WITH r AS (UPDATE outbox SET lease_until = now() + make_interval(secs => $2)
           WHERE lease_owner = $1 AND dead_at IS NULL RETURNING 1)
SELECT count(*) FROM r
"""
_RELEASE_OUTBOX = """
WITH r AS (UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1 RETURNING 1)
SELECT count(*) FROM r
"""
_OUTBOX_FAILED = """
UPDATE outbox o
SET attempts = o.attempts + 1, last_error = f.err, next_attempt_at = f.retry,
    dead_at = CASE WHEN f.retry IS NULL THEN now() END, lease_owner = NULL, lease_until = NULL
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[]) AS f(id, err, retry)
WHERE o.id = f.id
"""
_OUTBOX_STATS = """
SELECT (SELECT count(*) FROM outbox WHERE dead_at IS NULL),
       (SELECT created_at FROM outbox WHERE dead_at IS NULL ORDER BY id LIMIT 1),
       (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL)
"""


@asynccontextmanager
async def open_postgres(
    settings: DatabaseSettings, health: ComponentHealth | None = None
) -> AsyncIterator[PostgresStore]:
    """Open the trio-asyncio loop and yield a store bound to it (call ``run()`` to connect)."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_loop_exception)
        yield PostgresStore(settings, loop, health)


def _loop_exception(loop: Any, context: dict[str, Any]) -> None:
    """asyncpg cancelled halfway through a connect (a stop while it retries, e.g. right after a
    refusal) leaves a future with a ConnectionError nobody reads: nobody lost anything, so it is
    logged at DEBUG. Anything else goes to trio-asyncio's handler, which raises it in the loop."""
    exc = context.get("exception")
    if context.get("message") == "Future exception was never retrieved" and isinstance(exc, ConnectionError):
        log.debug("unread asyncpg connection error (a cancelled connect): %s", exc)
        return
    loop.default_exception_handler(context)


class PostgresStore:
    """:class:`~gateway.store.base.Store` on PostgreSQL (``DATABASE_URL=postgresql://...``)."""

    kind = "postgres"

    def __init__(self, settings: DatabaseSettings, loop: Any, health: ComponentHealth | None = None) -> None:
        self._settings = settings
        self._loop = loop
        self._pool: _Pool | None = None  # once run() connected
        # API reads take at most half the pool: writes and the processor always find a connection.
        self._read_limiter = trio.CapacityLimiter(max(1, settings.pool_max // 2))
        self.health = new_health(health)
        self._partitioned = True  # messages as of migration 0004 (checked after migrating)
        # Reconnects and health checks: full jitter, so instances that lost the database together
        # do not come back together.
        self._retry = Backoff(settings.retry_min, max(settings.retry_min, settings.retry_max), jitter="full")

    def _aio(self, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        # An explicit loop, so callers from any Trio task (not only inside open_loop) work.
        wrapped: Callable[..., Awaitable[T]] = trio_asyncio.aio_as_trio(fn, loop=self._loop)
        return wrapped

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying forever with backoff), migrate, report started, keep checking health,
        and close the pool when cancelled. Runs until cancelled.

        Reports started after the first failed attempt too (degraded), so the gateway comes up.
        Raises StoreCorrupt when a migration fails.
        """
        started = False
        attempt = 0
        try:
            while self._pool is None:
                try:
                    pool = await self._create_pool()
                    try:
                        await self._migrate_on(pool)
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await self._close_pool(pool)
                        raise
                    self._pool = pool
                except StoreUnavailable as exc:
                    self._set_degraded(str(exc), refused=isinstance(exc, StoreAccessRefused))
                    log.warning("database unavailable, retrying: %s", exc)
                    if not started:
                        task_status.started()
                        started = True
                    await trio.sleep(self._retry.delay(attempt))
                    attempt += 1
            self._set_ok()
            await self._partitions_ahead()
            if not started:
                task_status.started()
            await self._check_health()
        finally:
            if self._pool is not None:
                pool, self._pool = self._pool, None
                with trio.CancelScope(shield=True):
                    await self._close_pool(pool)

    async def _partitions_ahead(self) -> None:
        """Create the coming partitions of messages at start-up (housekeeping keeps them coming);
        a failure only logs: the DEFAULT partition takes readings meanwhile."""
        try:
            await self.maintain_partitions(datetime.now(UTC), None, 1)
        except (StoreUnavailable, StoreCorrupt) as exc:
            log.warning("could not create message partitions ahead: %s", exc)

    async def _create_pool(self) -> _Pool:
        s = self._settings
        pool = _Pool(s.pool_max)
        try:
            try:
                # asyncpg's own connect timeout (cancelling a connect from Trio could hang).
                with trio.fail_after(s.connect_timeout * 2 + 5):  # backstop
                    # At least one connection: it shows the database answers (run() retries until it does).
                    for _ in range(max(1, min(s.pool_min, s.pool_max))):
                        pool.put(await self._aio(self._connect)())
                return pool
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._close_pool(pool)
                raise
        except trio.TooSlowError as exc:
            raise StoreUnavailable(f"database did not answer within {s.connect_timeout:g} s") from exc
        except asyncpg.PostgresError as exc:
            if str(getattr(exc, "sqlstate", "") or "").startswith(_REFUSED_SQLSTATES):
                raise StoreAccessRefused(f"refused the connection: {_describe(exc)}") from exc
            # Any other server error at connect time (starting up, too many clients) is "not yet".
            raise StoreUnavailable(f"cannot connect to database: {_describe(exc)}") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot connect to database: {_describe(exc)}") from exc

    async def _connect(self) -> Conn:
        """A new connection with our codecs (asyncio side); errors are asyncpg's own."""
        s = self._settings
        conn = await asyncpg.connect(s.url.get_secret_value(), timeout=s.connect_timeout)
        try:
            await asyncio.wait_for(_init_connection(conn), s.connect_timeout)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _close_pool(self, pool: _Pool) -> None:
        # asyncio-side timeout: a connection that does not close in time is terminated.
        for conn in pool.drain():
            try:
                await self._aio(conn.close)(timeout=self._settings.connect_timeout)
            except (*_UNAVAILABLE, asyncpg.PostgresError):
                conn.terminate()

    async def _check_health(self) -> None:
        attempt = 0
        while True:
            try:
                await self.ping()
            except StoreUnavailable:
                delay = self._retry.delay(attempt)
                attempt += 1
            else:
                attempt = 0
                delay = HEALTH_INTERVAL
            await trio.sleep(delay)

    def _set_ok(self) -> None:
        mark_ok(self.health)

    def _set_degraded(self, error: str, *, refused: bool = False) -> None:
        mark_degraded(self.health, error, refused=refused)

    async def _run(self, fn: Callable[[Conn], Awaitable[T]], seconds: float | None = None) -> T:
        """Run ``fn(conn)`` on a pooled connection under the query timeout (or ``seconds``),
        translating errors."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"database not connected ({self.health.last_error or 'starting'})")
        if seconds is None:
            seconds = self._settings.query_timeout
        limit = seconds
        result = await self._translate(lambda expired: self._lend(pool, limit, fn, expired), seconds)
        if self.health.state != "ok":
            self._set_ok()
        return result

    async def _lend(self, pool: _Pool, seconds: float, fn: Callable[[Conn], Awaitable[T]], expired: list[bool]) -> T:
        """``fn(conn)`` on a connection of ``pool`` (a new one when none is idle) in one crossing."""
        conn = await pool.take(seconds)
        used: list[Conn] = [] if conn is None else [conn]
        try:
            result: T = await self._aio(_use)(conn, self._connect, seconds, fn, expired, used)
            return result
        finally:
            pool.give_back(used[0] if used else None)

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """An API read: ``fn(conn)`` in a transaction whose statements the server stops after
        ``API_QUERY_TIMEOUT`` (QueryTimeout), at most half the pool at a time."""
        seconds = self._settings.api_query_timeout

        async def read(conn: Conn) -> T:
            async with _transaction(conn):
                await conn.execute(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")
                return await fn(conn)

        async with self._read_limiter:
            # The connection is terminated only if the server does not stop the query itself.
            return await self._run(read, seconds + self._settings.connect_timeout)

    async def _translate(self, body: Callable[[list[bool]], Awaitable[T]], seconds: float) -> T:
        """Run ``body`` (which crosses to asyncio); its errors become StoreUnavailable / StoreCorrupt.

        The deadline is enforced inside asyncio by terminating the connection (see
        :func:`_guarded`), not by cancelling from Trio: a cancelled asyncpg query first sends a
        cancel request and waits for the server, which hangs when the server is frozen.
        """
        expired: list[bool] = []
        try:
            # Backstop only; the asyncio-side deadline fires first.
            with trio.fail_after(seconds + self._settings.connect_timeout + 5):
                return await body(expired)
        except trio.TooSlowError as exc:
            error = f"database did not answer within {seconds:g} s"
            self._set_degraded(error)
            raise StoreUnavailable(error) from exc
        except asyncpg.exceptions.QueryCanceledError as exc:
            # statement_timeout (API reads): one slow query, the database itself is fine.
            # (A subclass of OperatorInterventionError, so caught before _UNAVAILABLE.)
            raise QueryTimeout(f"query took longer than {self._settings.api_query_timeout:g} s") from exc
        except _UNAVAILABLE as exc:
            error = (
                f"database did not answer within {seconds:g} s"
                if expired
                else f"database unavailable: {_describe(exc)}"
            )
            self._set_degraded(error)
            raise StoreUnavailable(error) from exc
        except asyncpg.exceptions.TransactionRollbackError as exc:
            # Deadlock or serialization failure (e.g. two instances storing the same
            # redeliveries in a different order): temporary, the caller retries.
            raise StoreUnavailable(f"database transaction rolled back: {_describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreCorrupt(f"database error: {_describe(exc)}") from exc

    # -- migrations ----------------------------------------------------------------------

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations in order, each in a transaction, then make the kept rollup
        intervals those of ``ROLLUP_INTERVALS`` (backfilling new ones); returns the migrations
        applied now.

        Works before ``run()`` too (one direct connection attempt).
        """
        if self._pool is not None:
            return await self._migrate_on(self._pool)
        return await self._direct(partial(_prepare, intervals=self._settings.rollup_intervals))

    async def migration_status(self) -> list[Migration]:
        """Every known migration, with ``applied_at`` for the applied ones."""
        files = _migrate.load_migrations("postgres")

        async def read(conn: Conn) -> dict[int, tuple[str, datetime]]:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
            if not exists:
                return {}
            rows = await conn.fetch("SELECT version, name, applied_at FROM schema_migrations")
            return {r[0]: (r[1], r[2]) for r in rows}

        applied = await (self._run(read) if self._pool is not None else self._direct(read))
        return _migrate.merge_status(files, applied)

    async def _migrate_on(self, pool: _Pool) -> list[Migration]:
        # Migrations may build indexes: allow them longer than a query.
        seconds = self._settings.query_timeout * 10

        prepare = partial(_prepare, intervals=self._settings.rollup_intervals)
        done = await self._translate(lambda expired: self._lend(pool, seconds, prepare, expired), seconds)
        # Migration 0004 partitioned messages and moved its key to message_keys.
        self._partitioned = await self._translate(
            lambda expired: self._lend(pool, seconds, _has_keys, expired), seconds
        )
        return done

    async def _direct(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """``fn`` on a fresh connection (no pool yet), closed afterwards."""
        s = self._settings
        seconds = s.query_timeout * 10

        async def body(expired: list[bool]) -> T:
            conn = await asyncpg.connect(s.url.get_secret_value(), timeout=s.connect_timeout)
            try:
                await _init_connection(conn)
                return await _guarded(conn, seconds, fn, expired)
            finally:
                await conn.close(timeout=s.connect_timeout)

        return await self._translate(lambda expired: self._aio(body)(expired), seconds)

    # -- operations ----------------------------------------------------------------------

    async def ping(self) -> None:
        """A ``SELECT 1`` round trip; raises StoreUnavailable when it fails."""
        await self._run(lambda conn: conn.fetchval("SELECT 1"))

    async def write_batch(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        """Insert messages (idempotently) and rejects in one transaction; one outcome per message.

        One coroutine on the asyncio side (one bridge crossing), one statement (one round trip;
        a second one only to look up duplicates). NOTIFYs ``gateway_messages`` when something new
        was stored.
        """
        if not messages and not rejects:
            return []
        batch = Deduped(messages)
        return await self._run(lambda conn: _insert(conn, batch, rejects, partitioned=self._partitioned))

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        """Lease up to ``limit`` due, unprocessed, not dead messages (oldest first) to ``owner``;
        concurrent claimers never get the same one (``FOR UPDATE SKIP LOCKED``)."""
        if limit < 1:
            return []
        rows = await self._run(lambda conn: conn.fetch(_CLAIM, owner, limit, float(lease_seconds)))
        return sorted((_message(r) for r in rows), key=lambda m: m.id)

    async def complete(
        self,
        owner: str,
        processed: list[int],
        failed: list[Failure],
        events: list[NewEvent],
        publishes: CompletionPublishes | None = None,
    ) -> EventsByMessage:
        """Mark processed/failed, append events and outbox rows, in one transaction, only for
        messages still leased to ``owner``; returns those messages → their events. NOTIFYs
        ``gateway_events``."""
        require_messages(events)

        rollups = bool(self._settings.rollup_intervals)

        async def complete(conn: Conn) -> EventsByMessage:
            if publishes is None:
                owned, appended = await _commit(conn, owner, processed, failed, events, keep_all=False, rollups=rollups)
                return by_message(processed, failed, owned, appended)
            async with _transaction(conn):
                owned, appended = await _commit(conn, owner, processed, failed, events, keep_all=False, rollups=rollups)
                stored = by_message(processed, failed, owned, appended)
                await _enqueue(conn, [p for p in publishes(stored) if p.message_id is None or p.message_id in owned])
                return stored

        if not processed and not failed and not events:
            return {}
        return await self._run(complete)

    async def append_events(self, events: list[NewEvent], publishes: PublishBuilder | None = None) -> list[Event]:
        """Append events not tied to a lease (alerts) and their outbox rows; returns the events with ids."""

        async def append(conn: Conn) -> list[Event]:
            if publishes is None:
                return (await _commit(conn, "", [], [], events, keep_all=True))[1]
            async with _transaction(conn):
                stored = (await _commit(conn, "", [], [], events, keep_all=True))[1]
                await _enqueue(conn, publishes(stored))
                return stored

        if not events:
            return []
        return await self._run(append)

    async def read_events(
        self,
        after_id: int,
        limit: int,
        types: frozenset[str] | None = None,
        device_id: str | None = None,
    ) -> list[Event]:
        """Events with ``id > after_id`` in id order, optionally filtered by type and device."""
        type_list = sorted(types) if types is not None else None
        rows = await self._run(lambda conn: conn.fetch(_READ_EVENTS, after_id, type_list, device_id, limit))
        out = []
        for r in rows:
            raw = r[2].encode()  # the text as stored: parsed once, and reused for the SSE frame
            out.append(Event(r[0], r[1], loads(raw), r[3], r[4], raw, None, r[5]))
        return out

    async def event_bounds(self) -> tuple[int, int]:
        """(oldest kept id, newest id); (0, 0) when there are none."""
        row = await self._run(
            lambda conn: conn.fetchrow("SELECT coalesce(min(id), 0), coalesce(max(id), 0) FROM events")
        )
        return (row[0], row[1])

    async def prune_events(self, older_than: datetime) -> int:
        """Delete events created before ``older_than``; returns how many."""
        return await self.prune("events", older_than, 2**62)

    async def prune(self, table: PruneTable, older_than: datetime, limit: int) -> int:
        """Delete up to ``limit`` of the oldest expired rows of ``table``; returns how many."""
        # Fixed names, never input.
        if table == "messages" and self._partitioned:
            sql = _PRUNE_MESSAGES
        else:
            sql = _PRUNE_SQL.format(table=table, select=_PRUNE[table])
        count: int = await self._run(lambda conn: conn.fetchval(sql, older_than, limit))
        return count

    async def maintain_partitions(self, now: datetime, older_than: datetime | None, limit: int) -> Partitions:
        """Create the partitions of messages ahead and drop expired ones whose readings are all
        processed (their dedupe keys first, ``limit`` per transaction); see
        :mod:`gateway.store.partitions`. A partition whose lock is not granted within 2 s is
        left for the next call. Returns what there is and what was done."""
        if not self._partitioned:
            return Partitions()
        rows = await self._run(lambda conn: conn.fetch(_PARTITIONS))
        ranges = [RangePartition(r[0], r[2], r[3]) for r in rows if not r[1] and r[3] is not None]
        has_default = any(r[1] for r in rows)
        created: list[str] = []
        for lower, upper in partitions.missing(ranges, now, self._settings.message_partition):
            name = partitions.partition_name(lower)
            if not await self._run(partial(_create_partition, name, lower, upper, has_default)):
                log.info("partition %s not created (messages busy), retried later", name)
                break
            ranges.append(RangePartition(name, lower, upper))
            created.append(name)
        dropped: list[str] = []
        dropped_rows = 0
        for part in partitions.expired(ranges, older_than) if older_than is not None else []:
            sql = _PENDING_IN.format(name=part.name)  # a catalog name, never input
            if await self._run(partial(_fetchval, sql)):
                continue  # unprocessed or dead-lettered readings: the batched delete takes the rest
            rows_in = await self._drop_keys(part.name, limit)
            if not await self._run(partial(_drop_partition, part.name)):
                # Its keys are gone: a redelivery of these expired readings is a new one, as after
                # the batched delete.
                log.info("partition %s not dropped (messages busy), retried later", part.name)
                continue
            dropped_rows += rows_in
            ranges.remove(part)
            dropped.append(part.name)
            log.info("retention dropped partition=%s upper=%s", part.name, part.upper.isoformat())
        oldest = min(ranges, key=lambda p: p.upper, default=None)
        return Partitions(
            count=len(ranges) + has_default,
            oldest=oldest.name if oldest else None,
            oldest_ends=oldest.upper if oldest else None,
            created=tuple(created),
            dropped=tuple(dropped),
            dropped_rows=dropped_rows,
        )

    async def _drop_keys(self, name: str, limit: int) -> int:
        """Delete the dedupe keys of partition ``name`` in batches; returns its row count."""
        sql = _DROP_KEYS.format(name=name)
        last, total, limit = 0, 0, max(1, limit)
        while True:
            row = await self._run(partial(_fetchrow, sql, last, limit))
            count: int = row[0]
            last = row[1]
            total += count
            if count < limit:
                return total

    async def query_messages(self, query: MessageQuery) -> Page:
        """A page of messages, newest first, with the total matching and the next cursor.

        Raises ValueError for a malformed cursor, a limit below 1 or a value without a key.
        """
        read = message_page(POSTGRES, query, _MSG_COLS, self._settings.api_total_limit)
        total, rows = await self._read(partial(_read_page, read))
        return read.page(total, rows, _message)

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One message by id, or None."""
        sql = f"SELECT {_MSG_COLS} FROM messages WHERE id = $1"
        row = await self._read(lambda conn: conn.fetchrow(sql, message_id))
        return _message(row) if row is not None else None

    async def latest_per_device(self, limit: int) -> list[StoredMessage]:
        """Each device's newest message, at most ``limit`` devices, newest first (see Store)."""
        rows = await self._run(lambda conn: conn.fetch(_LATEST_PER_DEVICE, limit))
        return [_message(r) for r in rows]

    async def query_rejects(self, limit: int, cursor: str | None = None) -> Page:
        """A page of rejects, newest first. Raises ValueError for a malformed cursor."""
        read = reject_page(POSTGRES, limit, cursor, _REJECT_COLS, self._settings.api_total_limit)
        total, rows = await self._read(partial(_read_page, read))
        return read.page(total, rows, _reject)

    async def aggregate(self, query: AggregateQuery) -> Aggregate:
        """Buckets from the rollups when they cover the range, else from the raw rows (one read
        transaction). Raises ValueError for an empty or too long range."""
        start, end = query.span()
        interval = rollup_interval(query.bucket, self._settings.rollup_intervals)
        if query.source == "raw":
            interval = None

        async def read(conn: Conn) -> Aggregate:
            if interval is not None and not await conn.fetchval(PG_PENDING, query.device_id, start, end):
                rows = await conn.fetch(
                    PG_ROLLUP_READ, query.bucket, interval, query.device_id, query.measurement, start, end
                )
                return Aggregate("rollup", [Bucket(*r) for r in rows], interval)
            rows = await conn.fetch(PG_RAW_READ, query.bucket, query.device_id, start, query.measurement, end)
            return Aggregate("raw", [Bucket(*r) for r in rows])

        return await self._read(read)

    async def backlog(self) -> Backlog:
        """How many messages wait (and the oldest arrival), and how many are dead."""
        row = await self._run(lambda conn: conn.fetchrow(_BACKLOG))
        return Backlog(row[0], row[1], row[2])

    async def select_rejects(self, selection: RejectSelection, limit: int) -> list[StoredReject]:
        """Up to ``limit`` rejects of ``selection``, oldest id first."""
        sel = selection
        ids = list(sel.ids) if sel.ids is not None else None
        args = (sel.after_id, ids, sel.start_time, sel.end_time, sel.reason, limit)
        rows = await self._run(lambda conn: conn.fetch(_SELECT_REJECTS, *args))
        return [_reject(r) for r in rows]

    async def replay_rejects(self, replayed: list[ReplayedReject], refused: list[RefusedReject]) -> list[InsertOutcome]:
        """Store the readings of ``replayed`` and mark their rejects; refresh ``refused``; in one
        transaction (three statements: a replay is rare, not the hot path)."""
        batch = Deduped([r.message for r in replayed])

        async def replay(conn: Conn) -> list[InsertOutcome]:
            async with _transaction(conn):
                outcomes = await _insert(conn, batch, [], partitioned=self._partitioned) if replayed else []
                if replayed:
                    ids = [r.reject_id for r in replayed]
                    versions = [r.message.schema_version for r in replayed]
                    await conn.execute(_MARK_REPLAYED, ids, [o.id for o in outcomes], versions)
                if refused:
                    await conn.execute(
                        _REJECT_AGAIN,
                        [r.reject_id for r in refused],
                        [r.reject.reason for r in refused],
                        [safe_json(r.reject.errors) for r in refused],
                        [r.reject.schema_version for r in refused],
                    )
            return outcomes

        return await self._run(replay)

    async def watch(
        self,
        on_message: Callable[[], None],
        on_event: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """LISTEN on a dedicated connection; call ``on_message``/``on_event`` on each NOTIFY and
        once after every (re)connect. Reconnects with backoff. Reports started after the first
        LISTEN or the first failure. Runs until cancelled."""
        s = self._settings
        started = False
        attempt = 0
        while True:
            conn: Any = None
            lost = trio.Event()
            try:
                # asyncpg's own connect timeout (cancelling a connect from Trio could hang).
                conn = await self._aio(asyncpg.connect)(s.url.get_secret_value(), timeout=s.connect_timeout)
                # Listener callbacks run on the Trio thread: they only call ours.
                await self._aio(conn.add_listener)("gateway_messages", self._listener(on_message))
                await self._aio(conn.add_listener)("gateway_events", self._listener(on_event))
                conn.add_termination_listener(lambda *_, lost=lost: lost.set())
                attempt = 0
                if not started:
                    task_status.started()
                    started = True
                on_message()
                on_event()
                while True:
                    with trio.move_on_after(LISTEN_KEEPALIVE):
                        await lost.wait()
                    if lost.is_set():
                        raise ConnectionError("listen connection closed")
                    await self._aio(_guarded)(conn, s.query_timeout, _select_one, [])
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("database LISTEN connection lost, reconnecting: %s", _describe(exc))
            finally:
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await self._aio(conn.close)(timeout=s.connect_timeout)
                        except (*_UNAVAILABLE, asyncpg.PostgresError):
                            conn.terminate()
            if not started:
                task_status.started()
                started = True
            await trio.sleep(self._retry.delay(attempt))
            attempt += 1

    def _listener(self, callback: Callable[[], None]) -> Callable[..., None]:
        """An asyncpg NOTIFY listener calling ``callback`` for other instances' commits only.

        This instance's own commits already woke their consumers in process (ingest → processor,
        processor → hub, alerts → hub): the echo of their NOTIFY would cost each a second store
        read per batch. Their backends' pids are those of our pool's open connections.
        """

        def listener(_conn: Conn, pid: int, _channel: str, _payload: str) -> None:
            pool = self._pool
            if pool is None or pid not in pool.pids:
                callback()

        return listener

    # -- outbox --------------------------------------------------------------------------

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Lease up to ``limit`` due, not dead outbox rows (oldest first) to ``owner``;
        concurrent claimers never get the same one (``FOR UPDATE SKIP LOCKED``)."""
        if limit < 1:
            return []
        rows = await self._run(lambda conn: conn.fetch(_CLAIM_OUTBOX, owner, limit, float(lease_seconds)))
        return sorted((OutboxItem(r[0], bytes(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows), key=lambda o: o.id)

    async def renew_outbox(self, owner: str, lease_seconds: float) -> int:
        """Extend every lease ``owner`` holds; returns how many."""
        count: int = await self._run(lambda conn: conn.fetchval(_RENEW_OUTBOX, owner, float(lease_seconds)))
        return count

    async def release_outbox(self, owner: str) -> int:
        """Drop every lease ``owner`` holds; returns how many."""
        count: int = await self._run(lambda conn: conn.fetchval(_RELEASE_OUTBOX, owner))
        return count

    async def outbox_done(self, ids: list[int]) -> None:
        """Delete rows the broker confirmed."""
        if ids:
            await self._run(lambda conn: conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids))

    async def outbox_failed(self, failures: list[PublishFailure]) -> None:
        """Record refusals (attempts+1, last_error, retry time or dead); releases the leases."""
        if failures:
            ids, errors, retries = [f.id for f in failures], [f.error for f in failures], [f.retry_at for f in failures]
            await self._run(lambda conn: conn.execute(_OUTBOX_FAILED, ids, errors, retries))

    async def outbox_stats(self) -> OutboxStats:
        """How many publishes wait (and since when) and how many are dead-lettered."""
        row = await self._run(lambda conn: conn.fetchrow(_OUTBOX_STATS))
        return OutboxStats(row[0], row[1], row[2])


# -- asyncio-side helpers (run on a connection inside one aio_as_trio call) -----------------


async def _guarded(conn: Conn, seconds: float, fn: Callable[[Conn], Awaitable[T]], expired: list[bool]) -> T:
    """``fn(conn)``, with the connection terminated if it takes longer than ``seconds`` or is
    cancelled: its state is then unknown, and a graceful cancel could wait on a dead server."""

    def expire() -> None:
        expired.append(True)
        conn.terminate()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await fn(conn)
    except asyncio.CancelledError:
        conn.terminate()
        raise
    finally:
        timer.cancel()


async def _use(
    conn: Conn | None,
    connect: Callable[[], Awaitable[Conn]],
    seconds: float,
    fn: Callable[[Conn], Awaitable[T]],
    expired: list[bool],
    used: list[Conn],
) -> T:
    """``fn`` on ``conn``, or on a new connection (appended to ``used``) when it is None."""
    if conn is None:
        conn = await connect()
        used.append(conn)
    return await _guarded(conn, seconds, fn, expired)


@asynccontextmanager
async def _transaction(conn: Conn) -> AsyncIterator[None]:
    """BEGIN/COMMIT; ROLLBACK on a server-side error. On cancellation or a lost connection the
    connection is terminated instead (asyncpg's own rollback would first wait for the cancel)."""
    await conn.execute("BEGIN")
    try:
        yield
    except asyncpg.PostgresError as exc:
        # A statement_timeout leaves the connection usable: roll back, keep it.
        if isinstance(exc, _UNAVAILABLE) and not isinstance(exc, asyncpg.exceptions.QueryCanceledError):
            conn.terminate()
        else:
            await conn.execute("ROLLBACK")
        raise
    except BaseException:
        conn.terminate()
        raise
    await conn.execute("COMMIT")


async def _select_one(conn: Conn) -> None:
    await conn.fetchval("SELECT 1")


async def _init_connection(conn: Conn) -> None:
    # Reads decode json/jsonb to Python; writes pass JSON text with ::jsonb casts.
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=loads, schema="pg_catalog")


def _message_columns(messages: list[NewMessage]) -> list[Any]:
    """The ``_INSERT_BATCH`` arrays of readings: NewMessage's fields, transposed in C; the
    measurements as JSON text, the topic storable."""
    if not messages:
        return [[] for _ in NewMessage._fields]
    columns: list[Any] = list(zip(*messages, strict=True))
    columns[4] = list(map(json_text, columns[4]))
    columns[9] = [t and safe_text(t) for t in columns[9]]
    return columns


async def _insert(
    conn: Conn, batch: Deduped, rejects: list[NewReject], *, partitioned: bool = True
) -> list[InsertOutcome]:
    """Run :data:`_INSERT_BATCH` (readings idempotently, and rejects); one outcome per message of
    the batch. Raises StoreRefused when a value cannot be stored (nothing was).

    ``partitioned`` False: the schema is older than migration 0004 (tests write through the store
    at old versions, then migrate), so :data:`_INSERT_BATCH_0003`, without the schema versions.
    """
    messages, rejected = _message_columns(batch.unique), _reject_columns(rejects)
    if not partitioned:
        messages, rejected = messages[:10], rejected[:6]
    params = [*messages, *rejected]
    try:
        new = [r[0] for r in await conn.fetch(_INSERT_BATCH if partitioned else _INSERT_BATCH_0003, *params)]
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
        # Nothing stored; a value of some row cannot be (the caller isolates it).
        raise StoreRefused(f"database refused a value: {_describe(exc)}") from exc
    if len(new) == len(batch.unique):
        new.sort()
        return batch.outcomes([InsertOutcome(i, False) for i in new])
    # Some were there already (redeliveries, or another instance's): look every key up.
    rows = await conn.fetch(_SELECT_EXISTING if partitioned else _SELECT_EXISTING_0003, params[0], params[3])
    return batch.outcomes(_outcomes(batch.unique, set(new), {(r[1], r[2]): r[0] for r in rows}))


def _reject(r: Any) -> StoredReject:
    return StoredReject(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7], r[8], r[9])


def _outcomes(messages: list[NewMessage], new: set[int], found: dict[tuple[str, str], int]) -> list[InsertOutcome]:
    """Each message's id (looked up by key) and whether it was there before this write."""
    out = []
    for m in messages:
        row_id = found.get((m.device_id, m.dedupe_key))
        if row_id is None:
            raise StoreCorrupt(f"message {(m.device_id, m.dedupe_key)} neither inserted nor found")
        out.append(InsertOutcome(row_id, row_id not in new))
    return out


def _reject_columns(rejects: list[NewReject]) -> list[list[Any]]:
    """The ``_INSERT_REJECTS`` arrays: the topic storable, the errors as storable JSON text."""
    rows = [
        (
            r.received_at,
            r.source,
            r.topic and safe_text(r.topic),
            r.payload,
            r.reason,
            safe_json(r.errors),
            r.schema_version,
        )
        for r in rejects
    ]
    return _columns(rows, 7)


async def _has_keys(conn: Conn) -> bool:
    found: bool = await conn.fetchval("SELECT to_regclass('message_keys') IS NOT NULL")
    return found


async def _fetchval(sql: str, conn: Conn) -> Any:
    return await conn.fetchval(sql)


async def _fetchrow(sql: str, *args_and_conn: Any) -> Any:
    *args, conn = args_and_conn
    return await conn.fetchrow(sql, *args)


async def _create_partition(name: str, lower: datetime, upper: datetime, has_default: bool, conn: Conn) -> bool:
    """Create partition ``name`` for ``[lower, upper)``: a table like messages, filled with the
    rows of that range the DEFAULT partition holds (ATTACH refuses while it holds any), attached.
    False when a lock was not granted in time. ATTACH locks messages less than CREATE ... PARTITION OF."""
    try:
        async with _transaction(conn):
            await conn.execute(f"SET LOCAL lock_timeout = {_PARTITION_LOCK_TIMEOUT_MS}")
            await conn.execute(f"SELECT pg_advisory_xact_lock({_PARTITION_LOCK})")
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                return True  # another instance made it
            await conn.execute(f"CREATE TABLE {name} (LIKE messages INCLUDING DEFAULTS)")
            if has_default:
                await conn.execute(
                    f"WITH moved AS (DELETE FROM {partitions.DEFAULT_PARTITION}"
                    " WHERE received_at >= $1 AND received_at < $2 RETURNING *)"
                    f" INSERT INTO {name} SELECT * FROM moved",
                    lower,
                    upper,
                )
            # Bounds are our own datetimes (DDL takes no parameters).
            await conn.execute(
                f"ALTER TABLE messages ATTACH PARTITION {name}"
                f" FOR VALUES FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
            )
    except asyncpg.exceptions.LockNotAvailableError:
        return False
    return True


async def _drop_partition(name: str, conn: Conn) -> bool:
    """Drop partition ``name`` (its keys are gone already); False when the lock on messages was
    not granted in time. Not DETACH ... CONCURRENTLY: PostgreSQL refuses it while a DEFAULT
    partition exists, and it cannot run in a transaction; the plain DROP holds its lock for a
    catalog change only (milliseconds), and lock_timeout keeps ingest from queueing behind it."""
    try:
        async with _transaction(conn):
            await conn.execute(f"SET LOCAL lock_timeout = {_PARTITION_LOCK_TIMEOUT_MS}")
            await conn.execute(f"SELECT pg_advisory_xact_lock({_PARTITION_LOCK})")
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                await conn.execute(f"DROP TABLE {name}")
    except asyncpg.exceptions.LockNotAvailableError:
        return False
    return True


async def _apply_migrations(conn: Conn) -> list[Migration]:
    files = _migrate.load_migrations("postgres")
    done: list[Migration] = []
    async with _transaction(conn):
        await conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK})")
        await conn.execute(_migrate.BOOTSTRAP["postgres"])
    for mig in files:
        async with _transaction(conn):
            # Instances starting together: one applies, the others see it recorded.
            await conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK})")
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", mig.version):
                continue
            await conn.execute(mig.sql)
            at = await conn.fetchval(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2) RETURNING applied_at",
                mig.version,
                mig.name,
            )
        log.info("applied migration %04d_%s", mig.version, mig.name)
        done.append(Migration(mig.version, mig.name, at))
    return done


async def _prepare(conn: Conn, intervals: tuple[int, ...]) -> list[Migration]:
    """Apply the migrations, then keep exactly the rollup ``intervals`` (see :func:`_sync_rollups`)."""
    done = await _apply_migrations(conn)
    await _sync_rollups(conn, intervals)
    return done


async def _sync_rollups(conn: Conn, intervals: tuple[int, ...]) -> None:
    """Add (and backfill from the processed readings) the intervals not kept yet, drop those no
    longer wanted. The lock holds off concurrent commits (which add to the rollups of the kept
    intervals) from before the backfill reads until it commits: each reading is counted once."""
    if not await conn.fetchval("SELECT to_regclass('rollup_intervals') IS NOT NULL"):
        return  # migrations stopped short of 0005 (tests of older migrations)
    kept = {r[0] for r in await conn.fetch("SELECT interval_s FROM rollup_intervals")}
    plan = sync_plan(intervals, kept)
    if not plan.add and not plan.drop:
        return
    async with _transaction(conn):
        await conn.execute("LOCK TABLE rollups IN EXCLUSIVE MODE")
        for seconds in plan.drop:
            await conn.execute("DELETE FROM rollups WHERE interval_s = $1", seconds)
            await conn.execute("DELETE FROM rollup_intervals WHERE interval_s = $1", seconds)
        for seconds in plan.add:
            inserted = await conn.fetchval(
                "INSERT INTO rollup_intervals (interval_s) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1", seconds
            )
            if inserted:  # else another instance added it first
                await conn.execute(PG_BACKFILL, seconds)
    log.info("rollup intervals: added %s, dropped %s", list(plan.add), list(plan.drop))


async def _commit(
    conn: Conn,
    owner: str,
    processed: list[int],
    failed: list[Failure],
    events: list[NewEvent],
    *,
    keep_all: bool,
    rollups: bool = False,
) -> tuple[set[int], list[Event]]:
    """Run :data:`_COMPLETE`: mark ``processed`` and ``failed`` (those still leased to ``owner``)
    and append the events of those messages (``keep_all``: every event); ``rollups``: also add the
    processed readings to the rollups. Returns the ids of the messages that were still ours and the
    appended events with their ids, in the given order."""
    encoded = [e.json if e.json is not None else dumps(e.data) for e in events]
    rows = await conn.fetch(
        _COMPLETE_ROLLUPS if rollups and processed else _COMPLETE,
        processed,
        owner,
        [f.message_id for f in failed],
        [f.error for f in failed],
        [f.retry_at for f in failed],
        [e.type for e in events],
        [raw.decode() for raw in encoded],
        [e.device_id for e in events],
        [e.message_id for e in events],
        keep_all,
    )
    owned = {r[1] for r in rows if not r[0]}
    appended = sorted((r for r in rows if r[0]), key=lambda r: r[1])  # ids were taken in input order
    kept = [(e, raw) for e, raw in zip(events, encoded, strict=True) if keep_all or e.message_id in owned]
    if len(kept) != len(appended):
        raise StoreCorrupt(f"{len(kept)} events to append, {len(appended)} appended")
    stored = [
        Event(r[1], e.type, e.data, r[2], e.device_id, raw, None, e.message_id)
        for r, (e, raw) in zip(appended, kept, strict=True)
    ]
    return owned, stored


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows to per-column lists (``width`` empty lists when there are no rows)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


def _describe(exc: BaseException) -> str:
    # Library messages name hosts and users, never the password; the DSN is never included.
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


async def _read_page(read: PageRead, conn: Conn) -> tuple[int, list[Any]]:
    """The capped total and the rows of one page, in the caller's read transaction."""
    return await conn.fetchval(read.count_sql, *read.count_params), await conn.fetch(read.page_sql, *read.page_params)


def _message(r: Any) -> StoredMessage:
    return StoredMessage(
        id=r[0],
        device_id=r[1],
        device_ts=r[2],
        received_at=r[3],
        seq=r[4],
        measurements=r[5],
        status=r[6],
        battery=r[7],
        source=r[8],
        processed_at=r[9],
        attempts=r[10],
        last_error=r[11],
        dead=r[12] is not None,
        schema_version=r[13],
    )


async def _enqueue(conn: Conn, publishes: list[NewPublish]) -> None:
    """Insert outbox rows (ids follow the given order)."""
    if publishes:
        await conn.execute(
            _INSERT_OUTBOX,
            [p.subtopic for p in publishes],
            [p.payload for p in publishes],
            [p.message_id for p in publishes],
            [p.event_id for p in publishes],
        )


class _Pool:
    """Open connections, lent on the Trio side: borrowing one costs no bridge crossing, no asyncio
    task and no reset round trip (asyncpg's own Pool spends ~250 µs of CPU per call on those under
    trio-asyncio, more than the query).

    A connection comes back idle only when it is open and outside a transaction: our statements
    leave no session state (``SET LOCAL``, transaction-level advisory locks, LISTEN only on the
    dedicated watch connection). Any other is terminated; the next borrower opens a new one.
    """

    def __init__(self, max_size: int) -> None:
        self._slots = trio.Semaphore(max_size)
        self._idle: list[Conn] = []
        self._open: dict[Conn, int] = {}  # connection -> its backend's pid
        self.pids: set[int] = set()  # of the open connections' backends (NOTIFY senders)
        self._closed = False

    def put(self, conn: Conn) -> None:
        """Add a new idle connection."""
        self._add(conn)
        self._idle.append(conn)

    def _add(self, conn: Conn) -> None:
        if conn not in self._open:
            pid: int = conn.get_server_pid()
            self._open[conn] = pid
            self.pids.add(pid)

    def _drop(self, conn: Conn) -> None:
        pid = self._open.pop(conn, None)
        if pid is not None:
            self.pids.discard(pid)

    async def take(self, seconds: float) -> Conn | None:
        """Take a slot, waiting at most ``seconds`` (else TimeoutError, as asyncpg's pool
        raises), and an idle connection, or None: the caller opens one."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(seconds) as scope:
                await self._slots.acquire()
            if scope.cancelled_caught:
                raise TimeoutError(f"no free database connection within {seconds:g} s") from None
        while self._idle:
            conn = self._idle.pop()  # the most recently used: a few connections stay warm
            if not conn.is_closed():
                return conn
            self._drop(conn)
        return None

    def give_back(self, conn: Conn | None) -> None:
        """Return the slot, and ``conn`` (the connection used, if any)."""
        try:
            if conn is not None:
                if self._closed or conn.is_closed() or conn.is_in_transaction():
                    conn.terminate()
                    self._drop(conn)
                else:
                    self._add(conn)
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def drain(self) -> list[Conn]:
        """Close the pool: the idle connections, to close; those in use are terminated when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._drop(conn)
        return idle
