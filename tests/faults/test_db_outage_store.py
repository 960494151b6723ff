"""PostgreSQL outages seen by the store: each test owns a throwaway server it stops, freezes
and starts again. Operations must fail fast with StoreUnavailable (never hang), health must say
degraded, and the same running store must recover on its own."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable

import pytest
import trio

from gateway import metrics
from gateway.errors import StoreUnavailable
from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import MessageQuery, NewEvent, Store
from tests.support.pg import PgServer, db_settings
from tests.test_store import msg

QUERY_TIMEOUT = 2.0


def _settings(server: PgServer) -> DatabaseSettings:
    return db_settings(
        server.url(),
        DATABASE_QUERY_TIMEOUT=QUERY_TIMEOUT,
        DATABASE_CONNECT_TIMEOUT=1.0,
        DATABASE_RETRY_MAX=0.3,
    )


def _state(store: Store) -> str:
    return store.health.state


async def _until_ok(store: Store, seconds: float = 15.0) -> None:
    """Ping until it works (the store reconnects by itself)."""
    with trio.fail_after(seconds):
        while True:
            try:
                await store.ping()
                return
            except StoreUnavailable:
                await trio.sleep(0.1)


async def _assert_unavailable_fast(op: Callable[[], object]) -> None:
    start = trio.current_time()
    with pytest.raises(StoreUnavailable) as info:
        await op()  # type: ignore[misc]
    assert trio.current_time() - start < QUERY_TIMEOUT + 1.0
    assert "password" not in str(info.value) and "postgresql://" not in str(info.value)


async def test_outage_and_recovery(pg_server_factory: Callable[[], PgServer]) -> None:
    server = pg_server_factory()
    heard = {"message": 0, "baseline": 1_000_000}
    relistened = trio.Event()

    def on_message() -> None:
        heard["message"] += 1
        if heard["message"] > heard["baseline"]:
            relistened.set()

    async with open_store(_settings(server)) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(store.watch, on_message, lambda: None)
        assert _state(store) == "ok" and metrics.DB_UP._value.get() == 1
        assert heard["message"] == 1  # once after LISTEN
        [before] = await store.write_batch([msg(n=1)], [])

        await server.astop()
        heard["baseline"] = heard["message"]
        await _assert_unavailable_fast(lambda: store.write_batch([msg(n=2)], []))
        await _assert_unavailable_fast(lambda: store.claim("a", 10, 30))
        await _assert_unavailable_fast(lambda: store.query_messages(MessageQuery()))
        await _assert_unavailable_fast(lambda: store.append_events([NewEvent("alert", {})]))
        assert _state(store) == "degraded" and store.health.last_error
        assert metrics.DB_UP._value.get() == 0

        await server.astart()
        await _until_ok(store)
        outcomes = await store.write_batch([msg(n=1), msg(n=2)], [])
        assert (outcomes[0].id, outcomes[0].duplicate) == (before.id, True)
        assert not outcomes[1].duplicate
        assert _state(store) == "ok" and store.health.detail["reconnects"] >= 1
        # The LISTEN connection came back too: called once after reconnecting.
        with trio.fail_after(15):
            await relistened.wait()
        nursery.cancel_scope.cancel()


async def test_database_down_at_start(pg_server_factory: Callable[[], PgServer]) -> None:
    """run() reports started (degraded) without a database and connects when it appears."""
    server = pg_server_factory()
    await server.astop()
    async with open_store(_settings(server)) as store, trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(store.run)
        assert _state(store) == "degraded"
        with pytest.raises(StoreUnavailable, match="not connected"):
            await store.ping()
        with trio.fail_after(5):
            await nursery.start(store.watch, lambda: None, lambda: None)  # also starts degraded

        await server.astart()
        await _until_ok(store)
        assert all(m.applied_at is not None for m in await store.migration_status())
        await store.write_batch([msg(n=1)], [])
        nursery.cancel_scope.cancel()


def _server_pids(server: PgServer) -> list[int]:
    """The postmaster of this test's own server and its children (never anyone else's)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout
    return [postmaster, *(int(p) for p in children.split())]


async def test_frozen_database_times_out(pg_server_factory: Callable[[], PgServer]) -> None:
    """A server that stops answering (SIGSTOP) costs at most the query timeout, then recovers."""
    server = pg_server_factory()
    async with open_store(_settings(server)) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write_batch([msg(n=1)], [])
        pids = _server_pids(server)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            await _assert_unavailable_fast(lambda: store.write_batch([msg(n=2)], []))
            await _assert_unavailable_fast(store.ping)
            assert _state(store) == "degraded"
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await _until_ok(store)
        assert [o.duplicate for o in await store.write_batch([msg(n=1), msg(n=3)], [])] == [True, False]
        nursery.cancel_scope.cancel()
