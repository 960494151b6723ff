"""Scenario 7: a processor SIGKILLed while it holds leases [every message processed; each SSE event
forwarded exactly once with a stable id; leases reclaimed after PROCESSOR_LEASE].

Two ``gateway serve`` instances share one PostgreSQL. Instance A reaches it through the fault proxy
with 400 ms round trips, so its claimed batches stay leased for a while; it is SIGKILLed while it
holds leases. Instance B (direct) must take those messages over once their leases expire, not before.
An SSE client on B sees every message's event once; a client replaying from the start afterwards
sees the same ids.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, SseRecorder, gateway_env, readings, stored, wait_stored
from tests.faults.proxy import FaultProxy
from tests.support.mqtt import MosquittoServer
from tests.support.pg import psql

pytestmark = pytest.mark.slow

LEASE = 3.0
INTERVAL = 1.0


def _leased_by(url: str, pid: int) -> list[tuple[int, datetime]]:
    out = psql(
        url,
        "SELECT id, extract(epoch FROM lease_until) FROM messages WHERE processed_at IS NULL"
        f" AND lease_owner LIKE '%:{pid}/%' AND lease_until > now()",
    )
    return [(int(i), datetime.fromtimestamp(float(t))) for i, t in (line.split("|") for line in out.split())]


def _processed_at(url: str, ids: list[int]) -> list[datetime]:
    out = psql(
        url,
        "SELECT extract(epoch FROM processed_at) FROM messages"
        f" WHERE id IN ({','.join(map(str, ids))}) AND processed_at IS NOT NULL",
    )
    return [datetime.fromtimestamp(float(t)) for t in out.split()]


def _unprocessed(url: str) -> int:
    return int(psql(url, "SELECT count(*) FROM messages WHERE processed_at IS NULL").strip())


async def test_processor_killed_holding_leases(mosquitto: MosquittoServer, pg_url: str, tmp_path: Path) -> None:
    port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = FaultProxy(port)
    batch = readings("lease", 4000, devices=20)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-lease")
    common = {"PROCESSOR_LEASE": str(LEASE), "PROCESSOR_INTERVAL": str(INTERVAL), "PROCESSOR_BATCH_SIZE": "200"}
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        b = Gateway(
            tmp_path / "b",
            gateway_env(tmp_path / "b", mqtt_url=mosquitto.url, db_url=pg_url, client_id="gw-lease-b", **common),
        )
        a = Gateway(
            tmp_path / "a",
            gateway_env(
                tmp_path / "a",
                mqtt_url=mosquitto.url,
                db_url=pg_url.replace(f":{port}/", f":{proxy.port}/"),
                client_id="gw-lease-a",
                **common,
            ),
        )
        await trio.to_thread.run_sync(b.start)
        await trio.to_thread.run_sync(a.start)
        assert a.proc is not None
        try:
            live = SseRecorder(b.url)
            await nursery.start(live.run)
            proxy.set_delay(0.2)
            nursery.start_soon(lambda: pub.arun(batch, rate=800, ack_wait=60))
            with trio.fail_after(60):
                while not await trio.to_thread.run_sync(_leased_by, pg_url, a.proc.pid):
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(a.kill)
            killed = datetime.now()
            held = await trio.to_thread.run_sync(_leased_by, pg_url, a.proc.pid)
            assert held, "A finished its batch before the kill: no lease was held"
            await wait_stored(pg_url, [r.key for r in batch], limit=120)
            with trio.fail_after(120):
                while await trio.to_thread.run_sync(_unprocessed, pg_url):
                    await trio.sleep(0.2)
            taken = await trio.to_thread.run_sync(_processed_at, pg_url, [i for i, _ in held])
            with trio.fail_after(60):
                while len(live.packet_keys()) < len(batch):
                    await trio.sleep(0.1)
            await trio.sleep(1.0)  # a repeat would show up now
            replay = SseRecorder(b.url, last_event_id=0)
            async with trio.open_nursery() as inner:
                await inner.start(replay.run)
                with trio.fail_after(60):
                    while len(replay.events) < len(live.events):
                        await trio.sleep(0.1)
                inner.cancel_scope.cancel()
        finally:
            nursery.cancel_scope.cancel()  # first: the SSE client must not see B die
            a.kill_safely()
            b.kill_safely()
    expiry = max(t for _, t in held)
    early = [t for t in taken if t < min(u for _, u in held)]
    reclaimed = (max(taken) - killed).total_seconds()
    keys = live.packet_keys()
    acc = report(
        account(
            "7 processor SIGKILLed holding leases",
            sent=pub.attempted,
            acked=pub.acked,
            stored=keys,
            recovery_s=reclaimed,
            leases_held=len(held),
            lease_s=LEASE,
            stored_rows=len(stored(pg_url)),
        )
    )
    assert len(taken) == len(held)  # every leased message processed in the end
    assert not early, f"{len(early)} leased messages were taken over before their lease expired"
    assert (max(taken) - expiry).total_seconds() <= INTERVAL + 2.0, "leases reclaimed late"
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0  # each event once, none missed
    ids = [e.id for e in live.events]
    assert ids == sorted(set(ids))
    assert [(e.id, e.type) for e in replay.events[: len(ids)]] == [(e.id, e.type) for e in live.events]
    assert replay.packet_keys()[: len(keys)] == keys  # stable ids: the same id carries the same message
