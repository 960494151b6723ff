"""Retention (issue 10, item 12): expired rejects, events and processed readings are removed oldest
first in short batches on both stores, counted in a metric, and run by the processor; low free
disk space shows ``degraded`` in /ping (over real HTTP) and fires the alert, instead of a crash."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from prometheus_client import REGISTRY

from gateway.alerts import Alerts
from gateway.health import Health
from gateway.retention import RetentionPolicy, prune_expired
from gateway.settings import load_settings
from gateway.store.base import MessageQuery, PruneTable, Store
from tests.support.http import ApiServer
from tests.test_alerts import FAST, wall
from tests.test_processor import make, running, sqlite_store, wait_until
from tests.test_store import T0, msg, reject


@dataclass
class CountingStore:
    """Delegates to a real store and records each prune batch's size."""

    inner: Store
    batches: list[tuple[str, int]] = field(default_factory=list)

    async def prune(self, table: PruneTable, older_than: datetime, limit: int) -> int:
        removed = await self.inner.prune(table, older_than, limit)
        self.batches.append((table, removed))
        return removed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def deleted(table: str) -> float:
    return REGISTRY.get_sample_value("gateway_retention_deleted_total", {"table": table}) or 0.0


async def test_rejects_expire_oldest_first_in_batches(store: Store) -> None:
    await store.write_batch([], [reject(n) for n in range(25)])
    before = deleted("rejects")
    counting = CountingStore(store)
    policy = RetentionPolicy(events=None, rejects=10.0, messages=None, batch=4)
    # As of T0 + 20 s, rejects received before T0 + 10 s (n = 0..9) have expired.
    removed = await prune_expired(counting, policy, T0 + timedelta(seconds=20))  # type: ignore[arg-type]
    assert removed == {"rejects": 10}
    assert counting.batches == [("rejects", 4), ("rejects", 4), ("rejects", 2)]  # never more than a batch
    page = await store.query_rejects(limit=100)
    assert sorted(r.received_at for r in page.items) == [T0 + timedelta(seconds=n) for n in range(10, 25)]
    assert deleted("rejects") - before == 10
    # Nothing more has expired: one empty batch, nothing removed.
    assert await prune_expired(store, policy, T0 + timedelta(seconds=20)) == {"rejects": 0}


async def test_only_processed_readings_expire_and_only_when_asked(store: Store) -> None:
    ids = [o.id for o in await store.write_batch([msg(n=n) for n in range(10)], [])]
    claimed = await store.claim("me", 6, 30)
    await store.complete("me", [m.id for m in claimed], [], [])
    later = T0 + timedelta(days=365)
    off = RetentionPolicy(events=None, rejects=None, messages=None)
    assert await prune_expired(store, off, later) == {}  # MESSAGE_RETENTION is off by default
    assert (await store.query_messages(MessageQuery(limit=100))).total == 10

    before = deleted("messages")
    on = RetentionPolicy(events=None, rejects=None, messages=60.0, batch=4)
    assert await prune_expired(store, on, later) == {"messages": 6}
    left = await store.query_messages(MessageQuery(limit=100))
    assert sorted(m.id for m in left.items) == ids[6:]  # the unprocessed ones stay, whatever their age
    assert all(m.processed_at is None for m in left.items)
    assert deleted("messages") - before == 6


