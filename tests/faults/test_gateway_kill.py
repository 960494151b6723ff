"""Scenario 1: ``gateway serve`` SIGKILLed in the middle of a 20,000-message burst, on both stores
[lost 0, duplicated 0]."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, acount_stored, gateway_env, readings, stored, wait_stored
from tests.support.mqtt import MosquittoServer

pytestmark = pytest.mark.slow

COUNT = 20_000


async def test_gateway_sigkill_mid_burst(mosquitto: MosquittoServer, tmp_path: Path, db_url: str) -> None:
    backend = db_url.split(":", 1)[0]
    gw = Gateway(
        tmp_path / "gw",
        gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id=f"gw-kill-{backend}"),
    )
    await trio.to_thread.run_sync(gw.start)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-kill")
    batch = readings("kill", COUNT, devices=20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: pub.arun(batch, ack_wait=120))
            # Kill in the middle of the burst: after real commits, well before the last one.
            with trio.fail_after(120):
                while (killed_at := await acount_stored(db_url)) < 3000:
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(gw.kill)
            assert killed_at < COUNT - 2000, "the burst had (almost) finished: the kill was not mid-burst"
            t0 = time.monotonic()
            await trio.to_thread.run_sync(gw.start)
        rows = await wait_stored(db_url, pub.acked, limit=180)
        recovery = time.monotonic() - t0
        await trio.sleep(1.0)  # anything stored twice would show up now
    finally:
        await trio.to_thread.run_sync(gw.kill_safely)
    acc = report(
        account(
            f"1 gateway SIGKILL mid-burst ({backend})",
            sent=pub.attempted,
            acked=pub.acked,
            stored=stored(db_url),
            recovery_s=recovery,
            killed_after=killed_at,
        )
    )
    assert len(rows) >= len(pub.acked)
    assert acc.acked == COUNT
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0
