"""Ingest under faults: the gateway SIGKILLed mid-burst, the broker killed, the database stopped."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gateway.settings import IngestSettings, MqttSettings
from gateway.store import open_store
from tests.support.mqtt import (
    MosquittoServer,
    eventually,
    packet,
    pipeline,
    pipeline_subprocess,
    publish,
    publish_subprocess,
    publisher_result,
    stored_keys,
)
from tests.support.pg import PgServer, db_settings

pytestmark = pytest.mark.slow


def _report(name: str, published: set[int], keys: list[tuple[str, int | None]]) -> tuple[int, int]:
    counts = Counter(seq for _, seq in keys)
    lost = len([s for s in published if s not in counts])
    dup = sum(n - 1 for n in counts.values() if n > 1)
    print(f"\n{name}: acked by broker={len(published)} stored={len(keys)} lost={lost} duplicated={dup}")
    return lost, dup


async def test_sigkill_mid_burst_loses_and_duplicates_nothing(
    mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    count = 20_000
    gw = await trio.to_thread.run_sync(pipeline_subprocess, mosquitto.url, db_url)
    try:
        pub = publish_subprocess(mosquitto.port, count, device="kill", start=1)

        def stored() -> int:
            try:
                return len(stored_keys(db_url))
            except Exception:
                return 0

        # Kill in the middle of the burst (not before the first commit, not after the last).
        with trio.fail_after(120):
            while (n := await trio.to_thread.run_sync(stored)) < 3000:
                await trio.sleep(0.05)
        gw.send_signal(signal.SIGKILL)
        gw.wait()
        killed_at = n
        assert killed_at < count, "the burst had already finished: the kill was not mid-burst"
        result = await trio.to_thread.run_sync(publisher_result, pub)
        gw = await trio.to_thread.run_sync(pipeline_subprocess, mosquitto.url, db_url)
        published = result.acked
        with trio.fail_after(120):
            while len(await trio.to_thread.run_sync(stored_keys, db_url)) < len(published):
                await trio.sleep(0.2)
        await trio.sleep(0.5)
    finally:
        gw.kill()
        gw.wait()
    keys = stored_keys(db_url)
    lost, dup = _report(f"SIGKILL after {killed_at} stored", published, keys)
    assert len(published) == count
    assert lost == 0 and dup == 0
    assert len(keys) == count


async def _settled(value: Callable[[], int], *, quiet: float, limit: float) -> None:
    """Wait until ``value()`` has not changed for ``quiet`` seconds (at most ``limit``)."""
    deadline = trio.current_time() + limit
    last, since = value(), trio.current_time()
    while trio.current_time() < deadline:
        await trio.sleep(0.1)
        now = value()
        if now != last:
            last, since = now, trio.current_time()
        elif trio.current_time() - since >= quiet:
            return
    raise AssertionError(f"still changing after {limit} s")


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_broker_killed_and_restarted_mid_stream(
    mosquitto: MosquittoServer, tmp_path: Path, how: str
) -> None:
    """SIGKILL (the broker loses what it had not autosaved) or SIGTERM (it saves everything)."""
    settings = db_settings(f"sqlite:///{tmp_path}/gw.db")
    mqtt = MqttSettings(url=mosquitto.url, client_id="gw-brokerkill", reconnect_min=0.05, reconnect_max=1.0)
    payloads = [packet("bk", i) for i in range(6000)]
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()) as p:
            results = []

            async def stream() -> None:
                results.append(await trio.to_thread.run_sync(
                    lambda: publish(mosquitto.host, mosquitto.port, payloads, rate=2000, client_id="bk-pub",
                                    timeout=30, topic="sensors/bk/data")
                ))

            nursery.start_soon(stream)
            await eventually(lambda: p.ingest.committed >= 2000, 30)
            await trio.to_thread.run_sync(mosquitto.kill if how == "kill" else mosquitto.stop)
            await eventually(lambda: not p.bridge.connected, 10)
            assert p.health.component("mqtt").state == "degraded"
            await trio.sleep(1.0)
            t0 = time.monotonic()
            await trio.to_thread.run_sync(mosquitto.start)
            await eventually(lambda: p.bridge.connected, 30)
            reconnect_s = time.monotonic() - t0
            await eventually(lambda: bool(results), 60)
            published = results[0].acked
            if how == "stop":
                await eventually(lambda: p.ingest.committed >= len(published), 60)
            else:
                # A SIGKILLed broker may have lost our session (and what it queued for us) if it
                # had not autosaved yet: wait until the stream has settled instead.
                await _settled(lambda: p.ingest.committed, quiet=2.0, limit=60)
            await trio.sleep(0.5)
            acked_by_gateway = {(m.topic, m.payload) for m in p.acked}
        nursery.cancel_scope.cancel()
    keys = stored_keys(settings.url.get_secret_value())
    lost, dup = _report(f"broker {how}", published, keys)
    print(f"reconnected {reconnect_s:.3f}s after the broker came back (backoff max 1 s)")
    stored_seqs = {s for _, s in keys}
    # Everything the gateway acked is stored, nothing twice. (A SIGKILLed broker may lose what it
    # had acked to the publisher but not autosaved yet: counted above, not the gateway's loss.)
    assert dup == 0
    for _topic, payload in acked_by_gateway:
        assert int(payload.split(b'"seq":')[1].split(b"}")[0].split(b",")[0]) in stored_seqs
    assert p.bridge.reconnects >= 1
    assert len(published) > 5000
    if how == "stop":
        assert lost == 0 and len(published) == len(payloads)


async def test_database_stopped_10s_mid_stream(
    mosquitto: MosquittoServer, pg_server_factory: Callable[[], PgServer]
) -> None:
    server = pg_server_factory()
    url = server.create_database()
    settings = db_settings(url)
    mqtt = MqttSettings(url=mosquitto.url, client_id="gw-dbdown", reconnect_min=0.05, reconnect_max=1.0)
    payloads = [packet("db", i) for i in range(8000)]
    states: list[str] = []
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()) as p:
            results = []

            async def stream() -> None:
                results.append(await trio.to_thread.run_sync(
                    lambda: publish(mosquitto.host, mosquitto.port, payloads, rate=400, timeout=60,
                                    topic="sensors/db/data")
                ))

            nursery.start_soon(stream)
            await eventually(lambda: p.ingest.committed >= 1000, 30)
            await server.astop()
            for _ in range(100):
                await trio.sleep(0.1)
                states.append(p.health.component("ingest").state)
            await server.astart()
            await eventually(lambda: bool(results), 60)
            published = results[0].acked
            await eventually(lambda: p.ingest.committed >= len(published), 60)
            await trio.sleep(0.5)
            assert p.health.component("ingest").state == "ok"
        nursery.cancel_scope.cancel()
    keys = stored_keys(url)
    lost, dup = _report("PostgreSQL stopped 10 s", published, keys)
    assert "degraded" in states
    assert len(published) == len(payloads)
    assert lost == 0 and dup == 0


async def test_frozen_broker_detected_by_keepalive(mosquitto: MosquittoServer) -> None:
    """SIGSTOP: TCP stays up, only the keepalive notices; after SIGCONT the bridge is back."""
    from gateway.health import ComponentHealth
    from gateway.mqtt import Inbound, MqttBridge

    mqtt = MqttSettings(url=mosquitto.url, client_id="gw-frozen", keepalive=5, connect_timeout=2.0,
                        reconnect_min=0.05, reconnect_max=0.5)
    health = ComponentHealth("mqtt")
    bridge = MqttBridge(mqtt, health)
    send, _recv = trio.open_memory_channel[list[Inbound]](64)
    assert mosquitto.proc is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        mosquitto.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            await eventually(lambda: not bridge.connected, 15)
            detected = time.monotonic() - t0
            assert health.state == "degraded"
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: bridge.connected, 15)
        nursery.cancel_scope.cancel()
    print(f"\nfrozen broker noticed after {detected:.1f}s (keepalive 5 s)")
    assert detected <= 2 * 5 + 2
