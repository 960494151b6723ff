"""The processor: interval and nudge wake-ups, retries with backoff, dead-letter, leases, crash
recovery, exactly-once with two processors on one PostgreSQL database, and the actions it runs.

Timed logic runs on a mock clock (SQLite store; the clock autojumps after 50 ms of real idleness, so
a store call in its worker thread never lets the clock jump mid-call). Database tests use the real
clock (asyncpg under trio-asyncio cannot run on an autojump clock).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from gateway import metrics
from gateway.actions import SseAction
from gateway.backoff import Backoff
from gateway.errors import StoreUnavailable
from gateway.health import ComponentHealth
from gateway.processor import Processor
from gateway.retention import RetentionPolicy
from gateway.rules import Rule, RuleSet, default_rules, parse_rules
from gateway.settings import ProcessorSettings
from gateway.store import open_store
from gateway.store.base import (
    CompletionPublishes,
    Event,
    EventsByMessage,
    Failure,
    NewEvent,
    NewMessage,
    Store,
    StoredMessage,
)
from gateway.wake import Nudge
from tests.support.pg import db_settings


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness (store calls run in threads)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def outbox_rows(store: Store) -> list[tuple[dict[str, Any], str | None]]:
    """What the processor wrote to the outbox (payloads decoded), oldest first; leases them."""
    rows = await store.claim_outbox("test-reader", 1_000_000, 60.0)
    return [(json.loads(r.payload), r.subtopic) for r in rows]


class Recorder:
    """Wraps a store: records claims and completes (what each owner got and reported)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.claims: list[tuple[str, list[int], datetime]] = []
        self.completes: list[tuple[str, list[int], list[Failure], datetime]] = []
        self.fail_next = 0
        self.before_complete: Callable[[], Any] | None = None  # awaited before each complete

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailable("injected outage")
        got = await self.inner.claim(owner, limit, lease_seconds)
        if got:
            self.claims.append((owner, [m.id for m in got], datetime.now(UTC)))
        return got

    async def complete(
        self,
        owner: str,
        processed: list[int],
        failed: list[Failure],
        events: list[NewEvent],
        publishes: CompletionPublishes | None = None,
    ) -> EventsByMessage:
        self.completes.append((owner, processed, failed, datetime.now(UTC)))
        if self.before_complete is not None:
            await self.before_complete()
        return await self.inner.complete(owner, processed, failed, events, publishes)


def settings(**kw: Any) -> ProcessorSettings:
    values = {"PROCESSOR_INTERVAL": 1.0, "PROCESSOR_RETRY_MIN": 0.05, "PROCESSOR_RETRY_MAX": 0.2}
    values.update({f"PROCESSOR_{k.upper()}": v for k, v in kw.items()})
    return ProcessorSettings.model_validate(values)


def new_messages(n: int, start: int = 0, device: str = "dev-1", **kw: Any) -> list[NewMessage]:
    now = datetime.now(UTC)
    return [
        NewMessage(
            device_id=kw.get("device_id", device),
            device_ts=now,
            seq=i,
            dedupe_key=f"seq:{i}",
            measurements=kw.get("measurements", {"temperature": 20.0 + i % 20}),
            status="ok",
            battery=80.0,
            source="mqtt",
            received_at=now,
        )
        for i in range(start, start + n)
    ]


async def insert(store: Store, messages: list[NewMessage]) -> list[int]:
    return [o.id for o in await store.write_batch(messages, [])]


@asynccontextmanager
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(db_settings(f"sqlite:///{tmp_path}/gateway.db")) as st, trio.open_nursery() as n:
        await n.start(st.run)
        yield st
        n.cancel_scope.cancel()


@asynccontextmanager
async def running(processor: Processor) -> AsyncIterator[Processor]:
    async with trio.open_nursery() as nursery:
        await nursery.start(processor.run)
        yield processor
        nursery.cancel_scope.cancel()


def make(store: Store, nudge: Nudge | None = None, **kw: Any) -> Processor:
    rules = kw.pop("rules", None)
    names = ("on_committed", "on_outbox", "retention", "prune_every", "stats_every")
    extra = {k: kw.pop(k) for k in names if k in kw}
    return Processor(
        settings(**kw),
        store,
        nudge or Nudge(),
        ComponentHealth("processor"),
        instance_id="test",
        rules=rules,
        **extra,
    )


