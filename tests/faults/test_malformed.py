"""Scenario 6: 10,000 malformed packets, then one good one [the good one stored within 1 s; no
in-flight slot leaked]."""

from __future__ import annotations

import itertools
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, Reading, gateway_env, readings, stored
from tests.support.mqtt import MosquittoServer, malformed_packets

pytestmark = pytest.mark.slow

COUNT = 10_000


def _rejects(path: str) -> int:
    try:
        conn = sqlite3.connect(path, timeout=30)
        try:
            return int(conn.execute("SELECT count(*) FROM rejects").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


async def test_malformed_flood_then_one_good(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    path = f"{tmp_path}/gw.db"
    db_url = f"sqlite:///{path}"
    gw = Gateway(
        tmp_path / "gw", gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id="gw-malformed")
    )
    kinds = [payload for _reason, payload in malformed_packets()]
    small = [p for p in kinds if len(p) < 65536]
    big = [p for p in kinds if len(p) >= 65536]
    # Every kind of bad packet, the oversized one only a few times (10,000 of them would be 700 MB).
    payloads = list(itertools.islice(itertools.cycle(small), COUNT - 10)) + big * 10
    bad = [Reading(f"bad:{i}", "sensors/bad-dev/data", p) for i, p in enumerate(payloads)]
    good = readings("good-dev", 1, start=1)
    await trio.to_thread.run_sync(gw.start)
    try:
        flood = Publisher(mosquitto.host, mosquitto.port, client_id="pub-malformed")
        await flood.arun(bad, ack_wait=60)
        assert len(flood.acked) == COUNT
        with trio.fail_after(60):
            while await trio.to_thread.run_sync(_rejects, path) < COUNT:
                await trio.sleep(0.1)
        one = Publisher(mosquitto.host, mosquitto.port, client_id="pub-good")
        await one.arun(good, ack_wait=10)
        acked_at = time.monotonic()
        with trio.fail_after(10):
            while good[0].key not in await trio.to_thread.run_sync(stored, db_url):
                await trio.sleep(0.01)
        latency = time.monotonic() - acked_at
        inflight = await trio.to_thread.run_sync(gw.metric, "gateway_mqtt_inflight")
        assert gw.running
    finally:
        await trio.to_thread.run_sync(gw.kill_safely)
    rejects = _rejects(path)
    acc = report(
        account(
            "6 10,000 malformed packets then a good one",
            sent=one.attempted,
            acked=one.acked,
            stored=stored(db_url),
            recovery_s=latency,
            rejects=rejects,
            inflight_after=inflight,
        )
    )
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.stored == 1
    assert rejects == COUNT  # every bad packet stored as a reject, once
    assert inflight == 0, f"{inflight} in-flight slots still taken"
    assert latency <= 1.0, f"the good packet was stored {latency:.2f} s after its PUBACK"
