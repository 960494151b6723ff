"""Outbound MQTT under faults, with a real ``gateway serve`` process: SIGKILLed between the commit and
the broker's PUBACK (broker absent, or frozen with the publishes in flight), every publish still
arrives after a restart, carrying its event id; and an absent broker never holds up SSE events."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import GatewayProcess, api_key
from tests.e2e.test_pipeline import Subscriber, read_sse
from tests.support.mqtt import MosquittoServer, packet
from tests.support.pg import psql

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/data/gateway.db"
    return str(request.getfixturevalue("pg_url"))


def _gateway(tmp_path: Path, broker: MosquittoServer, run: str, entry: str, db_url: str) -> GatewayProcess:
    return GatewayProcess(
        tmp_path,
        {
            "DATABASE_URL": db_url,
            "API_KEYS": entry,
            "MQTT_URL": broker.url,
            "MQTT_CLIENT_ID": f"outbox-{run}",
            "MQTT_SUBSCRIBE_TOPIC": f"outbox-{run}/+/data",
            "MQTT_PUBLISH_TOPIC": f"outbox-{run}/events",
            "MQTT_RECONNECT_MIN": "0.1",
            "MQTT_RECONNECT_MAX": "0.5",
            # The old in-memory path blocked the processor once this queue was full.
            "MQTT_OUTBOUND_QUEUE": "1",
            "PROCESSOR_INTERVAL": "0.2",
            "RATE_LIMIT": "100000/minute",
        },
    )


def _column(db_url: str, query: str) -> list[int]:
    """The first column of ``query``'s rows as integers, read with plain SQL (sqlite3 or psql)."""
    if db_url.startswith("sqlite:///"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=30)
        try:
            return [int(r[0]) for r in conn.execute(query).fetchall()]
        finally:
            conn.close()
    return [int(line) for line in psql(db_url, query).split()]


def _count(db_url: str, query: str) -> int:
    return _column(db_url, query)[0]


def _wait(check: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _post(gw: GatewayProcess, key: str, n: int, device: str) -> None:
    with httpx.Client(base_url=gw.url, headers={"X-API-Key": key}, timeout=10) as client:
        for i in range(n):
            r = client.post("/api/v1/packets", content=packet(device, i), headers={"Content-Type": "application/json"})
            assert r.status_code == 201, r.text


def _replayed(gw: GatewayProcess, broker: MosquittoServer, run: str, db_url: str, n: int) -> None:
    """Restart the gateway: every event's publish arrives (at least once) and the outbox empties."""
    sub = Subscriber(f"outbox-{run}/events", broker.port)
    try:
        gw.start()
        try:
            events = set(_column(db_url, "SELECT id FROM events WHERE type = 'packet'"))
            assert len(events) == n
            _wait(lambda: {m["event_id"] for m in list(sub.messages)} >= events, 30, "every publish")
            assert {m["event_id"] for m in sub.messages} == events
            assert all(m["data"]["id"] for m in sub.messages)  # type: ignore[index]
            _wait(lambda: _count(db_url, "SELECT count(*) FROM outbox") == 0, 15, "an empty outbox")
        finally:
            assert gw.stop() == 0, gw.log_text()[-2000:]
    finally:
        sub.close()


def test_sigkill_with_the_broker_absent_then_every_publish_arrives(tmp_path: Path, db_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    key, entry = api_key("ops", "admin")
    broker = MosquittoServer(tmp_path / "broker")  # not started: nothing listens on its port yet
    gw = _gateway(tmp_path, broker, run, entry, db_url)
    gw.start()
    n = 30
    try:
        # SSE is not held up by the absent broker: every packet event arrives live.
        got: list[tuple[int, str, dict]] = []
        reader = threading.Thread(
            target=lambda: got.extend(read_sse(gw.url + "/api/v1/events?types=packet", {"X-API-Key": key}, n, 30))
        )
        reader.start()
        time.sleep(0.5)
        _post(gw, key, n, "dev-absent")
        reader.join(40)
        assert len(got) == n, f"only {len(got)} of {n} SSE events arrived while the broker was absent"
        _wait(lambda: _count(db_url, "SELECT count(*) FROM outbox") == n, 15, "the outbox rows")

        def outbox_detail() -> dict[str, object]:
            r = httpx.get(gw.url + "/api/v1/ping", headers={"X-API-Key": key}, timeout=5)
            return dict(r.json()["components"]["outbox"])

        _wait(lambda: outbox_detail().get("pending") == n, 15, "outbox pending in /ping")
    finally:
        gw.kill()  # SIGKILL: nothing was confirmed by a broker
    broker.start()
    try:
        _replayed(gw, broker, run, db_url, n)
    finally:
        broker.kill()


def test_sigkill_with_publishes_in_flight_then_every_publish_arrives(tmp_path: Path, db_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    key, entry = api_key("ops", "admin")
    broker = MosquittoServer(tmp_path / "broker")
    broker.start()
    gw = _gateway(tmp_path, broker, run, entry, db_url)
    n = 25
    try:
        gw.start()
        try:
            _wait(lambda: "connected host=" in gw.log_text(), 15, "the broker connection")
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)  # publishes reach its socket; no PUBACK comes back
            _post(gw, key, n, "dev-inflight")
            leased = "SELECT count(*) FROM outbox WHERE lease_owner IS NOT NULL"
            _wait(lambda: _count(db_url, leased) == n, 15, "every row handed to the connection")
        finally:
            gw.kill()
            if broker.proc is not None:
                broker.proc.send_signal(signal.SIGCONT)
        _replayed(gw, broker, run, db_url, n)
    finally:
        broker.kill()
