"""API reads beside the writer (issue 10, item 7), on both stores: a write commits while long
reads run, an API query past ``API_QUERY_TIMEOUT`` answers 503 ``query_timeout`` over real HTTP,
and ``total`` is bounded by ``API_TOTAL_LIMIT``.

The reads are made long by a big table, built in one statement (recursive CTE / generate_series):
on SQLite fat rows whose ``json_each`` scan is slow, on PostgreSQL many rows and a filter with no
index (the GIN index is dropped, as on a database where the key/value filter cannot use it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio

from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import MessageQuery, Store
from tests.support.http import ApiServer
from tests.support.pg import db_settings, psql
from tests.test_store import msg

# A filter that matches nothing, so the count and the page scan the whole table.
SLOW = MessageQuery(limit=10, key="temperature", value="-1")
SLOW_PG = MessageQuery(limit=10, key="status", value="none-such")
SLOW_HTTP = {"sqlite": "key=temperature&value=-1", "postgres": "key=status&value=none-such"}


def fill(settings: DatabaseSettings, n: int) -> None:
    """Insert ``n`` readings in one statement, beside the store (already migrated)."""
    if settings.kind == "sqlite":
        padding = "".join(f'"m{k}": {k}.5, ' for k in range(60))  # json_each walks every entry
        conn = sqlite3.connect(settings.sqlite_path, isolation_level=None, timeout=30)
        try:
            conn.execute(
                "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < ?)"
                " INSERT INTO messages (device_id, dedupe_key, device_ts, received_at, seq, measurements,"
                " status, battery, source)"
                " SELECT 'dev-' || (i % 50), 'bulk:' || i, '2026-11-27T09:00:00.000000Z',"
                " '2026-11-27T09:00:00.000000Z', i, '{' || ? || '\"temperature\": ' || (i % 40) || '}',"
                " 'ok', 50.0, 'mqtt' FROM r",
                (n, padding),
            )
        finally:
            conn.close()
    else:
        url = settings.url.get_secret_value()
        psql(url, "DROP INDEX IF EXISTS messages_measurements")
        psql(
            url,
            "INSERT INTO messages (device_id, dedupe_key, device_ts, received_at, seq, measurements, status,"
            " battery, source) SELECT 'dev-' || (i % 50), 'bulk:' || i, now(), now(), i,"
            f" jsonb_build_object('temperature', i % 40), 'ok', 50.0, 'mqtt' FROM generate_series(1, {n}) i",
        )


def big(kind: str) -> int:
    # Enough rows that one filtered read takes well over 50 ms on either backend (a PostgreSQL
    # sequential scan of 200,000 rows came in at 48 ms on a quick moment).
    return 30_000 if kind == "sqlite" else 500_000


@asynccontextmanager
async def running(settings: DatabaseSettings) -> AsyncIterator[Store]:
    async with open_store(settings) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        yield st
        nursery.cancel_scope.cancel()


async def test_write_commits_while_long_reads_run(store_settings: DatabaseSettings) -> None:
    """More long API reads than the store has readers (or half a pool): a write still commits at
    once, before any read has finished, and the reads all complete."""
    settings = db_settings(
        store_settings.url.get_secret_value(), API_QUERY_TIMEOUT=60.0, DATABASE_QUERY_TIMEOUT=60.0, DATABASE_POOL_MAX=4
    )
    slow = SLOW if settings.kind == "sqlite" else SLOW_PG
    async with running(settings) as store:
        await trio.to_thread.run_sync(fill, settings, big(settings.kind))
        t0 = trio.current_time()
        await store.query_messages(slow)
        single = trio.current_time() - t0
        assert single > 0.05, f"the read is not long enough to prove anything ({single:.3f} s)"

        finished: list[float] = []

        async def read() -> None:
            page = await store.query_messages(slow)
            assert page.items == [] and page.total == 0
            finished.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(read)
            await trio.sleep(min(0.02, single / 4))  # the reads are under way
            started = trio.current_time()
            [outcome] = await store.write_batch([msg(n=1)], [])
            committed = trio.current_time()
            assert not outcome.duplicate
            assert finished == [], f"the write waited for a read ({committed - started:.3f} s)"
        assert len(finished) == 6
        got = await store.get_message(outcome.id)
        assert got is not None and got.seq == 1


async def test_timed_out_read_is_query_timeout_and_store_stays_ok(store_settings: DatabaseSettings) -> None:
    from gateway.errors import QueryTimeout

    settings = db_settings(store_settings.url.get_secret_value(), API_QUERY_TIMEOUT=0.01)
    slow = SLOW if settings.kind == "sqlite" else SLOW_PG
    async with running(settings) as store:
        await trio.to_thread.run_sync(fill, settings, big(settings.kind))
        with pytest.raises(QueryTimeout):
            await store.query_messages(slow)
        assert store.health.state == "ok"
        # The connection is reusable at once, and writes were never affected.
        [outcome] = await store.write_batch([msg(n=1)], [])
        assert (await store.query_messages(MessageQuery(limit=1))).items[0].id == outcome.id


async def test_total_is_bounded(store_settings: DatabaseSettings) -> None:
    settings = db_settings(store_settings.url.get_secret_value(), API_TOTAL_LIMIT=5)
    async with running(settings) as store:
        from tests.test_store import reject

        await store.write_batch([msg(n=i) for i in range(8)], [reject(i) for i in range(8)])
        page = await store.query_messages(MessageQuery(limit=2))
        assert (page.total, page.total_capped, len(page.items)) == (5, True, 2)
        narrow = await store.query_messages(MessageQuery(limit=2, key="seq", value="3"))
        assert (narrow.total, narrow.total_capped) == (1, False)
        rejects = await store.query_rejects(limit=100)
        assert (rejects.total, rejects.total_capped, len(rejects.items)) == (5, True, 8)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_api_query_timeout_over_http(
    kind: str, request: pytest.FixtureRequest, api_factory: Callable[..., AbstractAsyncContextManager[ApiServer]]
) -> None:
    env: dict[str, str] = {"API_QUERY_TIMEOUT": "0.01", "API_TOTAL_LIMIT": "100"}
    if kind == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    async with api_factory(env=env) as server:
        settings: DatabaseSettings = server.ctx.settings.database
        await trio.to_thread.run_sync(fill, settings, big(kind))
        async with server.client("read") as client:
            r = await client.get(f"/api/v1/messages?{SLOW_HTTP[kind]}")
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"
            body: dict[str, Any] = r.json()
            assert body["code"] == "query_timeout" and r.headers["Retry-After"]
            ok = await client.get("/api/v1/messages?limit=3&device_id=dev-1")
            assert ok.status_code == 200, ok.text
            page = ok.json()
            assert len(page["items"]) == 3 and page["total"] == 100 and page["total_capped"] is True
