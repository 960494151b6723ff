"""The hub: live fan-out, replay after Last-Event-ID with no gap and no repeat, reset, slow subscribers.

Against real stores (SQLite and PostgreSQL via the ``store`` fixture), real clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from gateway import metrics
from gateway.hub import Hub
from gateway.store import open_store
from gateway.store.base import Event, NewEvent, Store
from gateway.subscription import Subscription
from tests.support.pg import db_settings


def new_events(start: int, n: int, *, type_: str = "packet", devices: int = 2) -> list[NewEvent]:
    return [NewEvent(type=type_, data={"n": i}, device_id=f"d{i % devices}") for i in range(start, start + n)]


@asynccontextmanager
async def running_hub(store: Store, **kw: float) -> AsyncIterator[Hub]:
    hub = Hub(store, poll_interval=kw.pop("poll_interval", 0.5), **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield hub
        nursery.cancel_scope.cancel()


async def take(sub: Subscription, n: int, seconds: float = 20.0) -> list[Event]:
    out: list[Event] = []
    with trio.fail_after(seconds):
        async for ev in sub:
            out.append(ev)
            if len(out) == n:
                break
    return out


async def append(store: Store, hub: Hub, events: list[NewEvent]) -> list[Event]:
    stored = await store.append_events(events)
    hub.notify()
    return stored


async def test_live_only_from_now_with_filters(store: Store) -> None:
    await store.append_events(new_events(0, 5))  # before: never seen by a live-only subscriber
    async with running_hub(store) as hub:
        async with (
            hub.subscribe(last_event_id=None, types=None, device_id=None) as every,
            hub.subscribe(last_event_id=None, types=frozenset({"alert"}), device_id="d1") as alerts,
        ):
            assert hub.clients == 2
            stored = await append(store, hub, new_events(5, 10))
            stored += await append(store, hub, new_events(15, 10, type_="alert"))
            got = await take(every, 20)
            assert [e.id for e in got] == [e.id for e in stored]
            got = await take(alerts, 5)
            assert [e.data["n"] for e in got] == [15, 17, 19, 21, 23]
            assert all(e.type == "alert" and e.device_id == "d1" for e in got)
        assert hub.clients == 0


async def test_replay_then_live_no_gap_no_repeat(store: Store) -> None:
    first = await store.append_events(new_events(0, 100))
    async with running_hub(store, replay_limit=7) as hub:
        async with hub.subscribe(last_event_id=first[39].id, types=None, device_id=None) as sub:
            later = await append(store, hub, new_events(100, 30))
            got = await take(sub, 90)
            assert [e.id for e in got] == [e.id for e in first[40:] + later]
        # Filtered replay too.
        packets = frozenset({"packet"})
        async with hub.subscribe(last_event_id=first[0].id, types=packets, device_id="d0") as sub:
            got = await take(sub, 64)
            assert [e.data["n"] for e in got] == list(range(2, 130, 2))


@pytest.mark.parametrize("page", [1, 3, 10, None])
async def test_replay_pages_are_bounded_with_no_gap_no_repeat(store: Store, page: int | None) -> None:
    """Replay reads the store one bounded page at a time, as the client takes events: whatever the
    page size, the start (on and around page boundaries) and the filters, the client gets exactly
    the stored events after its id, then live ones, and never holds more than one page."""
    stored = await store.append_events(new_events(0, 1200 if page is None else 40, devices=3))
    stored += await store.append_events(new_events(1200, 10, type_="alert", devices=3))
    kw = {} if page is None else {"replay_limit": page}
    async with running_hub(store, **kw) as hub:
        window = hub.replay_limit
        assert window <= 256, "the default window must stay small: it is held per subscriber"
        ids = [e.id for e in stored]
        starts = sorted({0, ids[0], ids[window - 1], ids[min(window, len(ids) - 1)], ids[-2], ids[-1]})
        for start in starts:
            for types, device in [(None, None), (frozenset({"packet"}), "d1"), (frozenset({"alert"}), None)]:
                async with hub.subscribe(last_event_id=start, types=types, device_id=device) as sub:
                    expected = [e for e in stored if e.id > start and sub.matches(e)]
                    got: list[Event] = []
                    peak = 0
                    with trio.fail_after(30):
                        while len(got) < len(expected):
                            got.append(await sub.__anext__())
                            peak = max(peak, len(sub._pending))
                        assert [e.id for e in got] == [e.id for e in expected], (start, types, device)
                        assert peak <= window
                        # Then live, right after the last replayed one.
                        type_ = "alert" if types == {"alert"} else "packet"
                        live = await append(store, hub, [NewEvent(type=type_, data={"n": -1}, device_id="d1")])
                        stored += live
                        assert (await sub.__anext__()).id == live[0].id


async def test_iteration_is_cancel_safe(store: Store) -> None:
    """The HTTP side may wrap each step in a heartbeat timeout: cancelling never loses an event."""
    first = await store.append_events(new_events(0, 300))
    async with (
        running_hub(store, replay_limit=20) as hub,
        hub.subscribe(last_event_id=first[9].id, types=None, device_id=None) as sub,
    ):
        live = await append(store, hub, new_events(300, 100))
        got: list[Event] = []
        cancelled = 0
        with trio.fail_after(30):
            while len(got) < 390:
                # Mostly tiny timeouts (cancelling mid-query), sometimes room to finish one.
                with trio.move_on_after(0.05 if cancelled % 4 == 3 else 0.0002) as scope:
                    got.append(await sub.__anext__())
                cancelled += scope.cancelled_caught
        assert [e.id for e in got] == [e.id for e in first[10:] + live]
        assert cancelled > 0


async def test_reset_when_id_expired_or_unknown(store: Store) -> None:
    old = await store.append_events(new_events(0, 10))
    await store.prune_events(datetime.now(UTC) + timedelta(seconds=1))  # everything so far is gone
    kept = await store.append_events(new_events(10, 5))
    async with running_hub(store) as hub:
        async with hub.subscribe(last_event_id=old[2].id, types=None, device_id=None) as sub:
            live = await append(store, hub, new_events(15, 3))
            got = await take(sub, 4)
            assert got[0].type == "reset" and got[0].data["reason"] == "expired"
            assert got[0].id == kept[-1].id  # the position: a reconnect from here misses nothing live
            assert [e.id for e in got[1:]] == [e.id for e in live]
        async with hub.subscribe(last_event_id=live[-1].id + 1000, types=None, device_id=None) as sub:
            got = await take(sub, 1)
            assert got[0].type == "reset" and got[0].data["reason"] == "unknown"
        # Up to date, or just at the oldest kept: no reset.
        async with hub.subscribe(last_event_id=kept[0].id - 1, types=None, device_id=None) as sub:
            got = await take(sub, 8)
            assert [e.id for e in got] == [e.id for e in kept + live]


async def test_slow_subscriber_dropped_without_blocking(store: Store) -> None:
    dropped_before = metrics.SSE_DROPPED._value.get()
    async with (
        running_hub(store, subscriber_buffer=10, max_lag=0.3, poll_interval=0.05) as hub,
        hub.subscribe(last_event_id=None, types=None, device_id=None) as slow,
        hub.subscribe(last_event_id=None, types=None, device_id=None) as fast,
    ):
        stored: list[Event] = []
        received: list[Event] = []

        async def read_fast() -> None:
            received.extend(await take(fast, 200))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            for i in range(0, 200, 5):
                stored += await append(store, hub, new_events(i, 5))
                await trio.sleep(0.01)
        assert [e.id for e in received] == [e.id for e in stored]
        await trio.sleep(0.5)  # longer than max_lag: the slow one is dropped
        assert hub.dropped == 1
        assert metrics.SSE_DROPPED._value.get() - dropped_before == 1
        # Its stream ends (the browser would reconnect and replay).
        with trio.fail_after(1):
            rest = [e async for e in slow]
        assert [e.id for e in rest] == [e.id for e in stored[: len(rest)]]


async def test_burst_larger_than_buffer_catches_up_without_drop(store: Store) -> None:
    async with (
        running_hub(store, subscriber_buffer=10) as hub,
        hub.subscribe(last_event_id=None, types=None, device_id=None) as sub,
    ):
        stored = await append(store, hub, new_events(0, 500))  # one tail page, 50x the buffer
        stored += await append(store, hub, new_events(500, 100))
        got = await take(sub, 600)
        assert [e.id for e in got] == [e.id for e in stored]
        assert hub.dropped == 0


async def test_replay_catches_up_when_live_overflows_during_replay(store: Store) -> None:
    first = await store.append_events(new_events(0, 3000))
    async with (
        running_hub(store, subscriber_buffer=20, replay_limit=50) as hub,
        hub.subscribe(last_event_id=0, types=None, device_id=None) as sub,
    ):
        got: list[Event] = []
        produced: list[Event] = list(first)

        async def produce() -> None:
            for i in range(3000, 4000, 20):
                produced.extend(await append(store, hub, new_events(i, 20)))
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            got = await take(sub, 4000, seconds=60)
        assert [e.id for e in got] == [e.id for e in produced]
        assert hub.dropped == 0


async def test_close_ends_a_waiting_step_and_every_later_one(store: Store) -> None:
    """``close()`` (the server stopping) ends iteration at once, also for a step already waiting."""
    async with running_hub(store) as hub, hub.subscribe(last_event_id=None, types=None, device_id=None) as sub:
        ended = trio.Event()

        async def wait_for_one() -> None:
            with pytest.raises(StopAsyncIteration):
                await sub.__anext__()
            ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_one)
            await trio.testing.wait_all_tasks_blocked()
            sub.close()
            with trio.fail_after(1):
                await ended.wait()
        await append(store, hub, new_events(0, 3))
        assert [e async for e in sub] == []


async def test_hub_stop_ends_subscriptions(store: Store) -> None:
    hub = Hub(store, poll_interval=0.5)
    ended = trio.Event()

    async def consume() -> None:
        async with hub.subscribe(last_event_id=None, types=None, device_id=None) as sub:
            async for _ in sub:
                pass
        ended.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(consume)
        async with trio.open_nursery() as hub_scope:
            await hub_scope.start(hub.run)
            await trio.sleep(0.1)
            hub_scope.cancel_scope.cancel()  # stops the hub's run() only
        with trio.fail_after(1):
            await ended.wait()


async def _burst_with_reconnect(
    consumer_store: Store, producers: list[tuple[Store, Callable[[], None]]], hub: Hub, total: int
) -> None:
    """Producers append ``total`` events in small commits; a client drops mid-burst and resumes."""
    per = total // len(producers)

    async def produce(st: Store, wake: Callable[[], None], base: int) -> None:
        for i in range(base, base + per, 25):
            await st.append_events(new_events(i, 25))
            wake()
            await trio.lowlevel.checkpoint()

    seen: list[Event] = []
    async with trio.open_nursery() as nursery:
        async with hub.subscribe(last_event_id=None, types=None, device_id=None) as sub:
            for k, (st, wake) in enumerate(producers):
                nursery.start_soon(produce, st, wake, k * per)
            seen += await take(sub, total // 3)
        # Disconnected mid-burst; the burst goes on. Reconnect with the last id we saw.
        await trio.sleep(0.05)
        async with hub.subscribe(last_event_id=seen[-1].id, types=None, device_id=None) as sub:
            seen += await take(sub, total - len(seen), seconds=60)
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids)), "events repeated or out of order"
    everything = await consumer_store.read_events(after_id=0, limit=total + 10)
    assert len(everything) == total
    assert ids == [e.id for e in everything], "gap"
    assert sorted(e.data["n"] for e in seen) == list(range(total))


async def test_reconnect_mid_burst_exactly_once(store: Store) -> None:
    async with running_hub(store) as hub:
        await _burst_with_reconnect(store, [(store, hub.notify)], hub, 5000)


async def test_reconnect_mid_burst_two_instances_postgres(pg_url: str, tmp_path: Path) -> None:
    """Two "instances" (two stores on one database) write concurrently; the hub of one of them is
    woken by NOTIFY for the other's events (store.watch), as in production."""
    settings = db_settings(pg_url)
    async with (
        open_store(settings) as a,
        open_store(settings) as b,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(a.run)
        await nursery.start(b.run)
        hub = Hub(a, poll_interval=5.0)  # a long poll: the wake-ups must come from NOTIFY
        await nursery.start(hub.run)
        await nursery.start(a.watch, lambda: None, hub.notify)
        await _burst_with_reconnect(a, [(a, hub.notify), (b, lambda: None)], hub, 5000)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("n", [1])
async def test_metrics_clients_gauge(store: Store, n: int) -> None:
    before = metrics.SSE_CLIENTS._value.get()
    async with running_hub(store) as hub, hub.subscribe(last_event_id=None, types=None, device_id=None):
        assert metrics.SSE_CLIENTS._value.get() - before == n
    assert metrics.SSE_CLIENTS._value.get() == before


async def test_two_instances_processing_subscriber_reconnects_exactly_once(pg_url: str) -> None:
    """Two instances (store + processor each) process one backlog on one database; a subscriber of
    instance A's hub (woken by its processor and by NOTIFY for B's commits) disconnects mid-way and
    resumes with its last id: every message's packet event arrives exactly once, in id order."""
    from gateway.health import ComponentHealth
    from gateway.processor import Processor
    from gateway.settings import ProcessorSettings
    from gateway.wake import Nudge
    from tests.test_processor import insert, new_messages

    total = 3000
    settings = db_settings(pg_url)
    proc_settings = ProcessorSettings.model_validate({"PROCESSOR_INTERVAL": 0.2, "PROCESSOR_BATCH_SIZE": 100})
    async with (
        open_store(settings) as a,
        open_store(settings) as b,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(a.run)
        await nursery.start(b.run)
        hub = Hub(a, poll_interval=5.0)
        await nursery.start(hub.run)
        nudge_a, nudge_b = Nudge(), Nudge()
        await nursery.start(a.watch, nudge_a.set, hub.notify)
        await nursery.start(b.watch, nudge_b.set, lambda: None)
        seen: list[Event] = []
        packets = frozenset({"packet"})
        async with hub.subscribe(last_event_id=None, types=packets, device_id=None) as sub:
            for i, (st, nudge) in enumerate([(a, nudge_a), (b, nudge_b)]):
                proc = Processor(
                    proc_settings,
                    st,
                    nudge,
                    ComponentHealth(f"p{i}"),
                    instance_id=f"inst-{i}",
                    rules=None,
                    on_committed=hub.committed if st is a else None,
                )
                await nursery.start(proc.run)
            for start in range(0, total, 500):
                await insert(b, new_messages(500, start=start))
            seen += await take(sub, total // 3, seconds=60)
        async with hub.subscribe(last_event_id=seen[-1].id, types=packets, device_id=None) as sub:
            seen += await take(sub, total - len(seen), seconds=60)
        everything = await a.read_events(after_id=0, limit=total + 10)
        nursery.cancel_scope.cancel()
    ids = [e.id for e in seen]
    assert ids == [e.id for e in everything] and len(ids) == total
    assert len({e.data["id"] for e in seen}) == total


async def test_committed_events_fan_out_without_a_store_read_only_when_gap_free(tmp_path: Path) -> None:
    """The processor's own commits reach subscribers directly when their ids follow the hub's
    position one by one; any gap (another writer's event) falls back to reading the table."""
    from gateway.settings import DatabaseSettings
    from gateway.store.base import NewEvent
    from gateway.store.sqlite import SqliteStore

    store = SqliteStore(DatabaseSettings(DATABASE_URL=f"sqlite:///{tmp_path / 'h.db'}"))
    reads = 0
    real_read = store.read_events

    async def counting_read(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_read(*args, **kwargs)

    store.read_events = counting_read  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        hub = Hub(store, poll_interval=3600)
        await nursery.start(hub.run)
        async with hub.subscribe(last_event_id=None, types=None, device_id=None) as sub:
            await trio.testing.wait_all_tasks_blocked()
            reads_before = reads
            first = await store.append_events([NewEvent("packet", {"n": i}) for i in range(3)])
            hub.committed(first)
            got = [await sub.__anext__() for _ in range(3)]
            assert [e.id for e in got] == [e.id for e in first]
            assert reads == reads_before, "gap-free commits need no store read"
            # Another writer's event lands in between: the next commit is not gap-free.
            other = await store.append_events([NewEvent("alert", {"x": 1})])
            mine = await store.append_events([NewEvent("packet", {"n": 9})])
            hub.committed(mine)
            got = [await sub.__anext__() for _ in range(2)]
            assert [e.id for e in got] == [other[0].id, mine[0].id]
            assert reads > reads_before
        nursery.cancel_scope.cancel()


async def test_batch_takes_every_waiting_event_in_one_step(store: Store) -> None:
    """``batch()`` hands over what waits (a replay page, then everything live) in id order, at most
    ``limit`` at a time, with no gap or repeat against ``__anext__``."""
    first = await store.append_events(new_events(0, 30))
    async with running_hub(store, replay_limit=20) as hub:
        async with hub.subscribe(last_event_id=first[4].id, types=None, device_id=None) as sub:
            with trio.fail_after(10):
                page = await sub.batch()
                assert [e.id for e in page] == [e.id for e in first[5:25]]  # one replay page
                assert (await sub.__anext__()).id == first[25].id
                assert [e.id for e in await sub.batch()] == [e.id for e in first[26:]]
                live = await append(store, hub, new_events(30, 50))
                got = await sub.batch(limit=10)
                assert [e.id for e in got] == [e.id for e in live[:10]]
                got = await sub.batch()
                assert [e.id for e in got] == [e.id for e in live[10:]]  # the rest, in one step
                assert all(e.frame is not None for e in got)  # framed once by the hub