async def wait_until(check: Callable[[], Any], seconds: float = 30.0, step: float = 0.05) -> None:
    with trio.fail_after(seconds):
        while not await check():
            await trio.sleep(step)


async def all_processed(store: Store, ids: list[int]) -> bool:
    for i in ids:
        m = await store.get_message(i)
        if m is None or m.processed_at is None:
            return False
    return True


# ---------------------------------------------------------------- timing (mock clock, SQLite)


async def test_wakes_on_interval_and_at_once_when_nudged(
    tmp_path: Path, idle_jump_clock: trio.testing.MockClock
) -> None:
    async with sqlite_store(tmp_path) as store:
        nudge = Nudge()
        proc = make(store, nudge=nudge, interval=10.0)
        async with running(proc):
            await trio.sleep(0.5)  # the first drain found nothing; now idle for 10 s
            t0 = trio.current_time()
            ids = await insert(store, new_messages(3))  # nobody nudges
            await wait_until(lambda: all_processed(store, ids), seconds=30, step=0.25)
            waited = trio.current_time() - t0
            assert 9.0 <= waited <= 10.5, waited
            t1 = trio.current_time()
            ids = await insert(store, new_messages(2, start=10))
            nudge.set()
            await wait_until(lambda: all_processed(store, ids), seconds=30, step=0.01)
            assert trio.current_time() - t1 < 0.5
            # A new interval takes effect at once.
            proc.reconfigure(settings(interval=2.0))
            t2 = trio.current_time()
            ids = await insert(store, new_messages(1, start=20))
            await wait_until(lambda: all_processed(store, ids), seconds=30, step=0.25)
            assert trio.current_time() - t2 <= 2.5


def _boom(m: StoredMessage) -> bool:
    if m.device_id == "bad":
        raise ZeroDivisionError("bad predicate")
    return True


async def test_failures_retry_with_backoff_then_dead_letter(
    tmp_path: Path, idle_jump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    failed_before = metrics.PROCESSOR_FAILED.labels("rules")._value.get()
    async with sqlite_store(tmp_path) as raw:
        store = Recorder(raw)
        rules = RuleSet([Rule("r", _boom, (SseAction(event="packet"),))])
        proc = make(store, rules=rules, interval=0.5, max_attempts=4, retry_min=0.05, retry_max=0.2)
        bad = (await insert(raw, new_messages(1, device_id="bad")))[0]
        good = await insert(raw, new_messages(5, start=100))
        async with running(proc):
            await wait_until(lambda: _is_dead(raw, bad), seconds=120, step=0.25)
            assert await all_processed(raw, good)  # the failure never stopped the others
    m = await _get(tmp_path, bad)
    assert m.dead and m.attempts == 4 and m.processed_at is None
    assert m.last_error is not None and "bad predicate" in m.last_error
    fails = [(f, at) for _, _, failed, at in store.completes for f in failed if f.message_id == bad]
    assert len(fails) == 4
    ceilings = [0.05, 0.1, 0.2]
    for (f, at), cap in zip(fails[:3], ceilings, strict=True):
        assert f.retry_at is not None
        delay = (f.retry_at - at).total_seconds()
        assert 0.04 <= delay <= cap + 0.05, (delay, cap)
    assert fails[3][0].retry_at is None  # dead-letter
    # Each retry was claimed only once it was due.
    claims = [at for _, ids, at in store.claims if bad in ids]
    assert len(claims) == 4
    for (f, _), claimed in zip(fails[:3], claims[1:], strict=True):
        assert f.retry_at is not None and claimed >= f.retry_at
    assert metrics.PROCESSOR_FAILED.labels("rules")._value.get() - failed_before == 4
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.processor"]
    assert any(f"message_id={bad}" in t and "action=rules" in t and "device_id=bad" in t for t in logged)
    assert any("dead-lettered" in t for t in logged)


async def _is_dead(store: Store, mid: int) -> bool:
    m = await store.get_message(mid)
    return m is not None and m.dead


async def _get(tmp_path: Path, mid: int) -> StoredMessage:
    async with sqlite_store(tmp_path) as store:
        m = await store.get_message(mid)
    assert m is not None
    return m


def test_retry_delay_grows_and_is_capped() -> None:
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 300.0), (100, 300.0)]:
        for _ in range(20):
            assert 1.0 <= Backoff(1.0, 300.0).delay(attempt - 1) <= cap


