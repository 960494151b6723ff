"""Scenario 3: the broker restarted gracefully, SIGKILLed, and frozen (SIGSTOP) for 30 s under a
steady stream [gateway-side lost 0; the outage noticed within 1.5x keepalive; reconnected within
5 s of the broker's return].

The ingest path runs in this process (the real bridge, ingest and store, wired as app.py wires
them) so the test sees exactly which messages the gateway acknowledged: "gateway-side lost" counts
those that are not stored. A SIGKILLed broker may itself lose what it had acknowledged to the
publisher but not yet saved (mosquitto autosaves every second): that shows as ``lost`` in the
line and is named ``broker_lost``; it is the broker's loss, not the gateway's. ``noticed_s`` runs
from the last data the gateway received (it may still read for a moment what the broker sent before
the signal; ``from_signal_s`` includes that).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import trio

from gateway.settings import IngestSettings, MqttSettings
from gateway.store import open_store
from tests.faults.accounting import account, report
from tests.faults.harness import Publisher, key_of, readings, settled, stored
from tests.support.mqtt import MosquittoServer, eventually, pipeline
from tests.support.pg import db_settings

pytestmark = pytest.mark.slow

KEEPALIVE = 5
RATE = 400


def _key(payload: bytes) -> str:
    import json

    body = json.loads(payload)
    return key_of(body["device_id"], body.get("seq"))


@pytest.mark.parametrize(("how", "outage"), [("restart", 1.0), ("kill", 1.0), ("sigstop", 30.0)])
async def test_broker_outage_mid_stream(mosquitto: MosquittoServer, tmp_path: Path, how: str, outage: float) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    mqtt = MqttSettings(
        url=mosquitto.url,
        client_id=f"gw-broker-{how}",
        keepalive=KEEPALIVE,
        connect_timeout=2.0,
        reconnect_min=0.05,
        reconnect_max=1.0,
    )
    batch = readings(f"bk-{how}", int(RATE * (outage + 14)), devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id=f"pub-broker-{how}", keepalive=KEEPALIVE)
    assert mosquitto.proc is not None
    async with open_store(db_settings(db_url)) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()) as p:
            nursery.start_soon(lambda: pub.arun(batch, rate=RATE, ack_wait=60))
            await eventually(lambda: p.ingest.committed >= RATE * 3, 30)
            t0 = time.monotonic()
            if how == "sigstop":
                mosquitto.proc.send_signal(signal.SIGSTOP)
            else:
                await trio.to_thread.run_sync(mosquitto.kill if how == "kill" else mosquitto.stop)
            try:
                # The outage starts, for the gateway, with the last bytes it gets (it may still be
                # reading what the broker sent before the signal): track when commits last moved.
                last = [p.ingest.committed, time.monotonic()]
                with trio.fail_after(KEEPALIVE * 3):
                    while p.bridge.connected:
                        await trio.sleep(0.02)
                        if p.ingest.committed != last[0]:
                            last = [p.ingest.committed, time.monotonic()]
                lost_at = time.monotonic()
                noticed, from_signal = lost_at - max(t0, last[1]), lost_at - t0
                assert p.health.component("mqtt").state == "degraded"
                await trio.sleep(max(0.0, t0 + outage - time.monotonic()))
            finally:
                if how == "sigstop":
                    mosquitto.proc.send_signal(signal.SIGCONT)
            t1 = time.monotonic()
            if how != "sigstop":
                await trio.to_thread.run_sync(mosquitto.start)
            await eventually(lambda: p.bridge.connected, 30)
            reconnected = time.monotonic() - t1
            await eventually(
                lambda: (
                    len(pub.attempted) == len(batch)
                    and len(pub.acked) + len(pub.refused) >= len(batch) - (0 if how != "kill" else len(batch))
                ),
                90,
            )
            # Everything the broker still holds arrives; then nothing moves any more.
            await settled(lambda: p.ingest.committed, quiet=2.0, limit=90)
            gateway_acked = {_key(m.payload) for m in p.acked}
            recovery = time.monotonic() - t1
        nursery.cancel_scope.cancel()
    rows = stored(db_url)
    gateway_lost = len(gateway_acked - set(rows))
    acc = report(
        account(
            f"3 broker {how} ({outage:.0f} s) mid-stream",
            sent=pub.attempted,
            acked=pub.acked,
            stored=rows,
            recovery_s=recovery,
            noticed_s=round(noticed, 2),
            from_signal_s=round(from_signal, 2),
            reconnected_s=round(reconnected, 2),
            gateway_lost=gateway_lost,
            broker_lost=len(pub.acked - set(rows)),
        )
    )
    assert gateway_lost == 0 and acc.duplicated == 0 and acc.unexpected == 0
    assert p.bridge.reconnects >= 1
    assert noticed <= 1.5 * KEEPALIVE, f"outage noticed {noticed:.1f} s after the last data (keepalive {KEEPALIVE} s)"
    assert reconnected <= 5.0, f"reconnected {reconnected:.1f} s after the broker was back"
    if how != "kill":
        assert acc.lost == 0 and acc.acked == len(batch)
