"""The Store contract, run against both backends (SQLite and a real PostgreSQL), plus
PostgreSQL-only concurrency tests (SKIP LOCKED claims, commit-order event ids, LISTEN/NOTIFY)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.errors import StoreCorrupt
from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import Failure, MessageQuery, NewEvent, NewMessage, NewReject, Store
from tests.support.pg import db_settings, psql

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def msg(device: str = "dev-1", n: int = 0, **kw: Any) -> NewMessage:
    """A message; ``n`` sets seq, dedupe key and timestamp (T0 + n seconds)."""
    values: dict[str, Any] = {
        "device_id": device,
        "device_ts": T0 + timedelta(seconds=n),
        "seq": n,
        "dedupe_key": f"seq:{n}",
        "measurements": {"temperature": 20 + n % 5, "humidity": 40.5},
        "status": "ok",
        "battery": 87.0,
        "source": "mqtt",
        "received_at": T0 + timedelta(seconds=n, milliseconds=5),
        "topic": f"sensors/{device}/data",
    }
    values.update(kw)
    return NewMessage(**values)


def reject(n: int = 0) -> NewReject:
    return NewReject(
        received_at=T0 + timedelta(seconds=n),
        source="mqtt",
        topic="sensors/x/data",
        payload=b"\xff{not json" + str(n).encode(),
        reason="invalid_json",
        errors=[{"loc": [], "msg": "bad", "type": "json"}],
    )


async def test_write_batch_is_idempotent(store: Store) -> None:
    first = await store.write_batch([msg(n=1), msg(n=2), msg(n=1)], [])
    assert [o.duplicate for o in first] == [False, False, True]
    assert first[0].id == first[2].id != first[1].id
    assert first[0].id < first[1].id  # ids follow batch order

    again = await store.write_batch([msg(n=2), msg(n=3), msg("dev-2", 1)], [])
    assert [o.duplicate for o in again] == [True, False, False]
    assert again[0].id == first[1].id
    page = await store.query_messages(MessageQuery(limit=100))
    assert page.total == 4
    assert await store.write_batch([], []) == []


async def test_stored_message_round_trip(store: Store) -> None:
    m = msg(n=7, measurements={"t": 21, "h": 40.25}, battery=None, seq=None, source="api")
    [out] = await store.write_batch([m], [])
    got = await store.get_message(out.id)
    assert got is not None
    assert (got.device_id, got.device_ts, got.received_at) == ("dev-1", m.device_ts, m.received_at)
    assert got.seq is None
    assert got.measurements == {"t": 21, "h": 40.25}
    assert isinstance(got.measurements["t"], int)
    assert (got.status, got.battery, got.source, got.processed_at, got.attempts, got.dead) == (
        "ok",
        None,
        "api",
        None,
        0,
        False,
    )
    assert got.to_json()["timestamp"] == "2026-11-27T09:00:07Z"
    assert await store.get_message(out.id + 1000) is None


async def test_latest_per_device_is_each_devices_newest_reading(store: Store) -> None:
    assert await store.latest_per_device(10) == []
    # dev-a's newest reading by device time arrived first (a device replaying its buffer later);
    # dev-b has two readings with the same timestamp: the later id wins.
    await store.write_batch([msg("dev-a", 9), msg("dev-b", 1), msg("dev-c", 3)], [])
    outcomes = await store.write_batch([msg("dev-a", 2), msg("dev-b", 5, seq=None, dedupe_key="h:1")], [])
    [b_last] = await store.write_batch([msg("dev-b", 5, seq=None, dedupe_key="h:2", battery=12.5)], [])
    assert not any(o.duplicate for o in outcomes)
    got = await store.latest_per_device(10)
    assert [(m.device_id, m.device_ts) for m in got] == [
        ("dev-a", T0 + timedelta(seconds=9)),
        ("dev-b", T0 + timedelta(seconds=5)),
        ("dev-c", T0 + timedelta(seconds=3)),
    ]  # newest first
    assert got[1].id == b_last.id and got[1].battery == 12.5
    assert got[0] == await store.get_message(got[0].id)  # whole rows
    # Bounded: the devices with the newest readings.
    assert [m.device_id for m in await store.latest_per_device(2)] == ["dev-a", "dev-b"]


async def test_battery_reads_back_as_a_float_on_every_path(store: Store) -> None:
    """SSE shows the claimed row, REST the queried one: an integral battery is 87.0 on both."""
    [out] = await store.write_batch([msg(n=1, battery=87.0)], [])
    [claimed] = await store.claim("owner", 10, 30)
    read = await store.get_message(out.id)
    [queried] = (await store.query_messages(MessageQuery())).items
    [latest] = await store.latest_per_device(1)
    for m in (claimed, read, queried, latest):
        assert m is not None and type(m.battery) is float and m.battery == 87.0


async def test_rejects_stored_with_messages(store: Store) -> None:
    await store.write_batch([msg(n=1)], [reject(1), reject(2)])
    await store.write_batch([], [reject(3)])
    page = await store.query_rejects(limit=2)
    assert page.total == 3
    assert [r.payload for r in page.items] == [b"\xff{not json3", b"\xff{not json2"]
    assert page.items[0].errors == [{"loc": [], "msg": "bad", "type": "json"}]
    assert page.items[0].reason == "invalid_json" and page.items[0].topic == "sensors/x/data"
    assert page.next_cursor is not None
    rest = await store.query_rejects(limit=2, cursor=page.next_cursor)
    assert [r.payload for r in rest.items] == [b"\xff{not json1"] and rest.next_cursor is None
    with pytest.raises(ValueError):
        await store.query_rejects(limit=2, cursor="nonsense!")


async def test_claim_leases(store: Store) -> None:
    ids = [o.id for o in await store.write_batch([msg(n=i) for i in range(10)], [])]
    a = await store.claim("a", 4, 30)
    assert [m.id for m in a] == ids[:4]  # oldest first
    b = await store.claim("b", 100, 30)
    assert [m.id for m in b] == ids[4:]  # never the same rows
    assert await store.claim("c", 100, 30) == []

    # An expired lease is claimed again by someone else.
    await store.write_batch([msg(n=100)], [])
    [short] = await store.claim("a", 10, 0.2)
    await trio.sleep(0.5)
    [again] = await store.claim("c", 10, 30)
    assert again.id == short.id


async def test_complete_only_for_owner(store: Store) -> None:
    ids = [o.id for o in await store.write_batch([msg(n=i) for i in range(4)], [])]
    await store.claim("a", 2, 0.2)
    await trio.sleep(0.4)
    await store.claim("b", 2, 30)  # b took over a's (expired) leases: ids[0], ids[1]
    stored = await store.complete(
        "a", [ids[0]], [Failure(ids[1], "boom", None)], [NewEvent("packet", {"id": ids[0]}, ids[0], "dev-1")]
    )
    assert stored == {}  # a lost its lease: nothing marked, nothing appended
    m0 = await store.get_message(ids[0])
    assert m0 is not None and m0.processed_at is None
    assert await store.read_events(0, 10) == []

    stored = await store.complete(
        "b", [ids[0]], [Failure(ids[1], "boom", None)], [NewEvent("packet", {"id": ids[0]}, ids[0], "dev-1")]
    )
    assert stored.keys() == {ids[0], ids[1]}
    assert [(e.type, e.data, e.device_id) for e in stored[ids[0]]] == [("packet", {"id": ids[0]}, "dev-1")]
    m0, m1 = await store.get_message(ids[0]), await store.get_message(ids[1])
    assert m0 is not None and m0.processed_at is not None and m0.attempts == 0
    assert m1 is not None and m1.dead and m1.attempts == 1 and m1.last_error == "boom"
    # Done and dead messages are not claimed again.
    assert [m.id for m in await store.claim("c", 10, 30)] == ids[2:]


async def test_complete_returns_the_stored_events_keyed_by_message(store: Store) -> None:
    """Every message still ours is a key (one with no events too), with its events in the order
    given and their ids; a message whose lease was lost is absent and its events are not appended."""
    ids = [o.id for o in await store.write_batch([msg(n=i) for i in range(4)], [])]
    await store.claim("a", 4, 30)
    assert await store.complete("x", [], [], []) == {}
    lost = ids[3]
    await store.complete("a", [lost], [], [])  # no longer a's: done already, as after a reclaim
    several = [NewEvent(f"t{k}", {"k": k}, ids[0], "dev-1") for k in range(3)]
    events = [*several, NewEvent("late", {}, lost, "dev-1"), NewEvent("failing", {"f": 1}, ids[2], "dev-1")]
    stored = await store.complete("a", [ids[0], ids[1], lost], [Failure(ids[2], "boom", None)], events)

    assert stored.keys() == {ids[0], ids[1], ids[2]}
    assert stored[ids[1]] == []
    assert [(e.type, e.data, e.message_id, e.device_id) for e in stored[ids[0]]] == [
        (f"t{k}", {"k": k}, ids[0], "dev-1") for k in range(3)
    ]
    assert [(e.type, e.message_id) for e in stored[ids[2]]] == [("failing", ids[2])]
    appended = [e.id for e in [*stored[ids[0]], *stored[ids[2]]]]
    assert appended == sorted(appended) and len(set(appended)) == 4  # ids follow the given order
    read = await store.read_events(0, 10)
    assert read == [*stored[ids[0]], *stored[ids[2]]]  # the same events, message ids included
    with pytest.raises(ValueError, match="message_id"):
        await store.complete("a", [], [], [NewEvent("alert", {})])  # untied: append_events


async def test_retry_at_respected(store: Store) -> None:
    [o] = await store.write_batch([msg(n=1)], [])
    await store.claim("a", 1, 30)
    retry_at = datetime.now(UTC) + timedelta(seconds=0.6)
    await store.complete("a", [], [Failure(o.id, "later", retry_at)], [])
    assert await store.claim("a", 1, 30) == []
    m = await store.get_message(o.id)
    assert m is not None and not m.dead and m.attempts == 1 and m.last_error == "later"
    backlog = await store.backlog()
    assert (backlog.count, backlog.dead) == (1, 0)
    await trio.sleep(0.8)
    [again] = await store.claim("a", 1, 30)
    assert again.id == o.id and again.attempts == 1


async def test_backlog(store: Store) -> None:
    b = await store.backlog()
    assert (b.count, b.oldest, b.dead) == (0, None, 0)
    ids = [o.id for o in await store.write_batch([msg(n=i) for i in range(5)], [])]
    await store.claim("a", 3, 30)
    await store.complete("a", [ids[0]], [Failure(ids[1], "x", None)], [])
    b = await store.backlog()
    assert (b.count, b.dead) == (3, 1)
    assert b.oldest == msg(n=2).received_at


async def test_events_order_filters_bounds_prune(store: Store) -> None:
    assert await store.event_bounds() == (0, 0)
    assert await store.read_events(0, 10) == []
    appended = await store.append_events(
        [NewEvent("alert", {"n": 1}, device_id="d1"), NewEvent("packet", {"n": 2}, device_id="d2")]
    )
    appended += await store.append_events([NewEvent("packet", {"n": 3}, device_id="d1")])
    ids = [e.id for e in appended]
    assert ids == sorted(ids) and len(set(ids)) == 3
    everything = await store.read_events(0, 10)
    assert [(e.id, e.type, e.data, e.device_id) for e in everything] == [
        (e.id, e.type, e.data, e.device_id) for e in appended
    ]
    assert [e.data["n"] for e in await store.read_events(ids[0], 10)] == [2, 3]
    assert [e.data["n"] for e in await store.read_events(0, 1)] == [1]
    assert [e.data["n"] for e in await store.read_events(0, 10, types=frozenset({"packet"}))] == [2, 3]
    assert [e.data["n"] for e in await store.read_events(0, 10, device_id="d1")] == [1, 3]
    assert [e.data["n"] for e in await store.read_events(0, 10, frozenset({"alert"}), "d2")] == []
    assert await store.event_bounds() == (ids[0], ids[2])

    assert await store.prune_events(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.prune_events(datetime.now(UTC) + timedelta(seconds=1)) == 3
    assert await store.event_bounds() == (0, 0)
    [later] = await store.append_events([NewEvent("alert", {})])
    assert later.id > ids[2]  # ids are never reused


async def _all_pages(store: Store, query: MessageQuery) -> tuple[list[int], int]:
    seen: list[int] = []
    cursor = None
    totals = set()
    while True:
        page = await store.query_messages(
            MessageQuery(query.limit, query.start_time, query.end_time, query.device_id, query.key, query.value, cursor)
        )
        totals.add(page.total)
        seen += [m.id for m in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(totals) == 1  # total ignores the cursor
    return seen, totals.pop()


async def test_query_messages(store: Store) -> None:
    batch = [msg("dev-a", i) for i in range(30)] + [msg("dev-b", i, status="warning") for i in range(30, 45)]
    ids = [o.id for o in await store.write_batch(batch, [])]

    seen, total = await _all_pages(store, MessageQuery(limit=7))
    assert seen == sorted(ids, reverse=True) and total == 45  # newest first, each once

    async def q(**kw: Any) -> list[int]:
        page = await store.query_messages(MessageQuery(limit=1000, **kw))
        assert page.total == len(page.items) and page.next_cursor is None
        return sorted(m.id for m in page.items)

    assert await q(device_id="dev-b") == ids[30:]
    assert await q(start_time=T0 + timedelta(seconds=10), end_time=T0 + timedelta(seconds=20)) == ids[10:20]
    assert await q(start_time=T0 + timedelta(seconds=40)) == ids[40:]
    assert await q(end_time=T0 + timedelta(seconds=2)) == ids[:2]
    # measurement values compare as numbers: temperature is 20 + n % 5 (an int)
    assert await q(key="temperature", value="21") == [ids[i] for i in range(45) if i % 5 == 1]
    assert await q(key="temperature", value="21.0") == await q(key="temperature", value="21")
    assert await q(key="temperature", value="2.1e1", device_id="dev-a") == [ids[i] for i in range(30) if i % 5 == 1]
    assert await q(key="humidity", value="40.5") == ids
    assert await q(key="humidity", value="40.50") == ids
    assert await q(key="humidity", value="40") == []
    assert await q(key="humidity", value="warm") == []
    assert await q(key="humidity") == ids
    assert await q(key="nope", value="1") == []
    assert await q(key='we"ird', value="1") == []
    # top-level fields
    assert await q(key="status", value="warning") == ids[30:]
    assert await q(key="device_id", value="dev-a") == ids[:30]
    assert await q(key="seq", value="3") == [ids[3]]
    assert await q(key="seq", value="3.0") == [ids[3]]
    assert await q(key="seq", value="three") == []
    assert await q(key="battery", value="87") == ids
    assert await q(key="source", value="api") == []
    # combined with paging
    query = MessageQuery(limit=4, device_id="dev-a", key="temperature", value="24")
    seen, total = await _all_pages(store, query)
    assert seen == [ids[i] for i in reversed(range(30)) if i % 5 == 4] and total == 6

    for bad in ("!!", "aWQ6eA", "eHg6MQ", ""):
        with pytest.raises(ValueError):
            await store.query_messages(MessageQuery(cursor=bad))
    with pytest.raises(ValueError):
        await store.query_messages(MessageQuery(value="1"))
    with pytest.raises(ValueError):
        await store.query_messages(MessageQuery(limit=0))


async def test_migrations_idempotent(store: Store) -> None:
    status = await store.migration_status()
    assert status and all(m.applied_at is not None for m in status)
    assert status[0].version == 1 and status[0].name == "initial"
    assert await store.migrate() == []
    assert await store.migration_status() == status
    await store.ping()
    assert store.health.state == "ok"


async def test_migrate_without_run(store_settings: DatabaseSettings) -> None:
    """``migrate()`` / ``migration_status()`` work on a store that is not running (the CLI)."""
    async with open_store(store_settings) as store:
        before = await store.migration_status()
        assert before and all(m.applied_at is None for m in before)
        applied = await store.migrate()
        assert [m.version for m in applied] == [m.version for m in before]
        assert await store.migrate() == []
        after = await store.migration_status()
    assert all(m.applied_at is not None for m in after)


# -- PostgreSQL only ---------------------------------------------------------------------


@pytest.fixture
async def pg_store(pg_url: str) -> Any:
    async with open_store(db_settings(pg_url)) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        yield st
        nursery.cancel_scope.cancel()


async def test_pg_concurrent_claimers_each_message_once(pg_store: Store) -> None:
    for start in range(0, 2000, 500):
        await pg_store.write_batch([msg(f"d{i % 7}", i) for i in range(start, start + 500)], [])
    claimed: dict[str, list[int]] = {}

    async def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        while batch := await pg_store.claim(name, 37, 60):
            mine += [m.id for m in batch]
            await pg_store.complete(name, [m.id for m in batch], [], [])
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for w in range(10):
            nursery.start_soon(worker, f"w{w}")
    every = [i for ids in claimed.values() for i in ids]
    assert len(every) == len(set(every)) == 2000
    assert sum(1 for ids in claimed.values() if ids) > 1  # really concurrent
    assert (await pg_store.backlog()).count == 0


async def test_pg_event_ids_follow_commit_order(pg_store: Store) -> None:
    """Two committers append concurrently; a reader polling ``id > last`` never misses one."""
    per_writer = 300
    done = trio.Event()
    seen: list[int] = []
    written: list[int] = []

    async def writer(tag: str) -> None:
        for i in range(per_writer):
            [e] = await pg_store.append_events([NewEvent("alert", {"w": tag, "i": i})])
            written.append(e.id)

    async def reader() -> None:
        last = 0
        while True:
            finished = done.is_set()
            for e in await pg_store.read_events(last, 1000):
                assert e.id > last
                seen.append(e.id)
                last = e.id
            if finished:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        async with trio.open_nursery() as writers:
            writers.start_soon(writer, "a")
            writers.start_soon(writer, "b")
        done.set()
    assert sorted(seen) == sorted(written) and len(seen) == 2 * per_writer


async def test_pg_watch_hears_other_connections(pg_url: str, pg_store: Store) -> None:
    heard = {"message": 0, "event": 0}
    got_message, got_event = trio.Event(), trio.Event()

    def on_message() -> None:
        heard["message"] += 1
        if heard["message"] > 1:
            got_message.set()

    def on_event() -> None:
        heard["event"] += 1
        if heard["event"] > 1:
            got_event.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(pg_store.watch, on_message, on_event)
        assert heard == {"message": 1, "event": 1}  # once after connecting
        # Another store (another pool, as another instance would be) writes.
        async with open_store(db_settings(pg_url)) as other, trio.open_nursery() as n2:
            await n2.start(other.run)
            with trio.fail_after(5):
                await other.write_batch([msg(n=1)], [])
                await got_message.wait()
                await other.append_events([NewEvent("alert", {})])
                await got_event.wait()
            before = dict(heard)
            await other.write_batch([msg(n=1)], [])  # a duplicate only: no NOTIFY
            await trio.sleep(0.3)
            assert heard == before
            n2.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_pg_watch_skips_its_own_notifies(pg_store: Store) -> None:
    """This instance's own commits woke their consumers in process: the NOTIFY echo is not heard
    (it would cost each consumer a second store read per batch)."""
    heard = {"message": 0, "event": 0}

    def on(kind: str) -> Callable[[], None]:
        return lambda: heard.__setitem__(kind, heard[kind] + 1)

    async with trio.open_nursery() as nursery:
        await nursery.start(pg_store.watch, on("message"), on("event"))
        assert heard == {"message": 1, "event": 1}  # once after connecting
        for n in range(3):
            await pg_store.write_batch([msg(n=100 + n)], [])
            await pg_store.append_events([NewEvent("alert", {})])
        await trio.sleep(0.5)
        assert heard == {"message": 1, "event": 1}
        nursery.cancel_scope.cancel()


async def test_pg_connection_left_in_a_transaction_is_not_reused(pg_store: Store) -> None:
    """A pooled connection comes back only when it is outside a transaction."""
    run = pg_store._run  # type: ignore[attr-defined]

    async def in_transaction(conn: Any) -> bool:
        return bool(conn.is_in_transaction())

    await run(lambda conn: conn.execute("BEGIN"))
    for _ in range(3):
        assert not await run(in_transaction)
    await pg_store.ping()


async def test_pg_broken_schema_is_corrupt(pg_url: str, pg_store: Store) -> None:
    """A schema not as expected is StoreCorrupt (a bug), not StoreUnavailable (retry)."""
    await trio.to_thread.run_sync(psql, pg_url, "DROP TABLE events")
    with pytest.raises(StoreCorrupt, match="events"):
        await pg_store.read_events(0, 10)
    assert pg_store.health.state == "ok"


async def test_sqlite_broken_schema_is_corrupt(tmp_path: Path) -> None:
    async with open_store(db_settings(f"sqlite:///{tmp_path}/x/gw.db")) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        assert (tmp_path / "x" / "gw.db").exists()  # parent directory created
        with sqlite3.connect(tmp_path / "x" / "gw.db") as other:
            other.execute("DROP TABLE events")
        with pytest.raises(StoreCorrupt, match="events"):
            await st.read_events(0, 10)
        nursery.cancel_scope.cancel()


async def test_pg_concurrent_writers_same_keys(pg_url: str, pg_store: Store) -> None:
    """Two instances storing the same redeliveries at once: one row each, both learn its id."""
    batch = [msg(f"d{i % 3}", i) for i in range(300)]
    results: list[list[tuple[int, bool]]] = []

    async def write(store: Store) -> None:
        for start in range(0, 300, 50):
            out = await store.write_batch(batch[start : start + 50], [])
            results.append([(o.id, o.duplicate) for o in out])

    async with open_store(db_settings(pg_url)) as other, trio.open_nursery() as nursery:
        await nursery.start(other.run)
        async with trio.open_nursery() as writers:
            writers.start_soon(write, pg_store)
            writers.start_soon(write, other)
        nursery.cancel_scope.cancel()
    ids: dict[int, list[bool]] = {}
    for chunk in results:
        for row_id, dup in chunk:
            ids.setdefault(row_id, []).append(dup)
    assert len(ids) == 300
    assert all(sorted(dups) == [False, True] for dups in ids.values())
    assert (await pg_store.query_messages(MessageQuery(limit=1))).total == 300


async def test_sqlite_synchronous_full(tmp_path: Path) -> None:
    # WAL + NORMAL can roll back a committed (already acked) transaction after a power cut.
    from gateway.store.sqlite import SqliteStore

    st = SqliteStore(db_settings(f"sqlite:///{tmp_path}/gateway.db"))
    try:
        mode = await st._call(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
        level = await st._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    finally:
        await st.aclose()
    assert (mode, level) == ("wal", 2)  # 2 = FULL


async def test_events_carry_their_encoding(store: Store) -> None:
    """The stored event hands on the JSON it was stored with; a replay read gives the same data."""
    [o] = await store.write_batch([msg(n=1)], [])
    await store.claim("a", 1, 30)
    raw = b'{"id":%d,"t":21.5,"note":"\\u00e9"}' % o.id
    data = {"id": o.id, "t": 21.5, "note": "é"}
    [ev] = (await store.complete("a", [o.id], [], [NewEvent("packet", data, o.id, json=raw)]))[o.id]
    assert ev.json == raw
    [alert] = await store.append_events([NewEvent("alert", {"x": [1, None]})])
    assert alert.json is not None and json.loads(alert.json) == {"x": [1, None]}
    read = await store.read_events(0, 10)
    assert [(e.id, e.data) for e in read] == [(ev.id, data), (alert.id, {"x": [1, None]})]
    assert all(e.json is not None and json.loads(e.json) == e.data for e in read)


async def test_sqlite_lease_writes_leave_the_writer_durable(tmp_path: Path) -> None:
    """Claims and outbox leases commit without waiting for the disk; every other write still does."""
    from gateway.store.sqlite import SqliteStore

    st = SqliteStore(db_settings(f"sqlite:///{tmp_path}/gateway.db"))

    async def level() -> int:
        value: int = await st._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        return value

    try:
        await st.migrate()
        [o] = await st.write_batch([msg(n=1)], [])
        assert [m.id for m in await st.claim("a", 5, 30)] == [o.id]
        assert await level() == 2  # FULL again after the claim
        await st.claim_outbox("p", 5, 30)
        await st.renew_outbox("p", 30)
        await st.outbox_done([1])
        assert await level() == 2
        with pytest.raises(StoreCorrupt):
            await st._lease("UPDATE nope SET x = 1", lambda r: r, "a", 1, 30)
        assert await level() == 2  # restored after a failed lease write too
    finally:
        await st.aclose()