async def test_store_outage_degrades_and_recovers(tmp_path: Path, idle_jump_clock: trio.testing.MockClock) -> None:
    async with sqlite_store(tmp_path) as raw:
        store = Recorder(raw)
        store.fail_next = 3
        proc = make(store, interval=1.0)
        health = proc._health
        ids = await insert(raw, new_messages(4))
        async with running(proc):
            await trio.sleep(0.01)
            assert health.as_dict()["state"] == "degraded"
            assert "injected outage" in (health.last_error or "")
            await wait_until(lambda: all_processed(raw, ids), seconds=60, step=0.25)
            await trio.sleep(0.1)
            assert health.state == "ok"
            assert health.detail["backlog"] == 0


async def test_prunes_events_and_reports_backlog(tmp_path: Path, idle_jump_clock: trio.testing.MockClock) -> None:
    async with sqlite_store(tmp_path) as store:
        await store.append_events([NewEvent("packet", {"old": True})])
        proc = make(store, interval=1.0, retention=RetentionPolicy(events=0.01), prune_every=1.0)
        await trio.lowlevel.checkpoint()
        async with running(proc):
            await wait_until(lambda: _no_events(store), seconds=30, step=0.5)
            assert proc._health.detail["backlog"] == 0 and proc._health.state == "ok"


async def _no_events(store: Store) -> bool:
    return await store.event_bounds() == (0, 0)


# ---------------------------------------------------------------- actions through the processor


async def test_default_rules_event_and_publish_carry_event_id(store: Store) -> None:
    committed: list[Event] = []
    outbox_woken: list[int] = []
    proc = make(store, on_committed=committed.extend, on_outbox=lambda: outbox_woken.append(1), batch_size=7)
    ids = await insert(store, new_messages(20))
    async with running(proc):
        await wait_until(lambda: all_processed(store, ids), seconds=20)
    sent = await outbox_rows(store)
    assert len(sent) == 20 and outbox_woken
    events = await store.read_events(after_id=0, limit=100)
    assert [e.type for e in events] == ["packet"] * 20
    by_message = {e.data["id"]: e for e in events}
    assert sorted(by_message) == sorted(ids)
    for payload, subtopic in sent:
        assert subtopic is None
        assert payload["type"] == "packet" and payload["rule"] == "default"
        assert payload["event_id"] == by_message[payload["data"]["id"]].id
    assert committed == events  # the hub was handed every event, in id order, with its message
    assert [e.message_id for e in committed] == [e.data["id"] for e in committed]


async def _true(value: bool) -> bool:
    return value


async def test_hot_reload_rules(store: Store) -> None:
    proc = make(store, rules=default_rules())
    async with running(proc):
        ids = await insert(store, new_messages(2))
        proc._nudge.set()
        await wait_until(lambda: all_processed(store, ids))
        proc.reconfigure(
            settings(),
            parse_rules(
                '[[rule]]\nname = "hot"\nwhen = {field = "measurements.temperature", op = ">", value = 30}\n'
                'actions = [{type = "sse", event = "alert", fields = ["device_id"]}, '
                '{type = "mqtt", subtopic = "alerts", payload = {t = "{measurements.temperature}"}}]'
            ),
        )
        ids = await insert(store, new_messages(1, start=50, measurements={"temperature": 35.0}))
        ids += await insert(store, new_messages(1, start=51, measurements={"temperature": 25.0}))
        proc._nudge.set()
        await wait_until(lambda: all_processed(store, ids))
    events = await store.read_events(after_id=0, limit=100)
    assert [e.type for e in events] == ["packet", "packet", "alert"]
    assert events[-1].data == {"device_id": "dev-1"}
    sent = await outbox_rows(store)
    assert sent[-1] == ({"event_id": events[-1].id, "t": 35.0}, "alerts")
    assert len(sent) == 3


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "action.py"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return str(path)


async def test_script_action_gets_event_json_and_logs_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "stdin.jsonl"
    exe = _script(
        tmp_path,
        f"import sys\nopen({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')\nprint('hello from script')\n",
    )
    rules = parse_rules(f'[[rule]]\nname = "s"\nactions = [{{type = "script", command = ["{exe}", "x"]}}]')
    caplog.set_level("INFO")
    async with sqlite_store(tmp_path) as store:
        ids = await insert(store, new_messages(3))
        async with running(make(store, rules=rules)):
            await wait_until(lambda: all_processed(store, ids), seconds=20)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(g["message_id"] for g in got) == ids
    assert {g["key"] for g in got} == {f"{i}:s:0" for i in ids}
    assert all(g["rule"] == "s" and g["data"]["device_id"] == "dev-1" for g in got)
    assert any("hello from script" in r.getMessage() for r in caplog.records)


