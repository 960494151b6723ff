"""The outbox: its store contract on both backends, and the publisher against real mosquitto brokers
(delete on PUBACK, refusals with MQTT 5 reason 0x87 retried then dead-lettered, nothing sent while
the broker is away, and leases taken over after a restart)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from prometheus_client import REGISTRY

from gateway.errors import StoreUnavailable
from gateway.health import ComponentHealth
from gateway.publish import OutboxPublisher
from gateway.settings import MqttSettings
from gateway.store import open_store
from gateway.store.base import Event, EventsByMessage, NewEvent, NewPublish, PublishFailure, Store
from tests.support.mqtt import MosquittoServer, eventually
from tests.support.pg import db_settings
from tests.test_mqtt import collect, running, settings_for
from tests.test_processor import insert, new_messages


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def packets_for(subtopic: str | None = None) -> Any:
    """A publish builder: one ``{"event_id": id}`` publish per appended event."""

    def build(stored: list[Event]) -> list[NewPublish]:
        return [NewPublish(json.dumps({"event_id": e.id}).encode(), subtopic, None, e.id) for e in stored]

    return build


async def enqueue(store: Store, n: int, subtopic: str | None = None) -> list[int]:
    """Append ``n`` events with one outbox row each; returns the event ids."""
    stored = await store.append_events([NewEvent("packet", {"n": i}) for i in range(n)], packets_for(subtopic))
    return [e.id for e in stored]


# --------------------------------------------------------------------------- store contract


async def test_complete_writes_outbox_rows_with_the_commit_only_for_owned_messages(store: Store) -> None:
    ids = await insert(store, new_messages(3))
    claimed = await store.claim("mine", 2, 30.0)
    assert [m.id for m in claimed] == ids[:2]
    events = [NewEvent("packet", {"id": i}, message_id=i) for i in ids]
    seen: list[EventsByMessage] = []

    def build(stored: EventsByMessage) -> list[NewPublish]:
        seen.append(stored)
        # ids[2] is not leased to us: its event is not appended, and its row must be dropped too.
        return [
            NewPublish(json.dumps({"m": i}).encode(), "sub", i, stored[i][0].id if i in stored else None) for i in ids
        ]

    stored = await store.complete("mine", ids, [], events, build)
    assert seen == [stored] and sorted(stored) == ids[:2]
    assert [[e.data["id"] for e in stored[i]] for i in ids[:2]] == [[ids[0]], [ids[1]]]
    rows = await store.claim_outbox("pub", 100, 30.0)
    assert [(json.loads(r.payload)["m"], r.subtopic, r.message_id, r.event_id, r.attempts) for r in rows] == [
        (ids[0], "sub", ids[0], stored[ids[0]][0].id, 0),
        (ids[1], "sub", ids[1], stored[ids[1]][0].id, 0),
    ]
    assert rows[0].id < rows[1].id


async def test_outbox_lease_retry_dead_letter_and_delete(store: Store) -> None:
    await enqueue(store, 3)
    a = await store.claim_outbox("a", 2, 30.0)
    b = await store.claim_outbox("b", 10, 30.0)
    assert len(a) == 2 and len(b) == 1 and not {r.id for r in a} & {r.id for r in b}
    assert await store.claim_outbox("c", 10, 30.0) == []  # all leased
    assert await store.renew_outbox("a", 30.0) == 2

    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    await store.outbox_failed([PublishFailure(a[0].id, "refused: Not authorized (0x87)", soon)])
    await store.outbox_failed([PublishFailure(a[1].id, "refused: Quota exceeded (0x97)", None)])
    stats = await store.outbox_stats()
    assert (stats.pending, stats.dead) == (2, 1) and stats.oldest is not None
    assert await store.claim_outbox("c", 10, 30.0) == []  # a[0] not due yet, a[1] dead, b leased
    await trio.sleep(0.4)
    [again] = await store.claim_outbox("c", 10, 30.0)
    assert (again.id, again.attempts) == (a[0].id, 1)

    await store.outbox_done([again.id, b[0].id])
    stats = await store.outbox_stats()
    assert (stats.pending, stats.dead, stats.oldest) == (0, 1, None)
    assert await store.claim_outbox("c", 10, 30.0) == []  # the dead letter stays, never re-sent


async def test_release_lets_a_restarted_owner_take_its_rows_at_once(store: Store) -> None:
    await enqueue(store, 2)
    assert len(await store.claim_outbox("mqtt:gw", 10, 300.0)) == 2
    assert await store.claim_outbox("mqtt:gw", 10, 300.0) == []
    assert await store.release_outbox("mqtt:gw") == 2
    assert len(await store.claim_outbox("mqtt:gw", 10, 300.0)) == 2


# ------------------------------------------------------------------------ against a broker

ACL = """
topic readwrite gateway/events
topic read gateway/events/#
topic readwrite nothing/#
"""


def publisher_settings(server: MosquittoServer | None, **kw: Any) -> MqttSettings:
    base: dict[str, Any] = {
        "client_id": "outbox-sender",
        "subscribe_topic": "nothing/here",
        "publish_retry_min": 0.05,
        "publish_retry_max": 0.1,
        "publish_max_attempts": 3,
    }
    base.update(kw)
    return settings_for(server, **base)


async def test_refused_publish_is_not_delivered_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    server = MosquittoServer(tmp_path / "acl", extra_config=f"acl_file {tmp_path / 'acl.conf'}\n")
    (tmp_path / "acl.conf").write_text(ACL)
    server.start()
    published = sample("gateway_mqtt_published_total")
    refused = sample("gateway_mqtt_publish_refused_total", {"code": "0x87"})
    dead = sample("gateway_outbox_dead_lettered_total")
    try:
        listener = settings_for(server, client_id="listener", subscribe_topic="gateway/events/#")
        sender = publisher_settings(server)
        async with (
            open_store(db_settings(f"sqlite:///{tmp_path}/g.db")) as store,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(store.run)
            async with running(listener) as (lbridge, lrecv), running(sender) as (bridge, _):
                health = ComponentHealth("outbox")
                outbox = OutboxPublisher(sender, store, bridge, health, stats_every=0.05)
                await nursery.start(outbox.run)
                [ok_id] = await enqueue(store, 1)
                [denied_id] = await enqueue(store, 1, "denied")
                outbox.wake()
                got = await collect(lrecv, 1)
                assert [(m.topic, json.loads(m.payload)) for m in got] == [("gateway/events", {"event_id": ok_id})]
                lbridge.ack(got)

                async def settled() -> bool:
                    s = await store.outbox_stats()
                    return (s.pending, s.dead) == (0, 1)

                with trio.fail_after(15):
                    while not await settled():
                        await trio.sleep(0.05)
                assert await collect(lrecv, 1, 0.3) == []  # the refused publish never arrived
                await eventually(lambda: health.detail.get("dead") == 1, 5)
                assert health.detail["pending"] == 0 and outbox.inflight == 0
            nursery.cancel_scope.cancel()
    finally:
        server.kill()
    # Counted as refused three times (one per attempt), delivered once: the allowed publish only.
    assert sample("gateway_mqtt_publish_refused_total", {"code": "0x87"}) - refused == 3
    assert sample("gateway_mqtt_published_total") - published == 1
    assert sample("gateway_outbox_dead_lettered_total") - dead == 1
    import sqlite3

    conn = sqlite3.connect(tmp_path / "g.db")
    rows = conn.execute("SELECT event_id, attempts, last_error, dead_at IS NOT NULL FROM outbox").fetchall()
    conn.close()
    assert len(rows) == 1
    event_id, attempts, last_error, is_dead = rows[0]
    assert (event_id, attempts, is_dead) == (denied_id, 3, 1)
    assert "Not authorized" in last_error and "0x87" in last_error


async def test_nothing_is_lost_while_the_broker_is_away(tmp_path: Path, mosquitto: MosquittoServer) -> None:
    """Rows wait in the outbox (not in memory) while the broker is down, and all go out after."""
    listener = settings_for(mosquitto, client_id="listener", subscribe_topic="gateway/events/#")
    sender = publisher_settings(mosquitto, publish_inflight=7)
    async with open_store(db_settings(f"sqlite:///{tmp_path}/g.db")) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with running(listener) as (lbridge, lrecv):
            mosquitto.stop()
            async with running(sender) as (bridge, _):
                outbox = OutboxPublisher(sender, store, bridge, ComponentHealth("outbox"))
                await nursery.start(outbox.run)
                ids = await enqueue(store, 40)
                outbox.wake()
                await trio.sleep(0.3)
                assert outbox.inflight == 0  # nothing taken while disconnected
                assert (await store.outbox_stats()).pending == 40
                mosquitto.start()
                got: list[Any] = []
                with trio.move_on_after(20):
                    while {json.loads(m.payload)["event_id"] for m in got} != set(ids):
                        batch = await lrecv.receive()
                        lbridge.ack(batch)
                        got.extend(batch)
                assert {json.loads(m.payload)["event_id"] for m in got} == set(ids)
                await eventually(lambda: outbox.inflight == 0, 10)
                assert (await store.outbox_stats()).pending == 0
        nursery.cancel_scope.cancel()


class Flaky:
    """A store whose outbox writes fail a few times first (our own outage handling is under test)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fail = {"release_outbox": 2, "outbox_done": 2}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.fail:
            return attr

        async def call(*args: Any) -> Any:
            if self.fail[name]:
                self.fail[name] -= 1
                raise StoreUnavailable("injected outage")
            return await attr(*args)

        return call


async def test_database_outage_delays_but_loses_no_publish(tmp_path: Path, mosquitto: MosquittoServer) -> None:
    listener = settings_for(mosquitto, client_id="listener", subscribe_topic="gateway/events/#")
    sender = publisher_settings(mosquitto)
    async with open_store(db_settings(f"sqlite:///{tmp_path}/g.db")) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        ids = await enqueue(store, 10)
        flaky = Flaky(store)
        async with running(listener) as (lbridge, lrecv), running(sender) as (bridge, _):
            health = ComponentHealth("outbox")
            outbox = OutboxPublisher(sender, flaky, bridge, health)  # type: ignore[arg-type]
            await nursery.start(outbox.run)
            await eventually(lambda: health.state == "degraded", 5)  # release_outbox failed
            got = await collect(lrecv, 10, 15)
            lbridge.ack(got)
            assert {json.loads(m.payload)["event_id"] for m in got} == set(ids)
            await eventually(lambda: outbox.inflight == 0 and health.state == "ok", 15)
            assert flaky.fail == {"release_outbox": 0, "outbox_done": 0}
            assert (await store.outbox_stats()).pending == 0  # deleted once the database answered
        nursery.cancel_scope.cancel()
