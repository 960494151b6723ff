"""Scenario 4: PostgreSQL under ``gateway serve`` with a steady stream: a fast restart, stopped for
60 s, slowed to 500 ms per round trip (through the fault proxy), and every connection killed with
``pg_terminate_backend`` (the LISTEN connection too) [lost 0, no crash, resumes by itself; events
still flow within PROCESSOR_INTERVAL].

The gateway reaches the database through :class:`FaultProxy` in every variant (only ``slow`` uses
it). ``recovery_s`` runs from the fault's end until every reading acked by then is stored;
``events_resumed_s`` until the SSE client (reconnecting as a browser does) sees a new event. Once the
backlog is processed a probe reading is published: its ``packet`` event must reach the SSE client
within ``PROCESSOR_INTERVAL`` of its PUBACK (so the wake-ups, NOTIFY included, work again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import (
    Gateway,
    Publisher,
    SseRecorder,
    acount_stored,
    gateway_env,
    readings,
    stored,
    wait_stored,
)
from tests.faults.proxy import FaultProxy
from tests.support.mqtt import MosquittoServer
from tests.support.pg import PgServer, psql

pytestmark = pytest.mark.slow

RATE = 200
INTERVAL = 2.0  # PROCESSOR_INTERVAL


def _listeners(url: str) -> int:
    return int(psql(url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'").strip())


def _unprocessed(url: str) -> int:
    return int(psql(url, "SELECT count(*) FROM messages WHERE processed_at IS NULL").strip())


def _terminate(url: str) -> int:
    sql = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database()"
    return int(psql(url, sql + " AND pid <> pg_backend_pid()").strip())


@pytest.mark.parametrize(("how", "outage"), [("restart", 0.0), ("stop", 60.0), ("slow", 15.0), ("terminate", 0.0)])
async def test_database_fault_under_gateway_serve(
    mosquitto: MosquittoServer, pg_server_factory: Callable[[], PgServer], tmp_path: Path, how: str, outage: float
) -> None:
    server = await trio.to_thread.run_sync(pg_server_factory)
    url = await trio.to_thread.run_sync(server.create_database)
    proxy = FaultProxy(server.port)
    batch = readings(f"db-{how}", int(RATE * (outage + 10)), devices=10)
    probe = readings(f"probe-{how}", 1)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id=f"pub-db-{how}")
    states: set[str] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        gw_url = url.replace(f":{server.port}/", f":{proxy.port}/")
        env = gateway_env(
            tmp_path / "gw",
            mqtt_url=mosquitto.url,
            db_url=gw_url,
            client_id=f"gw-db-{how}",
            PROCESSOR_INTERVAL=str(INTERVAL),
            DATABASE_QUERY_TIMEOUT="5",
        )
        gw = Gateway(tmp_path / "gw", env)
        await trio.to_thread.run_sync(gw.start)
        try:
            sse = SseRecorder(gw.url, reconnect=True)
            await nursery.start(sse.run)
            nursery.start_soon(lambda: pub.arun(batch, rate=RATE, ack_wait=120))
            with trio.fail_after(60):
                while await acount_stored(url) < RATE * 2:
                    await trio.sleep(0.1)
            t0 = time.monotonic()
            if how == "restart":
                await server.astop("fast")
                await server.astart()
            elif how == "stop":
                await server.astop("fast")
            elif how == "slow":
                proxy.set_delay(0.25)  # each way: 500 ms per round trip
            else:
                assert await trio.to_thread.run_sync(_terminate, url) >= 2  # the pool and LISTEN
                # The LISTEN connection noticed, and a new one LISTENs (its last query says LISTEN
                # until its first keepalive check, 10 s later; the old backend is gone).
                with trio.fail_after(8):
                    while "database LISTEN connection lost" not in gw.log():
                        await trio.sleep(0.1)
                    while await trio.to_thread.run_sync(_listeners, url) != 1:
                        await trio.sleep(0.1)
            while time.monotonic() < t0 + outage:
                states.add((await trio.to_thread.run_sync(gw.ping))["status"])
                assert gw.running, "the gateway exited during the outage"
                await trio.sleep(1.0)
            if how == "stop":
                await server.astart()
            proxy.restore()
            back, events_before = time.monotonic(), len(sse.events)
            # Resumes by itself: what was acked by now is stored (recovery), then all the rest.
            await wait_stored(url, set(pub.acked), limit=150)
            recovery = time.monotonic() - back
            with trio.fail_after(150):
                while len(sse.events) == events_before:
                    await trio.sleep(0.05)
            resumed = time.monotonic() - back
            with trio.fail_after(150):
                while len(pub.attempted) < len(batch):
                    await trio.sleep(0.2)
            await wait_stored(url, pub.acked, limit=150)
            # Once the backlog is processed, a probe must go through at once (the wake-ups work).
            with trio.fail_after(150):
                while await trio.to_thread.run_sync(_unprocessed, url):
                    await trio.sleep(0.2)
            probe_pub = Publisher(mosquitto.host, mosquitto.port, client_id=f"pub-probe-{how}")
            await probe_pub.arun(probe, ack_wait=10)
            acked_at = time.monotonic()
            with trio.fail_after(30):
                while probe[0].key not in sse.arrived:
                    await trio.sleep(0.01)
            flow = sse.arrived[probe[0].key] - acked_at
            assert gw.running
        finally:
            await trio.to_thread.run_sync(gw.kill_safely)
            nursery.cancel_scope.cancel()
    acc = report(
        account(
            f"4 PostgreSQL {how}" + (f" ({outage:.0f} s)" if outage else ""),
            sent=pub.attempted,
            acked=pub.acked,
            stored=[k for k in stored(url) if not k.startswith("probe")],
            recovery_s=recovery,
            events_resumed_s=round(resumed, 2),
            probe_event_s=round(flow, 3),
            degraded="degraded" in states if outage else "-",
        )
    )
    assert acc.acked == len(batch)
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0
    assert flow <= INTERVAL, f"the probe's event came {flow:.2f} s after its PUBACK"
    if how == "stop":
        assert "degraded" in states