async def test_script_failure_and_timeout_are_retried_and_visible(store: Store, tmp_path: Path) -> None:
    # A shell script (not Python) so that start-up time on a loaded machine stays far below the timeout.
    exe = tmp_path / "action.sh"
    exe.write_text(
        '#!/bin/sh\ninput=$(cat)\ncase "$input" in\n'
        "  *'\"seq\":1,'*) exec sleep 30 ;;\n"
        "  *'\"seq\":2,'*) echo 'warming up' >&2; echo 'sensor db locked' >&2; exit 3 ;;\n"
        "esac\n"
    )
    exe.chmod(0o755)
    rules = parse_rules(f'[[rule]]\nname = "s"\nactions = [{{type = "script", command = ["{exe}"], timeout = 1.5}}]')
    recorder = Recorder(store)
    proc = make(recorder, rules=rules, interval=0.2, max_attempts=2, retry_min=0.1, retry_max=0.2)
    ids = await insert(store, new_messages(3))
    with trio.fail_after(60):
        async with running(proc):
            await wait_until(lambda: _all_final(store, ids), seconds=55)
    ok, slow, failing = [await store.get_message(i) for i in ids]
    assert ok is not None and ok.processed_at is not None and ok.attempts == 0
    assert slow is not None and slow.dead and slow.attempts == 2
    assert slow.last_error == "script: rule s: timed out after 1.5s"
    assert failing is not None and failing.dead and failing.attempts == 2
    assert failing.last_error == "script: rule s: exit status 3: sensor db locked"
    retried = [ids_ for _, ids_, _ in recorder.claims if ids[2] in ids_]
    assert len(retried) == 2
    backlog = await store.backlog()
    assert backlog.dead == 2


async def _all_final(store: Store, ids: list[int]) -> bool:
    for i in ids:
        m = await store.get_message(i)
        if m is None or (m.processed_at is None and not m.dead):
            return False
    return True


# ---------------------------------------------------------------- leases, crashes, concurrency


async def test_crashed_owner_lease_expires_and_message_is_claimed_again(store: Store) -> None:
    ids = await insert(store, new_messages(5))
    stolen = await store.claim("crashed-instance/0", 3, 2.0)  # a processor that dies holding a lease
    assert [m.id for m in stolen] == ids[:3]
    recorder = Recorder(store)
    proc = make(recorder, interval=0.1, lease_seconds=5.0)
    async with running(proc):
        await wait_until(lambda: all_processed(store, ids[3:]), seconds=10)
        assert not await all_processed(store, ids[:1])  # still leased
        await wait_until(lambda: all_processed(store, ids), seconds=10)
    # The dead owner's late completion changes nothing and appends nothing.
    late_event = NewEvent("packet", {"late": 1}, ids[0], "d")
    late = await store.complete("crashed-instance/0", ids[:3], [], [late_event])
    assert late == {}
    events = await store.read_events(after_id=0, limit=100)
    assert sorted(e.data["id"] for e in events) == ids
    owners = {owner for owner, claimed, _ in recorder.claims if ids[0] in claimed}
    assert owners == {proc.owner}


