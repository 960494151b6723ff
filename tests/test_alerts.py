"""Built-in alerts: the hysteresis state machine on plain numbers, the evaluator on autojump_clock.

The store and publisher are fakes on purpose: these tests are about our own logic (when an alert
fires and resolves, and how it is announced), not about the database or the broker.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from gateway import metrics
from gateway.alerts import Alerts, AlertState, AlertThresholds, disk_free_ratios, disk_paths_for
from gateway.errors import MqttUnavailable, StoreUnavailable
from gateway.health import ComponentHealth, Health
from gateway.settings import load_settings
from gateway.store.base import Backlog, Event, NewEvent, PublishBuilder

EPOCH = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def wall() -> datetime:
    """Wall time that follows Trio's (mock) clock."""
    return EPOCH + timedelta(seconds=trio.current_time())


class FakeStore:
    kind = "fake"

    def __init__(self) -> None:
        self.health = ComponentHealth("database", state="ok")
        self.events: list[Event] = []
        self.down = False
        self.broken: Exception | None = None
        self.backlog_value = Backlog(count=0, oldest=None)
        self.outbox: list[tuple[dict[str, Any], str | None]] = []

    async def backlog(self) -> Backlog:
        if self.down:
            raise StoreUnavailable("connection refused")
        if self.broken is not None:
            raise self.broken
        return self.backlog_value

    async def append_events(self, events: list[NewEvent], publishes: PublishBuilder | None = None) -> list[Event]:
        if self.down:
            raise StoreUnavailable("connection refused")
        out = [Event(len(self.events) + i + 1, e.type, e.data, wall()) for i, e in enumerate(events)]
        self.events.extend(out)
        self.outbox += [(json.loads(p.payload), p.subtopic) for p in (publishes(out) if publishes else [])]
        return out


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], str | None]] = []
        self.full = False

    async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
        self.publish_nowait(payload, subtopic)

    def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
        if self.full:
            raise MqttUnavailable("outbound queue full")
        self.sent.append((json.loads(payload), subtopic))


