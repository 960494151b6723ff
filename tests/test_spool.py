"""The disk spool and ingest's switch to and from it (a real spool file; the database is a fake
that is down or up on demand). The outage against real PostgreSQL and mosquitto:
tests/faults/test_spool.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from gateway import app, metrics
from gateway.errors import StoreUnavailable
from gateway.health import ComponentHealth, Health
from gateway.ingest import Ingest
from gateway.mqtt import Inbound
from gateway.settings import DatabaseSettings, IngestSettings, Settings
from gateway.spool import Spool
from gateway.store.base import InsertOutcome, NewMessage, NewReject
from tests.support.mqtt import eventually, packet
from tests.test_ingest import FakeStore, Recorder, inbound


@pytest.fixture(autouse=True)
def _threads_finish(mock_clock: trio.testing.MockClock) -> None:
    # Virtual time, but jump only once the spool's worker thread (SQLite, fsync) has had time to end.
    mock_clock.autojump_threshold = 0.05


class SwitchStore(FakeStore):
    """A fake database that is down while ``down`` is set; records what it stored, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def write_batch(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("database down (fake)")
        return await super().write_batch(messages, rejects)

    def seqs(self) -> list[int | None]:
        return [m.seq for messages, _ in self.batches for m in messages]

    def rejects(self) -> int:
        return sum(len(r) for _, r in self.batches)


def _batch(start: int, count: int) -> list[Inbound]:
    return [inbound(packet("d", i), mid=i + 1) for i in range(start, start + count)]


def _ingest(store: Any, rec: Recorder, spool: Spool, **kw: Any) -> Ingest:
    settings = IngestSettings(**{"batch_size": 100, "flush_ms": 5.0, "spool_after": 2.0, **kw})
    return Ingest(settings, store, rec.ack, rec.on_commit, ComponentHealth("ingest"), spool=spool)


async def test_outage_past_spool_after_spools_acks_and_drains_in_order(tmp_path: Path) -> None:
    store, health = SwitchStore(), ComponentHealth("spool")
    rec = Recorder()
    spool = Spool(tmp_path / "spool.db", 1 << 30, health)
    ingest = _ingest(store, rec, spool)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    spooled = metrics.SPOOL_SPOOLED._value.get()
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        await send.send(_batch(0, 50))
        await eventually(lambda: len(rec.acked) == 50)
        store.down = True
        await send.send(_batch(50, 50))
        await trio.sleep(1.0)
        assert len(rec.acked) == 50 and not spool.active  # still retrying: not yet SPOOL_AFTER
        await eventually(lambda: len(rec.acked) == 100)  # then spooled and acked
        assert spool.rows == 50 and health.state == "degraded" and health.detail["mode"] == "spooling"
        await send.send(_batch(100, 50) + [inbound(b"{bad", mid=999)])
        await eventually(lambda: len(rec.acked) == 151)
        assert spool.rows == 101 and store.seqs() == list(range(50))
        store.down = False
        await send.send(_batch(150, 50))  # arrives while the spool drains: it goes behind it
        await eventually(lambda: len(store.seqs()) == 200 and not spool.active)
        nursery.cancel_scope.cancel()
    assert store.seqs() == list(range(200))  # arrival order across the outage
    assert store.rejects() == 1  # a reject is spooled like a reading
    assert health.state == "ok" and health.detail["mode"] == "empty" and health.detail["rows"] == 0
    assert [m.mid for m in rec.acked] == [*range(1, 151), 999, *range(151, 201)]
    assert metrics.SPOOL_SPOOLED._value.get() - spooled == 151


async def test_full_spool_stops_acking_until_it_drains(tmp_path: Path) -> None:
    store, health = SwitchStore(), ComponentHealth("spool")
    rec = Recorder()
    spool = Spool(tmp_path / "spool.db", 1 << 16, health)  # 64 KiB: a few batches of ~150-byte packets
    ingest = _ingest(store, rec, spool)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    store.down = True
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        for i in range(20):
            await send.send(_batch(i * 100, 100))
        await eventually(lambda: spool.full, 30)
        # The append that filled it counts its bytes in the worker thread, before it returns and
        # its batch is acked: let that last ack land, then nothing more may be acked.
        await trio.sleep(1)
        acked = len(rec.acked)
        await trio.sleep(10)
        assert len(rec.acked) == acked < 2000  # full: nothing more is acked
        assert health.detail["mode"] == "full" and health.code == "spool_full"
        assert metrics.SPOOL_FULL._value.get() == 1
        store.down = False
        await eventually(lambda: len(rec.acked) == 2000 and not spool.active, 60)
        nursery.cancel_scope.cancel()
    assert store.seqs() == list(range(2000))
    assert metrics.SPOOL_FULL._value.get() == 0


async def test_rows_left_by_a_previous_run_drain_first(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path, 1 << 30, ComponentHealth("spool"))
    await first.open()
    assert await first.append(_batch(0, 30))
    await first.aclose()
    with sqlite3.connect(path) as conn:  # durable: another connection sees the rows
        assert conn.execute("SELECT count(*) FROM spool").fetchone()[0] == 30
    store, rec = SwitchStore(), Recorder()
    spool = Spool(path, 1 << 30, ComponentHealth("spool"))
    ingest = _ingest(store, rec, spool)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        await send.send(_batch(30, 10))
        await eventually(lambda: len(store.seqs()) == 40)
        nursery.cancel_scope.cancel()
    assert store.seqs() == list(range(40)) and not spool.active


async def test_a_drain_redone_after_a_crash_stores_duplicates_only(tmp_path: Path) -> None:
    """A crash after the database commit and before the spool delete re-sends those rows: each
    has the dedupe key of the first copy (same packet, same receive time)."""
    spool = Spool(tmp_path / "spool.db", 1 << 30, ComponentHealth("spool"))
    await spool.open()
    try:
        batch = _batch(0, 5)
        assert await spool.append(batch)
        _, first = await spool.head(100)
        _, again = await spool.head(100)  # not removed: what a restart would read
        assert first == again
        assert [(m.topic, m.payload, m.received_at) for m in first] == [
            (m.topic, m.payload, m.received_at) for m in batch
        ]
        assert all(m.generation == -1 for m in first)  # never acked twice
    finally:
        await spool.aclose()


def test_sqlite_database_ignores_the_spool(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def settings(url: str) -> Settings:
        base = Settings.model_construct(
            database=DatabaseSettings(url=url),
            ingest=IngestSettings(spool_after=30, spool_path=tmp_path / "s.db"),
        )
        return base

    assert app._spool(settings(f"sqlite:///{tmp_path}/g.db"), Health()) is None
    assert "SPOOL_AFTER is ignored" in caplog.text
    spool = app._spool(settings("postgresql://u@h/db"), Health())
    assert spool is not None and spool.path == tmp_path / "s.db"
    off = Settings.model_construct(database=DatabaseSettings(url="postgresql://u@h/db"), ingest=IngestSettings())
    assert app._spool(off, Health()) is None  # off by default
