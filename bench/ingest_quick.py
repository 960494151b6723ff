"""Sustained QoS 1 ingest rate (broker → gateway → database) vs a bare paho client, in one run.

Method: a throwaway mosquitto; for each subscriber its persistent session is created first, then N
QoS 1 packets are published while it is offline (the broker queues them), then the subscriber is
started and timed until the last message is committed (gateway) or received and acked (paho).
So the publisher's speed does not limit what is measured, and every run drains the same backlog.

    .venv/bin/python bench/ingest_quick.py [--count 20000] [--pg-url postgresql://...]

Without ``--pg-url`` a fresh database is created on the shared PostgreSQL (127.0.0.1:5432) and
dropped afterwards. Prints one line per measurement and the ratios. Never gates anything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from gateway.settings import DatabaseSettings, IngestSettings, MqttSettings  # noqa: E402
from gateway.store import open_store  # noqa: E402
from tests.support.mqtt import MosquittoServer, packet, pipeline, publish  # noqa: E402


def preload(server: MosquittoServer, count: int, tag: str) -> float:
    """Publish ``count`` packets (QoS 1); returns the publish rate."""
    payloads = [packet(f"{tag}-{i % 50}", i) for i in range(count)]
    topics = [f"sensors/{tag}-{i % 50}/data" for i in range(count)]
    res = publish(server.host, server.port, payloads, topics=topics, timeout=120)
    assert res.count == count, f"only {res.count} of {count} acked by the broker"
    return count / res.seconds


@dataclass
class Rate:
    """Messages per second (wall clock) and this process's CPU microseconds per message."""

    per_s: float
    cpu_us: float

    def __str__(self) -> str:
        return f"{self.per_s:8.0f} msg/s {self.cpu_us:6.1f} us CPU/msg"


def paho_rate(server: MosquittoServer, count: int, v5: bool = True) -> Rate:
    """A bare paho client (its own loop, auto-ack) draining ``count`` queued messages (MQTT 5 or 3.1.1)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def make() -> Any:
        if not v5:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho311", protocol=paho.MQTTv311,
                            clean_session=False)  # fmt: skip
            c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("sensors/+/data", qos=1)
            return c, None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=paho.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 1000
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("sensors/+/data", qos=1)
        return c, props

    def connect(c: Any, props: Any) -> None:
        if v5:
            c.connect(server.host, server.port, clean_start=False, properties=props)
        else:
            c.connect(server.host, server.port)

    c, props = make()
    connect(c, props)
    c.loop(1.0)
    c.loop(1.0)
    c.disconnect()
    preload(server, count, "paho")
    got = 0
    done = threading.Event()
    first: list[float] = []

    def on_message(cl: Any, u: Any, msg: Any) -> None:
        nonlocal got
        if not first:
            first.append(time.monotonic())
        got += 1
        if got >= count:
            done.set()
            cl.disconnect()

    c, props = make()
    c.on_message = on_message
    t0, cpu0 = time.monotonic(), time.process_time()
    connect(c, props)
    c.loop_forever()
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    assert got >= count
    return Rate(count / elapsed, cpu / count * 1e6)


async def gateway_rate(server: MosquittoServer, db_url: str, count: int, client_id: str) -> Rate:
    """The gateway's bridge + ingest + store draining ``count`` queued messages."""
    mqtt = MqttSettings(url=server.url, client_id=client_id)
    db = DatabaseSettings.model_validate({"DATABASE_URL": db_url})
    async with open_store(db) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()):
            pass  # creates the session and subscription
        await trio.to_thread.run_sync(preload, server, count, client_id)
        t0, cpu0 = time.monotonic(), time.process_time()
        async with pipeline(mqtt, store, IngestSettings()) as p:
            while p.ingest.committed < count:
                await trio.sleep(0.01)
            elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    return Rate(count / elapsed, cpu / count * 1e6)


async def bridge_rate(server: MosquittoServer, count: int) -> Rate:
    """The bridge alone (ack each batch at once, no database): the MQTT side's ceiling."""
    from gateway.health import ComponentHealth
    from gateway.mqtt import Inbound, MqttBridge

    mqtt = MqttSettings(url=server.url, client_id="bench-bridge")
    bridge = MqttBridge(mqtt, ComponentHealth("mqtt"))
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(preload, server, count, "bridge")
    got = 0
    t0, cpu0 = time.monotonic(), time.process_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        while got < count:
            batch = await recv.receive()
            bridge.ack(batch)
            got += len(batch)
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    return Rate(count / elapsed, cpu / count * 1e6)


def _psql(url: str, sql: str) -> None:
    subprocess.run(["psql", "-X", "-q", "-d", url, "-c", sql], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--pg-url", default=None, help="an empty database (default: create one on :5432)")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    n = args.count
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        # No periodic persistence: rewriting a 20k-message DB every second would be what we measure.
        server = MosquittoServer(Path(tmp) / "mosquitto", autosave_interval=3600)
        server.start()
        created = None
        try:
            pg_url = args.pg_url
            if pg_url is None:
                name = f"bench_ingest_{uuid.uuid4().hex[:8]}"
                _psql(args.admin_url, f"CREATE DATABASE {name}")
                created = name
                pg_url = args.admin_url.rsplit("/", 1)[0] + f"/{name}"
            pub = preload(server, n, "warmup")  # also warms the broker
            # Drain the warm-up backlog nowhere: nobody subscribed before it, so nothing is queued.
            paho = paho_rate(server, n)
            paho311 = paho_rate(server, n, v5=False)
            bridge = trio.run(bridge_rate, server, n)
            sqlite = trio.run(gateway_rate, server, f"sqlite:///{tmp}/bench.db", n, "bench-sqlite")
            pg = trio.run(gateway_rate, server, pg_url, n, "bench-pg")
            paho2 = paho_rate(server, n)  # again, so load drift shows
        finally:
            server.kill()
            if created:
                _psql(args.admin_url, f"DROP DATABASE IF EXISTS {created} WITH (FORCE)")
    base = (paho.per_s + paho2.per_s) / 2
    base_cpu = (paho.cpu_us + paho2.cpu_us) / 2
    print(f"messages per run: {n}   (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"publisher, QoS 1 paho:     {pub:8.0f} msg/s")
    print(f"bare paho receive, QoS 1:  {paho}   (first)")
    print(f"bare paho receive, QoS 1:  {paho2}   (last)")
    print(f"bare paho 3.1.1, QoS 1:    {paho311}")
    rows = (("bridge only, ack, no DB", bridge), ("gateway -> SQLite", sqlite), ("gateway -> PostgreSQL", pg))
    for name, r in rows:
        ratio = f"rate {r.per_s / base:.2f}, CPU {r.cpu_us / base_cpu:.2f}x"
        print(f"{name + ':':26} {r}   ratio to paho: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
