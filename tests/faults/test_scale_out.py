"""Scale-out (issue 13): three ``gateway serve`` processes in one MQTT share group on one PostgreSQL
and one broker, under a steady 500 readings/s; one is SIGKILLed for 60 s and restarted.

Targets: every acknowledged reading stored once and processed once (one ``packet`` event each);
an SSE client on *each* instance sees every event once, in id order (the dead instance's client
reconnects with ``Last-Event-ID``); the longest publish → stored and publish → SSE delays are
measured and recorded (``ops/SCALING.md`` explains them: mosquitto keeps routing a dead member's
share of the stream to its persistent session until it returns). Removing an instance for good
(``MQTT_SESSION_EXPIRY=0``, then a stop) loses nothing. And SQLite refuses a second instance at
start-up.
"""

from __future__ import annotations

import json
import math
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import trio

from gateway.cli import EXIT_REFUSED
from tests.e2e.harness import GatewayProcess, api_key
from tests.faults.accounting import account, report
from tests.support.mqtt import MosquittoServer, PublishResult, packet, publish
from tests.support.pg import psql

RATE = 500.0  # readings/s, steady
WARMUP_S = 5.0  # load before the kill
DEAD_S = 60.0  # the killed instance stays down this long
AFTER_S = 10.0  # load after the restart
DEVICES = 50
INSTANCES = 3
VICTIM = 1  # the instance killed (0-based)

pytestmark = pytest.mark.slow


@dataclass
class SseLog:
    """What one SSE client saw: (event id, seq, arrival time) in arrival order, and its reconnects."""

    url: str
    key: str
    seen: list[tuple[int, int, float]] = field(default_factory=list)
    connects: int = 0
    opened: trio.Event = field(default_factory=trio.Event)

    @property
    def last_id(self) -> int | None:
        return self.seen[-1][0] if self.seen else None


