"""Scenario 5: redeliveries are stored once [stored once].

- ``dup``: the broker redelivers, with DUP set, what the gateway had not acknowledged when its
  connection was cut (commits are slowed to 300 ms per round trip so thousands are in flight).
- ``new ids``: a publisher sends the same packets again as new messages (new packet ids, DUP
  clear), and a raw client re-sends one PUBLISH with its packet id and DUP set before the PUBACK.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, RawMqtt, gateway_env, readings, stored, wait_stored
from tests.faults.proxy import FaultProxy
from tests.support.mqtt import MosquittoServer
from tests.support.pg import psql

pytestmark = pytest.mark.slow


def _duplicates(gw: Gateway) -> float:
    total = 0.0
    for line in gw.get("/metrics").text.splitlines():
        if line.startswith("gateway_messages_duplicate_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_broker_redelivers_with_dup_after_a_cut(mosquitto: MosquittoServer, pg_url: str, tmp_path: Path) -> None:
    port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
    db_proxy, mqtt_proxy = FaultProxy(port), FaultProxy(mosquitto.port)
    batch = readings("redeliver-dup", 6000, devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-redeliver-dup")
    async with trio.open_nursery() as nursery:
        await nursery.start(db_proxy.run)
        await nursery.start(mqtt_proxy.run)
        env = gateway_env(
            tmp_path / "gw",
            mqtt_url=f"mqtt://127.0.0.1:{mqtt_proxy.port}",
            db_url=pg_url.replace(f":{port}/", f":{db_proxy.port}/"),
            client_id="gw-redeliver-dup",
        )
        gw = Gateway(tmp_path / "gw", env)
        await trio.to_thread.run_sync(gw.start)
        try:
            db_proxy.set_delay(0.15)
            await pub.arun(batch, ack_wait=60)  # all queued at the broker, most in flight to the gateway
            await trio.sleep(1.0)
            inflight = await trio.to_thread.run_sync(gw.metric, "gateway_mqtt_inflight")
            assert mqtt_proxy.cut() == 1
            t0 = time.monotonic()
            db_proxy.restore()
            await wait_stored(pg_url, pub.acked, limit=120)
            recovery = time.monotonic() - t0
            await trio.sleep(1.0)
            dups = await trio.to_thread.run_sync(_duplicates, gw)
        finally:
            await trio.to_thread.run_sync(gw.kill_safely)
            nursery.cancel_scope.cancel()
    acc = report(
        account(
            "5 redelivery with DUP after the gateway's connection is cut",
            sent=pub.attempted,
            acked=pub.acked,
            stored=stored(pg_url),
            recovery_s=recovery,
            inflight_at_cut=inflight,
            recognised=int(dups),
        )
    )
    assert inflight and inflight > 0, "nothing was in flight when the connection was cut"
    assert dups > 0, "no redelivery reached the gateway"
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.acked == len(batch)
    assert psql(pg_url, "SELECT count(*) FROM messages").strip() == str(len(batch))


async def test_republished_with_new_packet_ids(mosquitto: MosquittoServer, db_url: str, tmp_path: Path) -> None:
    backend = db_url.split(":", 1)[0]
    batch = readings(f"redeliver-new-{backend}", 2000, devices=10)
    env = gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id=f"gw-redeliver-{backend}")
    gw = Gateway(tmp_path / "gw", env)
    await trio.to_thread.run_sync(gw.start)
    first = Publisher(mosquitto.host, mosquitto.port, client_id="pub-redeliver-1")
    again = Publisher(mosquitto.host, mosquitto.port, client_id="pub-redeliver-2")
    try:
        await first.arun(batch, ack_wait=60)
        await wait_stored(db_url, first.acked, limit=60)
        await again.arun(batch, ack_wait=60)  # the same packets as new messages
        raw = RawMqtt(mosquitto.host, mosquitto.port, "pub-redeliver-raw")
        try:
            raw.publish(batch[0].topic, batch[0].payload, 7)
            raw.publish(batch[0].topic, batch[0].payload, 7, dup=True)  # a publisher's own retry
            raw.wait_pubacks(2)
        finally:
            raw.close()
        with trio.fail_after(60):
            while await trio.to_thread.run_sync(_duplicates, gw) < len(batch) + 1:
                await trio.sleep(0.2)
        await trio.sleep(0.5)
        dups = await trio.to_thread.run_sync(_duplicates, gw)
    finally:
        await trio.to_thread.run_sync(gw.kill_safely)
    acc = report(
        account(
            f"5 redelivery with new packet ids ({backend})",
            sent=first.attempted + again.attempted,
            acked=first.acked | again.acked,
            stored=stored(db_url),
            recognised=int(dups),
        )
    )
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.stored == len(batch)
