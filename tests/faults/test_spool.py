"""PostgreSQL down for longer than the broker holds messages: the disk spool keeps every one.

The issue's scenario is 10 minutes down at 1,000 msg/s (600,000 messages) against a broker queue
that holds far fewer. Here it is scaled down by the same ratio in the broker: 30 s at 500 msg/s
(15,000 messages arrive during the outage) against a mosquitto of our own that keeps at most
2,000 queued messages for the session (plus up to 1,000 in flight), so without the spool about
12,000 of them are dropped. The ingest path runs in-process (bridge → ingest → spool/PostgreSQL)
with ``SPOOL_AFTER`` 2 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from gateway import metrics
from gateway.health import ComponentHealth
from gateway.settings import IngestSettings, MqttSettings
from gateway.spool import Spool
from gateway.store import open_store
from tests.faults.accounting import Accounting, account, report
from tests.support.mqtt import MosquittoServer, Pipeline, eventually, packet, pipeline, publish, stored_keys
from tests.support.pg import PgServer, db_settings

pytestmark = pytest.mark.slow

RATE = 500  # messages per second, steady
BEFORE, DOWN, AFTER = 5.0, 30.0, 5.0  # seconds of stream before, during and after the outage
QUEUE = 2000  # the broker's max_queued_messages for our session


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A broker that drops messages for a slow session past QUEUE queued (the last setting wins)."""
    server = MosquittoServer(tmp_path / "mosquitto", extra_config=f"max_queued_messages {QUEUE}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _account(name: str, count: int, published: set[int], url: str, **notes: object) -> Accounting:
    keys = stored_keys(url)
    return report(
        account(
            name,
            sent=(str(i) for i in range(count)),
            acked=(str(i) for i in published),
            stored=(str(seq) for _, seq in keys),
            **notes,
        )
    )


async def _outage(
    broker: MosquittoServer,
    server: PgServer,
    url: str,
    tmp_path: Path,
    *,
    spool_bytes: int | None,
    count: int,
    down: float,
    client_id: str,
) -> tuple[set[int], dict[str, float]]:
    """Stream ``count`` packets at RATE; stop PostgreSQL ``BEFORE`` s in for ``down`` s; wait until
    everything acked is stored (or the stream settled). Returns the broker-acked indices and figures."""
    mqtt = MqttSettings(url=broker.url, client_id=client_id, reconnect_min=0.05, reconnect_max=1.0)
    ingest = IngestSettings(spool_after=2.0) if spool_bytes is not None else IngestSettings()
    spool_health = ComponentHealth("spool")
    spool = Spool(tmp_path / "spool.db", spool_bytes, spool_health) if spool_bytes is not None else None
    payloads = [packet("sp", i) for i in range(count)]
    results: list[set[int]] = []
    figures: dict[str, float] = {"max_rows": 0, "full_seen": 0}
    async with open_store(db_settings(url)) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, ingest, spool) as p:

            async def stream() -> None:
                def run() -> set[int]:
                    topic = "sensors/sp/data"
                    return publish(broker.host, broker.port, payloads, rate=RATE, timeout=120, topic=topic).acked

                results.append(await trio.to_thread.run_sync(run))

            async def watch() -> None:
                while True:
                    if spool is not None:
                        figures["max_rows"] = max(figures["max_rows"], spool.rows)
                        if spool_health.detail.get("mode") == "full":
                            figures["full_seen"] = 1
                    await trio.sleep(0.05)

            nursery.start_soon(stream)
            nursery.start_soon(watch)
            await trio.sleep(BEFORE)
            await server.astop()
            await trio.sleep(down)
            if spool is not None:
                figures["acked_while_down"] = _acked(p)
            await server.astart()
            restarted = time.monotonic()
            drained_before = metrics.SPOOL_DRAINED._value.get()
            if spool is not None:
                with trio.fail_after(300):
                    while spool.active or not results:
                        await trio.sleep(0.05)
                        if not spool.active and "drain_s" not in figures:
                            figures["drain_s"] = time.monotonic() - restarted
                figures["drained"] = metrics.SPOOL_DRAINED._value.get() - drained_before
                figures.setdefault("drain_s", time.monotonic() - restarted)
            await eventually(lambda: bool(results), 300)
            # Whatever the broker still holds arrives now; wait until ingest has settled.
            await _settled(p)
            nursery.cancel_scope.cancel()
    return results[0], figures