async def _follow(log: SseLog) -> None:
    """Read ``/api/v1/events?types=packet`` until cancelled, reconnecting with Last-Event-ID (as
    a browser's EventSource does) whenever the stream or the instance goes away."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0)) as client:
        while True:
            headers = {"X-API-Key": log.key}
            if log.last_id is not None:
                headers["Last-Event-ID"] = str(log.last_id)
            try:
                async with client.stream("GET", log.url + "/api/v1/events?types=packet", headers=headers) as resp:
                    if resp.status_code != 200:
                        await trio.sleep(0.5)
                        continue
                    log.connects += 1
                    log.opened.set()
                    event_id: int | None = None
                    async for line in resp.aiter_lines():
                        if line.startswith("id:"):
                            event_id = int(line[3:].strip())
                        elif line.startswith("data:") and event_id is not None:
                            seq = json.loads(line[5:])["seq"]
                            log.seen.append((event_id, seq, time.time()))
                        elif not line:
                            event_id = None
            except (httpx.HTTPError, OSError):
                pass
            await trio.sleep(0.5)


def _rows(url: str, sql: str) -> list[list[str]]:
    return [line.split("|") for line in psql(url, sql).splitlines() if line.strip()]


async def _wait(predicate: object, seconds: float, what: str) -> None:
    with trio.move_on_after(seconds):
        while not await trio.to_thread.run_sync(predicate):  # type: ignore[arg-type]
            await trio.sleep(0.5)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_three_instances_one_sigkilled_for_60s(tmp_path: Path, pg_url: str) -> None:
    broker = MosquittoServer(tmp_path / "mosquitto")
    broker.start()
    key, entry = api_key("scale", "read")
    gateways: list[GatewayProcess] = []
    try:
        for n in range(INSTANCES):
            workdir = tmp_path / f"gw{n}"
            workdir.mkdir()
            env = {
                "DATABASE_URL": pg_url,
                "MQTT_URL": broker.url,
                "MQTT_CLIENT_ID": f"scale-gw{n}",  # unique per instance: its broker session
                "MQTT_SHARE_GROUP": "gateways",  # the same for all: they split the stream
                # Longer than the outage: an expired session's queue is discarded by the broker.
                "MQTT_SESSION_EXPIRY": "3600",
                "API_KEYS": entry,
                "SSE_MAX_STREAMS_PER_KEY": "10",
            }
            gw = GatewayProcess(workdir, env)
            await trio.to_thread.run_sync(gw.start)
            gateways.append(gw)
        victim = gateways[VICTIM]

        total = int(RATE * (WARMUP_S + DEAD_S + AFTER_S))
        t0 = time.time() + 1.0  # scheduled publish time of reading i: t0 + i / RATE
        devices = [f"dev-{i % DEVICES:02d}" for i in range(total)]
        payloads = [packet(devices[i], i, ts=t0 + i / RATE) for i in range(total)]
        topics = [f"sensors/{d}/data" for d in devices]
        sse = [SseLog(gw.url, key) for gw in gateways]
        marks: dict[str, float] = {}

        async with trio.open_nursery() as nursery:
            for log in sse:
                nursery.start_soon(_follow, log)
            with trio.fail_after(20):
                for log in sse:
                    await log.opened.wait()

            async def kill_and_restart() -> None:
                await trio.sleep(max(0.0, t0 + WARMUP_S - time.time()))
                marks["killed"] = time.time()
                await trio.to_thread.run_sync(victim.kill)  # SIGKILL
                await trio.sleep(max(0.0, marks["killed"] + DEAD_S - time.time()))
                marks["restarted"] = time.time()
                await trio.to_thread.run_sync(victim.start)
                marks["ready"] = time.time()

            nursery.start_soon(kill_and_restart)
            await trio.sleep(max(0.0, t0 - time.time()))
            result = await trio.to_thread.run_sync(
                lambda: publish(broker.host, broker.port, payloads, topics=topics, rate=RATE, timeout=60)
            )
            marks["published"] = time.time()
            await _wait(lambda: "ready" in marks, 30, "the restart")

            acked = len(result.acked)
            await _wait(
                lambda: int(psql(pg_url, "SELECT count(*) FROM messages WHERE processed_at IS NOT NULL")) >= acked,
                120,
                "every acked reading processed",
            )
            events = int(psql(pg_url, "SELECT count(*) FROM events WHERE type = 'packet'"))
            with trio.move_on_after(60):
                while any(len(log.seen) < events for log in sse):
                    await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

        rows = _rows(
            pg_url,
            "SELECT device_id, seq, extract(epoch FROM received_at), extract(epoch FROM processed_at) FROM messages",
        )
        stored = [f"{d}:{s}" for d, s, _, _ in rows]
        sched = {i: t0 + i / RATE for i in range(total)}
        store_delay = {int(s): float(r) - sched[int(s)] for _, s, r, _ in rows}
        process_delay = {int(s): float(p) - sched[int(s)] for _, s, _, p in rows if p}
        per_message = _rows(pg_url, "SELECT message_id, count(*) FROM events WHERE type = 'packet' GROUP BY 1")
        event_ids = sorted(int(i) for (i,) in _rows(pg_url, "SELECT id FROM events WHERE type = 'packet'"))

        # publish → SSE on the instances that stayed up (the victim's client was down with it).
        live = [log for n, log in enumerate(sse) if n != VICTIM]
        sse_delay = max(at - sched[seq] for log in live for _, seq, at in log.seen)
        slowest = max(store_delay, key=lambda s: store_delay[s])
        waited = sum(1 for d in store_delay.values() if d > 5.0)
        dead_published = sum(1 for i in range(total) if marks["killed"] <= sched[i] < marks["restarted"])
        ordered = sorted(store_delay.values())
        # The restarted process's own account: when it logged "ready", and its start-up time.
        ready = re.findall(r"^(\S+) INFO gateway.app gateway ready .*startup_ms=(\d+)", victim.log_text(), re.M)
        ready_at = datetime.fromisoformat(ready[-1][0]).timestamp() if ready else math.nan
        recovery = (
            max(float(r) for _, s, r, _ in rows if marks["killed"] <= sched[int(s)] < marks["restarted"])
            - marks["restarted"]
        )

        acc = report(
            account(
                "scale-out: 3 instances, 1 SIGKILLed 60 s",
                sent=[f"{d}:{i}" for i, d in enumerate(devices)],
                acked=[f"{devices[i]}:{i}" for i in result.acked],
                stored=stored,
                recovery_s=recovery,
                rate=int(RATE),
                max_store_delay_s=round(store_delay[slowest], 2),
                max_process_delay_s=round(max(process_delay.values()), 2),
                max_sse_delay_s=round(sse_delay, 2),
                waited_over_5s=waited,
                published_while_dead=dead_published,
                p50_store_delay_s=round(ordered[len(ordered) // 2], 3),
                p99_store_delay_s=round(ordered[len(ordered) * 99 // 100], 2),
                restart_to_ready_s=round(marks["ready"] - marks["restarted"], 2),
                restart_to_logged_ready_s=round(ready_at - marks["restarted"], 2),
                restart_startup_ms=int(ready[-1][1]) if ready else None,
                sse_reconnects=[log.connects - 1 for log in sse],
            )
        )
        logs = "\n".join(gw.log_text()[-2000:] for gw in gateways)
        assert acc.acked == acc.sent == total, logs
        assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0, acc.line()
        assert len(process_delay) == len(rows), "every stored reading processed"
        assert len(per_message) == len(rows) and all(n == "1" for _, n in per_message), "one event per message"
        for n, log in enumerate(sse):
            ids = [i for i, _, _ in log.seen]
            assert ids == event_ids, f"SSE client of instance {n}: {len(ids)} events, {len(set(ids))} distinct"
        assert sse[VICTIM].connects >= 2, "the victim's client reconnected after the restart"
        # mosquitto 2.0 keeps routing the dead member's share to its session: those readings wait
        # for the restart (the longest delay is the outage), none is lost or handed to another member.
        assert store_delay[slowest] < DEAD_S + 30
    finally:
        for gw in gateways:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
        broker.kill()


def test_two_instances_on_sqlite_are_refused_at_start_up(tmp_path: Path) -> None:
    """The same deployment on SQLite: the second instance is refused (exit 3) with the reason."""
    broker = MosquittoServer(tmp_path / "mosquitto")
    broker.start()
    db = tmp_path / "data" / "gateway.db"
    gateways: list[GatewayProcess] = []
    try:
        for n in range(2):
            workdir = tmp_path / f"gw{n}"
            workdir.mkdir()
            env = {
                "DATABASE_URL": f"sqlite:///{db}",
                "MQTT_URL": broker.url,
                "MQTT_CLIENT_ID": f"scale-sqlite-gw{n}",
                "MQTT_SHARE_GROUP": "gateways",
            }
            gateways.append(GatewayProcess(workdir, env))
        first, second = gateways
        first.start()
        second.start(wait=False)
        rc = second.wait(30)
        last = second.log_text().strip().splitlines()[-1]
        assert rc == EXIT_REFUSED, second.log_text()[-3000:]
        assert last.startswith("gateway: cannot start: database: another gateway"), last
        assert "SQLite is for one instance" in last and "PostgreSQL" in last
        assert first.proc is not None and first.proc.poll() is None
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        for gw in gateways:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.kill()
        broker.kill()


def test_removing_an_instance_for_good_loses_nothing(tmp_path: Path, pg_url: str) -> None:
    """The removal procedure of ops/SCALING.md, under 500 readings/s with 2 instances: restart the
    leaving one with ``MQTT_SESSION_EXPIRY=0`` (it drains what its session held), then stop it for
    good: it unsubscribes, commits what the broker still sends, and only then disconnects, so
    the broker's discarding of the ended session costs nothing, and nothing is queued for it later."""
    broker = MosquittoServer(tmp_path / "mosquitto")
    broker.start()
    gateways: list[GatewayProcess] = []
    try:
        for n in range(2):
            workdir = tmp_path / f"gw{n}"
            workdir.mkdir()
            env = {
                "DATABASE_URL": pg_url,
                "MQTT_URL": broker.url,
                "MQTT_CLIENT_ID": f"scale-rm-gw{n}",
                "MQTT_SHARE_GROUP": "gateways",
                "MQTT_SESSION_EXPIRY": "3600",
            }
            gw = GatewayProcess(workdir, env)
            gw.start()
            gateways.append(gw)
        leaver = gateways[1]
        total = int(RATE * 20)
        devices = [f"dev-{i % DEVICES:02d}" for i in range(total)]
        payloads = [packet(devices[i], i) for i in range(total)]
        topics = [f"sensors/{d}/data" for d in devices]
        results: list[PublishResult] = []
        publisher = threading.Thread(
            target=lambda: results.append(publish(broker.host, broker.port, payloads, topics=topics, rate=RATE))
        )
        publisher.start()
        time.sleep(4)
        assert leaver.stop() == 0
        leaver.env["MQTT_SESSION_EXPIRY"] = "0"
        leaver.start()
        time.sleep(4)
        assert leaver.stop() == 0  # for good, mid-stream
        publisher.join(120)
        (result,) = results
        expected = len(result.acked)
        deadline = time.monotonic() + 30
        while int(psql(pg_url, "SELECT count(*) FROM messages")) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        stored = [f"{d}:{s}" for d, s in _rows(pg_url, "SELECT device_id, seq FROM messages")]
        acc = report(
            account(
                "scale-out: remove an instance for good (2 instances)",
                sent=[f"{d}:{i}" for i, d in enumerate(devices)],
                acked=[f"{devices[i]}:{i}" for i in result.acked],
                stored=stored,
                rate=int(RATE),
            )
        )
        assert "drained: every message received is committed" in leaver.log_text(), leaver.log_text()[-3000:]
        assert acc.acked == acc.sent == total
        assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0, acc.line()
    finally:
        for gw in gateways:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.stop()
        broker.kill()