async def test_lease_lost_mid_batch_commits_the_rest_with_their_own_event_ids(store: Store) -> None:
    """Messages whose lease another processor took while the batch ran are left to it; every other
    message's events are appended and each publish carries the id of its own rule's first event."""
    rules = parse_rules(
        '[[rule]]\nname = "a"\nactions = [{type = "sse"}, {type = "mqtt", subtopic = "a", payload = {seq = "{seq}"}}]\n'
        '[[rule]]\nname = "b"\nactions = [{type = "sse", event = "alert", fields = ["seq"]}, '
        '{type = "sse", event = "alert2", fields = ["seq"]}, '
        '{type = "mqtt", subtopic = "b", payload = {seq = "{seq}"}}]'
    )
    ids = await insert(store, new_messages(5))
    recorder = Recorder(store)
    stolen: list[int] = []

    async def steal_two() -> None:  # once: the leases expire mid-batch and another owner takes two
        recorder.before_complete = None
        await trio.sleep(0.8)
        stolen.extend(m.id for m in await store.claim("thief", 2, 60.0))

    recorder.before_complete = steal_two
    async with running(make(recorder, rules=rules, lease=0.5)):
        await wait_until(lambda: all_processed(store, ids[2:]))
    assert stolen == ids[:2] and not await all_processed(store, ids[:1])
    events = await store.read_events(after_id=0, limit=100)
    assert [(e.message_id, e.type) for e in events] == [
        (i, kind) for i in ids[2:] for kind in ("packet", "alert", "alert2")
    ]
    first = {(e.message_id, "a" if e.type == "packet" else "b"): e.id for e in reversed(events)}
    sent = await outbox_rows(store)
    assert [(p["seq"], sub) for p, sub in sent] == [(seq, sub) for seq in (2, 3, 4) for sub in ("a", "b")]
    assert [p["event_id"] for p, _ in sent] == [first[(i, sub)] for i in ids[2:] for sub in ("a", "b")]


async def test_two_processors_claim_disjoint_batches(store: Store) -> None:
    ids = await insert(store, new_messages(40))
    a = await store.claim("a", 25, 30.0)
    b = await store.claim("b", 25, 30.0)
    assert len(a) == 25 and len(b) == 15
    assert not {m.id for m in a} & {m.id for m in b}
    assert await store.claim("c", 25, 30.0) == []
    assert sorted(m.id for m in a + b) == ids


async def test_two_processors_one_postgres_database_exactly_once(pg_url: str) -> None:
    total = 10_000
    settings_ = db_settings(pg_url)
    async with open_store(settings_) as s1, open_store(settings_) as s2, trio.open_nursery() as nursery:
        await nursery.start(s1.run)
        await nursery.start(s2.run)
        for start in range(0, total, 2000):
            await insert(s1, new_messages(2000, start=start, device=f"dev-{start}"))
        r1, r2 = Recorder(s1), Recorder(s2)
        n1, n2 = Nudge(), Nudge()
        proc1 = make(r1, n1, interval=0.2, batch_size=200)
        proc2 = make(r2, n2, interval=0.2, batch_size=200)
        await nursery.start(proc1.run)
        await nursery.start(proc2.run)
        with trio.fail_after(120):
            while (await s1.backlog()).count:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    done1 = [i for _, processed, _, _ in r1.completes for i in processed]
    done2 = [i for _, processed, _, _ in r2.completes for i in processed]
    assert done1 and done2, "both processors took part"
    assert len(done1) + len(done2) == total
    assert len(set(done1) | set(done2)) == total
    async with open_store(settings_) as s, trio.open_nursery() as nursery:
        await nursery.start(s.run)
        published = [p["data"]["id"] for p, _ in await outbox_rows(s)]
        events = await s.read_events(after_id=0, limit=total + 10)
        nursery.cancel_scope.cancel()
    assert len(published) == total and len(set(published)) == total
    assert len(events) == total
    assert len({e.data["id"] for e in events}) == total
    assert [e.id for e in events] == sorted(e.id for e in events)


def test_batch_shrinks_so_scripts_fit_in_the_lease(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    exe = _script(tmp_path, "pass")

    def rules(*timeouts: float) -> RuleSet:
        actions = ", ".join(f'{{type = "script", command = ["{exe}"], timeout = {t}}}' for t in timeouts)
        return parse_rules(f'[[rule]]\nname = "s"\nactions = [{{type = "sse"}}, {actions}]')

    proc = Processor(
        settings(lease_seconds=30.0, batch_size=500),
        None,  # type: ignore[arg-type]
        Nudge(),
        ComponentHealth("p"),
        instance_id="t",
        rules=default_rules(),
    )
    assert proc._batch_limit == 500
    same = settings(lease_seconds=30.0, batch_size=500)
    proc.reconfigure(same, rules(5.0))  # 24 s budget: 4 rounds of 4 concurrent messages
    assert proc._batch_limit == 16
    proc.reconfigure(same, rules(10.0, 10.0, 10.0))  # one message alone may outlast the budget
    assert proc._batch_limit == 4
    assert any("raise PROCESSOR_LEASE" in r.getMessage() for r in caplog.records)
