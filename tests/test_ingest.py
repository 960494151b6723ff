"""Ingest: batching, validation into rejects, ack-after-commit, retry while the store is down."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
import trio.testing

from gateway.errors import StoreUnavailable
from gateway.health import ComponentHealth
from gateway.ingest import Ingest, to_records
from gateway.mqtt import Inbound
from gateway.settings import DatabaseSettings, IngestSettings
from gateway.store.base import InsertOutcome, MessageQuery, NewMessage, NewReject, Store
from tests.support.mqtt import eventually, malformed_packets, packet
from tests.support.pg import psql


def inbound(payload: bytes, mid: int = 1, *, dup: bool = False, topic: str = "sensors/x/data") -> Inbound:
    return Inbound(topic, payload, datetime.now(UTC), mid, 1, dup, 1)


class FakeStore:
    """Just enough Store for failure-handling tests: fails ``fail`` times, then records batches."""

    kind = "fake"

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls = 0
        self.batches: list[tuple[list[NewMessage], list[NewReject]]] = []
        self.commit_times: list[float] = []

    async def write_batch(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.fail > 0:
            self.fail -= 1
            raise StoreUnavailable("database down (fake)")
        self.batches.append((messages, rejects))
        self.commit_times.append(trio.current_time())
        return [InsertOutcome(i, False) for i, _ in enumerate(messages)]


class Recorder:
    """Collects acks and commit notifications, remembering what the store held at each ack."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.acked: list[Inbound] = []
        self.commits = 0
        self.store = store
        self.stored_at_ack: list[int] = []

    def ack(self, messages: Sequence[Inbound]) -> None:
        if self.store is not None:
            self.stored_at_ack.append(sum(len(m) + len(r) for m, r in self.store.batches))
        self.acked.extend(messages)

    def on_commit(self) -> None:
        self.commits += 1


def make_ingest(store: Any, rec: Recorder, health: ComponentHealth | None = None, **kw: Any) -> Ingest:
    settings = IngestSettings(**{"batch_size": 100, "flush_ms": 5.0, **kw})
    return Ingest(settings, store, rec.ack, rec.on_commit, health or ComponentHealth("ingest"))


def test_to_records_splits_good_and_bad() -> None:
    batch = [inbound(packet("a", 1)), inbound(b"{oops"), inbound(packet("a", 2, ts=1.79e12))]
    messages, rejects = to_records(batch, 65536)
    assert [m.seq for m in messages] == [1, 2]
    assert messages[0].dedupe_key == "seq:1@2026-09-21T14:13:20.001000Z" and messages[0].source == "mqtt"
    assert messages[1].device_ts.year == 2026  # milliseconds since the epoch
    assert [r.reason for r in rejects] == ["bad_json"] and rejects[0].payload == b"{oops"
    assert rejects[0].topic == "sensors/x/data" and rejects[0].errors


def test_every_malformed_kind_has_its_reason() -> None:
    cases = malformed_packets()
    _, rejects = to_records([inbound(p) for _, p in cases], 65536)
    assert [r.reason for r in rejects] == [reason for reason, _ in cases]
    too_large = rejects[-1]
    assert len(too_large.payload) == 65536  # kept, truncated to the limit