async def test_processor_runs_retention(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.05  # store calls run in threads
    async with sqlite_store(tmp_path) as store:
        await store.write_batch([], [reject(1), reject(2)])  # received in 2026-11: older than 1 s
        proc = make(store, interval=1.0, retention=RetentionPolicy(rejects=1.0), prune_every=1.0)

        async def gone() -> bool:
            return (await store.query_rejects(limit=10)).total == 0

        async with running(proc):
            await wait_until(gone, seconds=30, step=0.5)


async def test_low_disk_shows_degraded_in_ping_and_fires_alert(api: ApiServer, tmp_path: Path) -> None:
    health: Health = api.ctx.health
    db = tmp_path / "gateway.db"
    health.component("database").set("ok")

    def alerts(min_free: float, hold: float) -> Alerts:
        thresholds = replace(FAST, disk_min_free=min_free, disk_for=hold)
        return Alerts(health, api.store, api.publisher, clock=wall, disk_paths=[db], thresholds=thresholds)

    assert await alerts(0.999999, 60).check() == []  # any real disk is "low"; the alert waits ...
    assert health.component("disk").state == "degraded"  # ... /ping does not
    async with api.client("admin") as client:  # the cause is shown to admin keys only
        body = (await client.get("/api/v1/ping")).json()
    assert body["status"] == "degraded"
    assert body["components"]["disk"]["state"] == "degraded"
    assert "DISK_MIN_FREE" in body["components"]["disk"]["last_error"]
    assert await alerts(0.999999, 0).check() == [("disk_almost_full", "fire")]
    # A stored alert is published through the outbox, with its event.
    queued = await api.store.claim_outbox("test", 10, 60)
    assert [json.loads(o.payload)["data"]["alert"] for o in queued] == ["disk_almost_full"]

    await alerts(0, 0).check()
    assert health.component("disk").state == "ok"


def test_settings_reach_retention_and_disk_threshold(tmp_path: Path) -> None:
    env = tmp_path / "x.env"
    env.write_text("REJECT_RETENTION=3600\nMESSAGE_RETENTION=86400\nDISK_MIN_FREE=0.2\n", encoding="utf-8")
    s = load_settings(env, environ={})
    assert RetentionPolicy.from_settings(s.database) == RetentionPolicy(
        events=7 * 86400.0, rejects=3600.0, messages=86400.0
    )
    assert s.database.disk_min_free == 0.2
    default = load_settings(None, environ={}).database
    assert (default.reject_retention, default.message_retention, default.disk_min_free) == (30 * 86400.0, None, 0.1)


async def test_sqlite_backlog_goes_in_batches_while_ingest_commits(tmp_path: Path) -> None:
    """200,000 expired readings are deleted in batches of ``batch`` rows, one short transaction
    each, while ingest keeps committing: ingest never waits for the whole backlog. The longest
    prune batch (writer hold) and the longest ingest commit are printed."""
    backlog, batch = 200_000, 500
    async with sqlite_store(tmp_path) as store:
        for start in range(0, backlog, 5000):
            await store.write_batch([msg("old", n) for n in range(start, start + 5000)], [])
        db = store._settings.sqlite_path  # type: ignore[attr-defined]

        def mark_processed() -> None:
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE messages SET processed_at = received_at")

        await trio.to_thread.run_sync(mark_processed)
        holds: list[float] = []
        commits: list[tuple[float, float]] = []  # (end time, latency) of each ingest batch

        @dataclass
        class Timed(CountingStore):
            async def prune(self, table: PruneTable, older_than: datetime, limit: int) -> int:
                t = time.perf_counter()
                removed = await super().prune(table, older_than, limit)
                holds.append(time.perf_counter() - t)
                return removed

        done = trio.Event()
        span: list[float] = []

        async def ingest() -> None:
            n = 0
            while not done.is_set():
                t = time.perf_counter()
                await store.write_batch([msg("new", n + i, received_at=datetime.now(UTC)) for i in range(50)], [])
                commits.append((time.perf_counter(), time.perf_counter() - t))
                n += 50
                await trio.lowlevel.checkpoint()

        policy = RetentionPolicy(events=None, rejects=None, messages=60.0, batch=batch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ingest)
            await trio.sleep(0.05)
            span.append(time.perf_counter())
            removed = await prune_expired(Timed(store), policy, datetime.now(UTC))  # type: ignore[arg-type]
            span.append(time.perf_counter())
            done.set()
        assert removed == {"messages": backlog}
        assert len(holds) == backlog // batch + 1  # the last one finds nothing
        during = [lat for end, lat in commits if span[0] <= end <= span[1]]
        total = span[1] - span[0]
        print(
            f"prune {backlog} rows: {total:.2f} s, {len(holds)} batches, longest hold {max(holds) * 1000:.1f} ms;"
            f" {len(during)} ingest commits meanwhile, longest {max(during) * 1000:.1f} ms"
        )
        assert len(during) >= 10  # ingest commits interleave with the batches ...
        assert max(during) < total / 5  # ... and none waited for the whole backlog

        def count() -> list[tuple[str, int]]:
            with sqlite3.connect(db) as conn:
                return list(conn.execute("SELECT device_id, count(*) FROM messages GROUP BY device_id"))

        # Every ingested reading is there, none of the old.
        assert await trio.to_thread.run_sync(count) == [("new", len(commits) * 50)]
        detail = store.health.detail["retention"]
        assert detail["deleted_last_run"] == {"messages": backlog} and "partitions" not in detail


async def test_retention_shown_in_ping(api: ApiServer) -> None:
    api.ctx.health.add(api.store.health)  # as app.build does: the store owns its health record
    await api.store.write_batch([], [reject(n) for n in range(3)])
    policy = RetentionPolicy(events=3600.0, rejects=10.0, messages=None)
    await prune_expired(api.store, policy, T0 + timedelta(days=1))
    async with api.client("admin") as client:
        body = (await client.get("/api/v1/ping")).json()
    retention = body["components"]["database"]["retention"]
    assert retention["retention_seconds"] == {"events": 3600.0, "rejects": 10.0, "messages": None}
    assert retention["deleted_last_run"] == {"events": 0, "rejects": 3}
    assert retention["deleted_total"]["rejects"] == 3
    assert retention["last_run"] == (T0 + timedelta(days=1)).isoformat()