def gauge(alert: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_alert_active", {"alert": alert})


# --- the pure state machine ----------------------------------------------------------------------


def test_fires_only_after_for_seconds() -> None:
    s = AlertState(for_seconds=10, clear_seconds=5)
    assert s.update(True, 0) is None
    assert s.update(True, 9.9) is None
    assert s.update(True, 10) == "fire"
    assert s.firing


def test_fires_once_and_resolves_once() -> None:
    s = AlertState(for_seconds=0, clear_seconds=5)
    assert s.update(True, 0) == "fire"
    assert [s.update(True, t) for t in range(1, 100)] == [None] * 99
    assert s.update(False, 100) is None
    assert s.update(False, 104) is None
    assert s.update(False, 105) == "resolve"
    assert [s.update(False, t) for t in range(106, 200)] == [None] * 94
    assert not s.firing


def test_flapping_condition_never_fires() -> None:
    s = AlertState(for_seconds=10, clear_seconds=10)
    for t in range(0, 100, 2):
        assert s.update(t % 4 == 0, t) is None  # true 2 s, false 2 s, ...
    assert not s.firing


def test_brief_recovery_does_not_resolve() -> None:
    s = AlertState(for_seconds=0, clear_seconds=10)
    assert s.update(True, 0) == "fire"
    assert s.update(False, 1) is None
    assert s.update(False, 9) is None
    assert s.update(True, 10) is None  # relapse: the clear streak starts over
    assert s.update(False, 11) is None
    assert s.update(False, 20) is None
    assert s.update(False, 21) == "resolve"


def test_interrupted_streak_restarts_the_count() -> None:
    s = AlertState(for_seconds=10, clear_seconds=0)
    assert s.update(True, 0) is None
    assert s.update(False, 8) is None
    assert s.update(True, 9) is None
    assert s.update(True, 18) is None
    assert s.update(True, 19) == "fire"


# --- the evaluator -------------------------------------------------------------------------------

FAST = AlertThresholds(
    interval=1.0,
    mqtt_for=10,
    database_for=10,
    clear_seconds=5,
    backlog_age_for=10,
    backlog_window=60,
    backlog_growth=100,
    disk_for=0,
    error_for=0,
    error_window=30,
    error_min_count=10,
    error_ratio=0.5,
)


async def test_mqtt_disconnected_fires_once_and_resolves_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.alerts")
    health, store, pub = Health(), FakeStore(), FakePublisher()
    mqtt = health.component("mqtt")
    mqtt.set("ok")
    seen: list[tuple[str, str]] = []

    async def on_alert(name: str, data: dict[str, Any]) -> None:
        seen.append((name, data["state"]))

    alerts = Alerts(health, store, pub, on_alert=on_alert, clock=wall, thresholds=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(alerts.run)
        await trio.sleep(5)
        mqtt.set("degraded", "connection refused")
        # Evaluations run at whole seconds; checking at half seconds avoids ties with them.
        await trio.sleep(9.5)
        assert store.events == []  # not yet: the condition has held < 10 s
        await trio.sleep(2)
        assert [e.data["state"] for e in store.events] == ["firing"]
        assert alerts.active.keys() == {"mqtt_disconnected"}
        assert gauge("mqtt_disconnected") == 1
        await trio.sleep(120)  # still down: nothing more is announced
        assert len(store.events) == 1
        mqtt.set("ok")
        await trio.sleep(3)
        mqtt.set("degraded")  # a relapse within clear_seconds keeps it firing
        await trio.sleep(1)
        mqtt.set("ok")
        await trio.sleep(10)
        nursery.cancel_scope.cancel()

    assert [(e.type, e.data["alert"], e.data["state"]) for e in store.events] == [
        ("alert", "mqtt_disconnected", "firing"),
        ("alert", "mqtt_disconnected", "resolved"),
    ]
    assert gauge("mqtt_disconnected") == 0
    assert seen == [("mqtt_disconnected", "firing"), ("mqtt_disconnected", "resolved")]
    # Written to the outbox with their events (sent at least once), not published from memory.
    assert [(p["id"], p["type"], p["data"]["state"], sub) for p, sub in store.outbox] == [
        (1, "alert", "firing", "alerts"),
        (2, "alert", "resolved", "alerts"),
    ]
    assert pub.sent == []
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.alerts"]
    assert [lvl for lvl, _ in records] == ["CRITICAL", "WARNING"]
    assert "mqtt_disconnected firing" in records[0][1]
    assert "mqtt_disconnected resolved" in records[1][1]
    fired = store.events[0].data
    assert fired["severity"] == "critical"
    assert fired["detail"] == {"state": "degraded"}
    assert store.events[1].data["fired_at"] == fired["at"]


async def test_database_outage_event_is_stored_when_the_database_is_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(alerts.run)
        store.down = True
        store.health.state = "degraded"
        await trio.sleep(12)
        # Announced over MQTT at once (without an event id), kept for the events table.
        assert [(p["id"], p["data"]["alert"], p["data"]["state"]) for p, _ in pub.sent] == [
            (None, "database_unavailable", "firing")
        ]
        assert store.events == []
        store.down = False
        store.health.state = "ok"
        await trio.sleep(7)
        nursery.cancel_scope.cancel()
    assert [(e.data["alert"], e.data["state"]) for e in store.events] == [
        ("database_unavailable", "firing"),
        ("database_unavailable", "resolved"),
    ]
    assert "error" in store.events[0].data["detail"]


async def test_backlog_too_old(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=replace(FAST, backlog_max_age=300))
    async with trio.open_nursery() as nursery:
        await nursery.start(alerts.run)
        store.backlog_value = Backlog(count=5, oldest=wall() - timedelta(seconds=290))
        await trio.sleep(25)  # older than 300 s from t≈11, held 10 s → fires at t≈21
        assert [e.data["alert"] for e in store.events] == ["backlog_too_old"]
        assert store.events[0].data["detail"]["age_seconds"] > 300
        store.backlog_value = Backlog(count=0, oldest=None)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [e.data["state"] for e in store.events] == ["firing", "resolved"]


async def test_backlog_growing(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(alerts.run)
        for _ in range(50):  # +3 per second: +150 per minute, above the 100 per 60 s threshold
            store.backlog_value = Backlog(count=store.backlog_value.count + 3, oldest=wall())
            await trio.sleep(1)
        assert store.events == []  # needs a full window, then 30 s (window / 2) of growth
        for _ in range(60):
            store.backlog_value = Backlog(count=store.backlog_value.count + 3, oldest=wall())
            await trio.sleep(1)
        assert [e.data["alert"] for e in store.events] == ["backlog_growing"]
        assert store.events[0].data["severity"] == "warning"
        nursery.cancel_scope.cancel()


async def test_steady_backlog_is_not_growing(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    store.backlog_value = Backlog(count=5000, oldest=None)
    with trio.move_on_after(600):
        await alerts.run()
    assert store.events == []


async def test_disk_almost_full(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    db = tmp_path / "data" / "gateway.db"  # not created yet: its nearest existing parent is examined
    alerts = Alerts(
        health, store, pub, clock=wall, disk_paths=[db], thresholds=replace(FAST, disk_min_free=1.01)
    )  # any real disk is "almost full"
    await alerts.check()
    assert [e.data["alert"] for e in store.events] == ["disk_almost_full"]
    ratio = store.events[0].data["detail"]["free_ratio"][str(db)]
    assert 0 < ratio <= 1
    exported = REGISTRY.get_sample_value("gateway_disk_free_ratio", {"path": str(db)})
    assert exported == pytest.approx(ratio, abs=1e-3)

    quiet = Alerts(health, FakeStore(), pub, clock=wall, disk_paths=[db], thresholds=replace(FAST, disk_min_free=0))
    assert await quiet.check() == []


def test_disk_free_ratios_skips_nothing_real(tmp_path: Path) -> None:
    ratios = disk_free_ratios([tmp_path, Path("/")])
    assert set(ratios) == {str(tmp_path), "/"}
    assert all(0 <= r <= 1 for r in ratios.values())


async def test_processing_error_rate(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    assert await alerts.check() == []  # the baseline
    await trio.sleep(1)
    metrics.PROCESSOR_FAILED.labels("test").inc(5)
    metrics.PROCESSOR_PROCESSED.inc(5)
    assert await alerts.check() == []  # 50 % but below the minimum count of 10
    await trio.sleep(1)
    metrics.PROCESSOR_FAILED.labels("test").inc(10)
    assert await alerts.check() == [("processing_errors", "fire")]
    await trio.sleep(31)  # the failures leave the 30 s window...
    metrics.PROCESSOR_PROCESSED.inc(100)
    assert await alerts.check() == []
    await trio.sleep(5)  # ...and stay clear for clear_seconds
    assert await alerts.check() == [("processing_errors", "resolve")]


async def test_http_5xx_rate(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    await alerts.check()
    metrics.HTTP_REQUESTS.labels("/api/v1/messages", "GET", "200").inc(10)
    metrics.HTTP_REQUESTS.labels("/api/v1/messages", "GET", "503").inc(9)
    assert await alerts.check() == []  # 9 of 19: below 50 %
    metrics.HTTP_REQUESTS.labels("/api/v1/messages", "GET", "500").inc(2)
    assert await alerts.check() == [("http_errors", "fire")]


async def test_announcing_survives_a_full_publish_queue(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    pub.full = True
    health.component("mqtt").set("degraded")

    async def broken(name: str, data: dict[str, Any]) -> None:
        raise RuntimeError("hub gone")

    alerts = Alerts(health, store, pub, on_alert=broken, clock=wall, thresholds=FAST)
    with trio.move_on_after(15):
        await alerts.run()
    assert [e.data["alert"] for e in store.events] == ["mqtt_disconnected"]
    assert pub.sent == []


def test_disk_paths_for_settings(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/db/gw.db", "LOG_FILE": "/var/log/gateway/x.log"}
    s = load_settings(None, env)
    assert disk_paths_for(s.database, s.log) == [tmp_path / "db" / "gw.db", Path("/var/log/gateway/x.log")]
    s = load_settings(None, {"DATABASE_URL": "postgresql://gw@db/gw"})  # the log only; relative → absolute
    assert disk_paths_for(s.database, s.log) == [Path.cwd() / "logs" / "server.log"]


async def test_unexpected_store_error_is_a_database_alert_not_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    store.broken = RuntimeError("driver bug with secret dsn")
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    with trio.move_on_after(15):
        await alerts.run()
    assert [(e.data["alert"], e.data["detail"]) for e in store.events] == [
        ("database_unavailable", {"state": "ok", "error": "RuntimeError"})  # the type, not the message
    ]


async def test_spool_alerts_fire_when_spooling_starts_and_when_full(autojump_clock: trio.testing.MockClock) -> None:
    health, store, pub = Health(), FakeStore(), FakePublisher()
    alerts = Alerts(health, store, pub, clock=wall, thresholds=FAST)
    assert not [c for c in await alerts.check() if c[0].startswith("spool")]  # no spool configured
    spool = health.component("spool")
    spool.detail.update(mode="empty", rows=0)
    assert not [c for c in await alerts.check() if c[0].startswith("spool")]
    spool.detail.update(mode="spooling", rows=10)
    assert ("spool_active", "fire") in await alerts.check()  # at once: no hold time
    spool.detail.update(mode="full", rows=500)
    assert ("spool_full", "fire") in await alerts.check()
    assert alerts.active["spool_full"]["rows"] == 500 and gauge("spool_full") == 1
    spool.detail.update(mode="empty", rows=0)
    await alerts.check()
    await trio.sleep(FAST.clear_seconds)
    assert {("spool_active", "resolve"), ("spool_full", "resolve")} <= set(await alerts.check())
    assert [e.data["alert"] for e in store.events if e.data["alert"].startswith("spool")] == [
        "spool_active",
        "spool_full",
        "spool_active",
        "spool_full",
    ]
