"""20,000 QoS 1 packets from another process arrive in the database exactly once (both stores)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import trio

from gateway import metrics
from gateway.settings import DatabaseSettings, IngestSettings, MqttSettings
from gateway.store.base import MessageQuery, Store
from tests.support.mqtt import (
    MosquittoServer,
    eventually,
    malformed_packets,
    packet,
    pipeline,
    publish,
    publish_subprocess,
    publisher_result,
    stored_keys,
)

COUNT = 20_000


@pytest.mark.slow
async def test_20k_qos1_exactly_once(
    mosquitto: MosquittoServer, store: Store, store_settings: DatabaseSettings
) -> None:
    mqtt = MqttSettings(url=mosquitto.url, client_id="gw-volume", reconnect_min=0.05, reconnect_max=0.5)
    async with pipeline(mqtt, store, IngestSettings()) as p:
        started = time.monotonic()
        proc = publish_subprocess(mosquitto.port, COUNT, device="vol", start=1)
        result = await trio.to_thread.run_sync(publisher_result, proc)
        assert result.count == COUNT, "the broker acknowledged every publish"
        with trio.fail_after(60):
            while p.ingest.committed < COUNT:
                await trio.sleep(0.05)
        elapsed = time.monotonic() - started
        await trio.sleep(0.3)  # anything beyond COUNT would be a duplicate delivery
        assert p.ingest.committed == COUNT
        assert p.health.component("ingest").state == "ok"
    keys = stored_keys(store_settings.url.get_secret_value())
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert dupes == []
    assert len(keys) == COUNT
    assert {seq for _, seq in keys} == set(range(1, COUNT + 1))
    page = await store.query_messages(MessageQuery(limit=1))
    assert page.total == min(COUNT, 10_000) and page.total_capped == (COUNT > 10_000)  # API_TOTAL_LIMIT
    print(
        f"\n{store.kind}: {COUNT} msgs published and stored in {elapsed:.2f}s (publisher alone {result.seconds:.2f}s)"
    )


async def test_malformed_through_the_broker_do_not_stall(mosquitto: MosquittoServer, store: Store) -> None:
    """1,000 bad packets of many kinds interleaved with 2,000 good ones, over MQTT."""
    kinds = malformed_packets()
    payloads: list[bytes] = []
    topics: list[str] = []
    for i in range(2000):
        payloads.append(packet("mix", i))
        topics.append("sensors/mix/data")
        if i % 2 == 0:
            payloads.append(kinds[(i // 2) % len(kinds)][1])
            topics.append(f"sensors/bad{i}/data")
    mqtt = MqttSettings(url=mosquitto.url, client_id="gw-mixed")
    rejected = {r: metrics.INGEST_REJECTED.labels(r)._value.get() for r, _ in kinds}
    async with pipeline(mqtt, store, IngestSettings()) as p:
        res = await trio.to_thread.run_sync(lambda: publish(mosquitto.host, mosquitto.port, payloads, topics=topics))
        assert res.count == 3000
        await eventually(lambda: p.ingest.committed >= 3000, 60)
        assert p.health.component("ingest").state == "ok"
    assert (await store.query_messages(MessageQuery(limit=1, device_id="mix"))).total == 2000
    rejects = await store.query_rejects(limit=1000)
    assert rejects.total == 1000
    assert {r.reason for r in rejects.items} == {reason for reason, _ in kinds}
    assert all(r.errors and r.topic and r.topic.startswith("sensors/bad") for r in rejects.items)
    counted = sum(metrics.INGEST_REJECTED.labels(r)._value.get() - rejected[r] for r in rejected)
    assert counted == 1000