def _acked(p: Pipeline) -> int:
    return len(p.acked)


async def _settled(p: Pipeline, quiet: float = 3.0, limit: float = 120.0) -> None:
    last, since = -1, time.monotonic()
    with trio.fail_after(limit):
        while time.monotonic() - since < quiet:
            now = p.ingest.committed
            if now != last:
                last, since = now, time.monotonic()
            await trio.sleep(0.1)


async def test_spool_keeps_everything_through_a_long_outage(
    small_broker: MosquittoServer, pg_server_factory: Callable[[], PgServer], tmp_path: Path
) -> None:
    server = pg_server_factory()
    url = server.create_database()
    count = int(RATE * (BEFORE + DOWN + AFTER))
    published, fig = await _outage(
        small_broker, server, url, tmp_path, spool_bytes=1 << 30, count=count, down=DOWN, client_id="gw-spool"
    )
    rate = fig["drained"] / fig["drain_s"] if fig["drain_s"] else 0.0
    acc = _account(
        f"11 spool: PostgreSQL down {DOWN:.0f} s at {RATE} msg/s, broker queue {QUEUE}",
        count,
        published,
        url,
        spooled_max=int(fig["max_rows"]),
        drained=int(fig["drained"]),
        drain_s=round(fig["drain_s"], 2),
        drain_rate=f"{rate:.0f}/s",
    )
    assert len(published) == count
    assert fig["max_rows"] > QUEUE * 2  # the outage held more than the broker could
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0
    assert acc.stored == count


async def test_without_the_spool_the_same_outage_loses(
    small_broker: MosquittoServer, pg_server_factory: Callable[[], PgServer], tmp_path: Path
) -> None:
    """The control: the same setup with no spool loses what the broker drops (so the test above
    can fail)."""
    server = pg_server_factory()
    url = server.create_database()
    count = int(RATE * (BEFORE + DOWN + AFTER))
    published, _ = await _outage(
        small_broker, server, url, tmp_path, spool_bytes=None, count=count, down=DOWN, client_id="gw-nospool"
    )
    acc = _account(
        f"12 no spool: PostgreSQL down {DOWN:.0f} s at {RATE} msg/s, broker queue {QUEUE}", count, published, url
    )
    assert len(published) == count  # the broker acked every publish ...
    assert acc.lost > 0  # ... and dropped some for the gateway's session
    assert acc.duplicated == 0


async def test_full_spool_stops_acking_and_loses_nothing_once_drained(
    mosquitto: MosquittoServer, pg_server_factory: Callable[[], PgServer], tmp_path: Path
) -> None:
    """A 256 KiB spool fills during the outage: ingest stops acking, the broker (a large queue
    here, as the policy needs) holds the rest, and every message is stored once PostgreSQL is back."""
    server = pg_server_factory()
    url = server.create_database()
    count = int(RATE * 20)
    published, fig = await _outage(
        mosquitto, server, url, tmp_path, spool_bytes=1 << 18, count=count, down=15.0, client_id="gw-full"
    )
    acc = _account(
        "13 spool full: PostgreSQL down 15 s at 500 msg/s, 256 KiB spool",
        count,
        published,
        url,
        spooled_max=int(fig["max_rows"]),
        acked_while_down=int(fig["acked_while_down"]),
    )
    assert fig["full_seen"] == 1
    assert fig["acked_while_down"] < RATE * (BEFORE + 15.0)  # acking stopped while full
    assert len(published) == count
    assert acc.lost == 0 and acc.duplicated == 0 and acc.stored == count