async def test_batches_by_size_and_by_timer(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    rec = Recorder(store)
    ingest = make_ingest(store, rec, batch_size=100, flush_ms=50)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        # 250 at once: two full batches immediately, the rest after the flush delay.
        t0 = trio.current_time()
        await send.send([inbound(packet("b", i), i) for i in range(250)])
        await trio.sleep(1)
        assert [len(m) for m, _ in store.batches] == [100, 100, 50]
        assert store.commit_times[1] - t0 < 0.001 and 0.049 < store.commit_times[2] - t0 < 0.051
        # A trickle: one batch per flush window, not one per message.
        for i in range(10):
            await send.send([inbound(packet("c", i), 1000 + i)])
        await trio.sleep(1)
        assert len(store.batches) == 4 and len(store.batches[3][0]) == 10
        nursery.cancel_scope.cancel()
    assert [m.mid for m in rec.acked] == list(range(250)) + list(range(1000, 1010))  # arrival order
    assert rec.commits == 4


async def test_reconfigure_applies_to_the_batch_being_filled(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    rec = Recorder(store)
    ingest = make_ingest(store, rec, batch_size=1000, flush_ms=10_000)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        await send.send([inbound(packet("r", i), i) for i in range(25)])
        await eventually(lambda: ingest.held == 25)
        await trio.sleep(1)
        assert store.batches == [] and rec.acked == []  # waiting for 1000 or 10 s
        t0 = trio.current_time()
        ingest.reconfigure(IngestSettings(batch_size=10, flush_ms=5))
        await eventually(lambda: len(rec.acked) == 25)
        # The held batch is cut by the new size at once (it is older than the new flush_ms); the
        # rest of 5 starts the next batch, flushed 5 ms later, not 10 s.
        assert [len(m) for m, _ in store.batches] == [10, 10, 5]
        assert store.commit_times[1] - t0 < 0.001 and store.commit_times[2] - t0 < 0.006
        # Larger again: the next batch waits for the new size or the new flush.
        ingest.reconfigure(IngestSettings(batch_size=50, flush_ms=200))
        t1 = trio.current_time()
        await send.send([inbound(packet("r", i), i) for i in range(25, 45)])
        await eventually(lambda: len(rec.acked) == 45)
        assert [len(m) for m, _ in store.batches[3:]] == [20]
        assert 0.199 < store.commit_times[-1] - t1 < 0.201
        nursery.cancel_scope.cancel()
    assert [m.mid for m in rec.acked] == list(range(45)) and ingest.held == 0


async def test_store_outage_keeps_batch_unacked_and_retries(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore(fail=6)
    rec = Recorder(store)
    health = ComponentHealth("ingest")
    ingest = make_ingest(store, rec, health)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(ingest.run, recv)
        t0 = trio.current_time()
        await send.send([inbound(packet("o", i), i) for i in range(10)] + [inbound(b"bad", 99)])
        await trio.sleep(0.1)
        assert rec.acked == [] and health.state == "degraded" and "database" in (health.last_error or "")
        await eventually(lambda: bool(rec.acked), 60)
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    assert store.calls == 7
    # Six backoff sleeps: at least 6 x 0.05 s, at most 0.05+0.1+0.2+0.4+0.8+1.6 (+ flush).
    assert 0.3 <= elapsed <= 3.2
    assert rec.stored_at_ack == [11]  # acked only after the commit holding all of them
    assert [m.mid for m in rec.acked] == [*range(10), 99]
    assert len(store.batches) == 1 and len(store.batches[0][0]) == 10 and len(store.batches[0][1]) == 1
    assert health.state == "ok"


async def test_closing_the_channel_flushes_and_returns(autojump_clock: trio.testing.MockClock) -> None:
    store = FakeStore()
    rec = Recorder(store)
    ingest = make_ingest(store, rec, batch_size=10, flush_ms=10_000)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    await send.send([inbound(packet("z", i), i) for i in range(25)])
    await send.aclose()
    with trio.fail_after(1):
        await ingest.run(recv)
    assert [len(m) for m, _ in store.batches] == [10, 10, 5]


async def test_other_store_errors_propagate_without_ack(autojump_clock: trio.testing.MockClock) -> None:
    class Broken(FakeStore):
        async def write_batch(self, m: list[NewMessage], r: list[NewReject]) -> list[InsertOutcome]:
            raise RuntimeError("schema missing")

    rec = Recorder()
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    await send.send([inbound(packet("e", 1))])
    with pytest.raises(RuntimeError):
        await make_ingest(Broken(), rec).run(recv)
    assert rec.acked == []


# ----------------------------------------------------------------------------------- real stores


async def run_ingest(store: Store, batches: list[list[Inbound]], rec: Recorder) -> None:
    ingest = make_ingest(store, rec)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run, recv)
        for b in batches:
            await send.send(b)
        await send.aclose()


async def test_redelivery_stored_once(store: Store) -> None:
    rec = Recorder()
    first = [inbound(packet("r", i), i) for i in range(20)]
    redelivered = [inbound(packet("r", i), 100 + i, dup=True) for i in range(20)]
    no_dup_flag = [inbound(packet("r", 5), 500)]  # a device re-publishing the same seq
    await run_ingest(store, [first, redelivered, no_dup_flag], rec)
    page = await store.query_messages(MessageQuery(limit=100, device_id="r"))
    assert page.total == 20
    assert sorted(m.seq for m in page.items) == list(range(20))
    assert len(rec.acked) == 41  # duplicates are acked too (they are committed)


async def test_the_detail_counts_stored_readings_duplicates_and_rejects_apart(store: Store) -> None:
    rec = Recorder()
    health = ComponentHealth("ingest")
    ingest = make_ingest(store, rec, health)
    first = [inbound(packet("c", i), i) for i in range(5)] + [inbound(b"{oops", 9)]
    again = [inbound(packet("c", i), 10 + i, dup=True) for i in range(3)] + [inbound(packet("c", 5), 20)]
    send, recv = trio.open_memory_channel[list[Inbound]](8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ingest.run, recv)
        for b in (first, again):
            await send.send(b)
        await send.aclose()
    assert health.detail == {"committed": 10, "stored": 6, "duplicates": 3, "rejected": 1}
    assert (ingest.committed, ingest.stored, ingest.duplicates, ingest.rejected) == (10, 6, 3, 1)


async def test_malformed_interleaved_with_good(store: Store) -> None:
    kinds = malformed_packets()
    bad = [kinds[i % len(kinds)] for i in range(1000)]
    stream: list[Inbound] = []
    for i in range(2000):
        stream.append(inbound(packet("g", i), len(stream)))
        if i % 2 == 0:
            stream.append(inbound(bad[i // 2][1], len(stream), topic=f"sensors/bad{i}/data"))
    rec = Recorder()
    with trio.fail_after(60):
        await run_ingest(store, [stream[i : i + 37] for i in range(0, len(stream), 37)], rec)
    assert (await store.query_messages(MessageQuery(limit=1, device_id="g"))).total == 2000
    rejects = await store.query_rejects(limit=1000)
    assert rejects.total == 1000
    assert {r.reason for r in rejects.items} == {reason for reason, _ in kinds}
    assert all(r.errors and r.topic and r.topic.startswith("sensors/bad") for r in rejects.items)
    assert [m.mid for m in rec.acked] == list(range(3000))


async def test_rebooted_device_keeps_every_reading(store: Store) -> None:
    # The counter restarts after a reboot: same seqs, new timestamps are new readings. A redelivery
    # (same device, seq and timestamp) is still stored once.
    before = [inbound(packet("boot", s, ts=1_790_000_000 + s), s) for s in range(1, 101)]
    after = [inbound(packet("boot", s, ts=1_790_100_000 + s), 100 + s) for s in range(1, 101)]
    rec = Recorder()
    await run_ingest(store, [before[:50], before[50:], after], rec)
    assert (await store.query_messages(MessageQuery(limit=1, device_id="boot"))).total == 200
    redelivered = [inbound(m.payload, 1000 + i, dup=True) for i, m in enumerate(before + after)]
    await run_ingest(store, [redelivered[i : i + 37] for i in range(0, 200, 37)], rec)
    assert (await store.query_messages(MessageQuery(limit=1, device_id="boot"))).total == 200
    assert (await store.query_rejects(limit=1)).total == 0
    assert len(rec.acked) == 400


def _refuse_seq(settings: DatabaseSettings, seq: int) -> None:
    """Make the real database refuse (as a data error) any reading with ``seq``."""
    if settings.kind == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as conn:
            conn.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.seq = {seq}"
                " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        return
    psql(
        settings.url.get_secret_value(),
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF NEW.seq = {seq} THEN RAISE EXCEPTION 'refused by test' USING ERRCODE = 'data_exception'; END IF;"
        " RETURN NEW; END $$;"
        " CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse()",
    )


async def test_refused_message_is_isolated_and_rejected(store: Store, store_settings: DatabaseSettings) -> None:
    # A value the database refuses fails the whole batch; bisection finds it, stores it as an
    # `unstorable` reject, and every other message of the batch is stored and acked.
    _refuse_seq(store_settings, 66)
    rec = Recorder()
    batch = [inbound(packet("bis", i), i) for i in range(100)]
    with trio.fail_after(60):
        await run_ingest(store, [batch[:60], batch[60:]], rec)
    page = await store.query_messages(MessageQuery(limit=200, device_id="bis"))
    assert sorted(m.seq for m in page.items) == [i for i in range(100) if i != 66]
    rejects = (await store.query_rejects(limit=10)).items
    assert [(r.reason, r.payload, r.topic) for r in rejects] == [("unstorable", packet("bis", 66), "sensors/x/data")]
    assert [m.mid for m in rec.acked] == list(range(100))
