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
import subprocess
import sys
import tempfile
import threading
import time
import uuid
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


def paho_rate(server: MosquittoServer, count: int) -> float:
    """A bare paho client (its own loop, auto-ack) draining ``count`` queued messages."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def make() -> Any:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=paho.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 1000
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("sensors/+/data", qos=1)
        return c, props

    c, props = make()
    c.connect(server.host, server.port, clean_start=False, properties=props)
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
    t0 = time.monotonic()
    c.connect(server.host, server.port, clean_start=False, properties=props)
    c.loop_forever()
    elapsed = time.monotonic() - t0
    assert got >= count
    return count / elapsed


async def gateway_rate(server: MosquittoServer, db_url: str, count: int, client_id: str) -> float:
    """The gateway's bridge + ingest + store draining ``count`` queued messages."""
    mqtt = MqttSettings(url=server.url, client_id=client_id)
    db = DatabaseSettings.model_validate({"DATABASE_URL": db_url})
    async with open_store(db) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()):
            pass  # creates the session and subscription
        await trio.to_thread.run_sync(preload, server, count, client_id)
        t0 = time.monotonic()
        async with pipeline(mqtt, store, IngestSettings()) as p:
            while p.ingest.committed < count:  # noqa: ASYNC110 - a benchmark polling a counter
                await trio.sleep(0.01)
            elapsed = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    return count / elapsed


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
        server = MosquittoServer(Path(tmp) / "mosquitto")
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
            sqlite = trio.run(gateway_rate, server, f"sqlite:///{tmp}/bench.db", n, "bench-sqlite")
            pg = trio.run(gateway_rate, server, pg_url, n, "bench-pg")
            paho2 = paho_rate(server, n)  # again, so load drift shows
        finally:
            server.kill()
            if created:
                _psql(args.admin_url, f"DROP DATABASE IF EXISTS {created} WITH (FORCE)")
    paho_avg = (paho + paho2) / 2
    print(f"messages per run:          {n}")
    print(f"publisher (QoS 1, paho):    {pub:8.0f} msg/s")
    print(f"bare paho receive (QoS 1):  {paho:8.0f} / {paho2:8.0f} msg/s (before / after)")
    print(f"gateway -> SQLite:          {sqlite:8.0f} msg/s  ratio to paho {sqlite / paho_avg:.2f}")
    print(f"gateway -> PostgreSQL:      {pg:8.0f} msg/s  ratio to paho {pg / paho_avg:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
