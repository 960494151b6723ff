"""Scenario 2: readings published while the gateway is stopped wait in its broker session, on MQTT 5
and 3.1.1 [lost 0, session present]."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, gateway_env, readings, stored, wait_stored
from tests.support.mqtt import MosquittoServer

pytestmark = pytest.mark.slow

COUNT = 5000


def _sessions(log: str) -> list[bool]:
    """session_present of every connection the gateway logged, in order."""
    return [m == "True" for m in re.findall(r"connected host=\S+ .*?session_present=(\w+)", log)]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_publish_while_gateway_stopped(mosquitto: MosquittoServer, tmp_path: Path, protocol: str) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    name = "v5" if protocol == "5" else "v311"
    env = gateway_env(
        tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id=f"gw-stopped-{name}", MQTT_PROTOCOL=protocol
    )
    gw = Gateway(tmp_path / "gw", env)
    try:
        await trio.to_thread.run_sync(gw.start)  # subscribes: the broker keeps the session from now on
        assert await trio.to_thread.run_sync(gw.stop) == 0
        pub = Publisher(mosquitto.host, mosquitto.port, protocol=protocol, client_id=f"pub-stopped-{name}")
        await pub.arun(readings(f"off-{name}", COUNT, devices=10), ack_wait=30)
        assert len(pub.acked) == COUNT  # the broker took them all with no gateway connected
        t0 = time.monotonic()
        await trio.to_thread.run_sync(gw.start)
        await wait_stored(db_url, pub.acked, limit=60)
        recovery = time.monotonic() - t0
        await trio.sleep(0.5)
    finally:
        await trio.to_thread.run_sync(gw.kill_safely)
    sessions = _sessions(gw.log())
    acc = report(
        account(
            f"2 publish while the gateway is stopped (MQTT {protocol})",
            sent=pub.attempted,
            acked=pub.acked,
            stored=stored(db_url),
            recovery_s=recovery,
            session_present=sessions[-1],
        )
    )
    assert sessions[0] is False and sessions[-1] is True, sessions
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0
    assert acc.stored == COUNT
