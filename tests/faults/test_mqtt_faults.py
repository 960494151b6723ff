"""Ingest under faults, the ingest path alone: its process SIGKILLed mid-burst, PostgreSQL stopped
10 s. (The whole gateway SIGKILLed: test_gateway_kill.py; the broker: test_broker_faults.py.)"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gateway.settings import IngestSettings, MqttSettings
from gateway.store import open_store
from tests.faults.accounting import Accounting, account, report
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


def _report(
    name: str, sent: range, published: set[int], keys: list[tuple[str, int | None]], **notes: object
) -> Accounting:
    """One accounting line; the seqs (one device per test) are the keys."""
    return report(
        account(
            name,
            sent=(str(i) for i in sent),
            acked=(str(i) for i in published),
            stored=(str(seq) for _, seq in keys),
            **notes,
        )
    )


async def test_sigkill_mid_burst_loses_and_duplicates_nothing(mosquitto: MosquittoServer, tmp_path: Path) -> None:
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
    name = "1 ingest process SIGKILL mid-burst (sqlite)"
    acc = _report(name, range(1, count + 1), published, keys, killed_after=killed_at)
    assert len(published) == count
    assert acc.lost == 0 and acc.duplicated == 0
    assert len(keys) == count


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
                results.append(
                    await trio.to_thread.run_sync(
                        lambda: publish(
                            mosquitto.host, mosquitto.port, payloads, rate=400, timeout=60, topic="sensors/db/data"
                        )
                    )
                )

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
    acc = _report("4 ingest with PostgreSQL stopped 10 s", range(len(payloads)), published, keys)
    assert "degraded" in states
    assert len(published) == len(payloads)
    assert acc.lost == 0 and acc.duplicated == 0
