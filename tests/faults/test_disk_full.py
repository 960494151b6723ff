"""Scenario 10: the disk under the SQLite database fills up (a small tmpfs mounted there) while
readings stream in [nothing acked is lost; ``degraded``; an alert; resumes when space returns].

The built-in ``disk_almost_full`` alert fires once free space stayed under DISK_MIN_FREE for its
hold time (60 s), so the disk stays full a little longer than that. Needs root (``mount``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, SseRecorder, gateway_env, readings, stored, wait_stored
from tests.support.mqtt import MosquittoServer

pytestmark = pytest.mark.slow

SIZE_MB = 64  # room for every reading of the run once the ballast is gone
HOLD = 65.0  # the alert's hold time is 60 s
RATE = 50


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as fh:
        chunk = b"\0" * 65536
        while True:
            try:
                written += fh.write(chunk)
            except OSError:
                break
        small = b"\0" * 512
        with contextlib.suppress(OSError):
            while True:
                written += fh.write(small)
    return written


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A ``SIZE_MB`` tmpfs mounted in tmp_path (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.fail("scenario 10 mounts a tmpfs: run the fault suite as root", pytrace=False)
    mount = tmp_path / "data"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_under_the_database(mosquitto: MosquittoServer, tmp_path: Path, small_disk: Path) -> None:
    mount = small_disk
    db_url = f"sqlite:///{mount}/gw.db"
    gw = Gateway(
        tmp_path / "gw", gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id="gw-diskfull")
    )
    batch = readings("disk", int(RATE * (HOLD + 20)), devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-diskfull")
    ballast = mount / "ballast"
    states: set[str] = set()
    await trio.to_thread.run_sync(gw.start)
    try:
        async with trio.open_nursery() as nursery:
            sse = SseRecorder(gw.url, reconnect=True)
            await nursery.start(sse.run)
            nursery.start_soon(lambda: pub.arun(batch, rate=RATE, ack_wait=90))
            await trio.sleep(3.0)
            await trio.to_thread.run_sync(_fill, ballast)
            full_at = time.monotonic()
            while time.monotonic() - full_at < HOLD:
                states.add((await trio.to_thread.run_sync(gw.ping))["status"])
                assert gw.running, "the gateway exited on a full disk"
                await trio.sleep(1.0)
            alerted = "ALERT disk_almost_full firing" in gw.log()
            ballast.unlink()
            freed = time.monotonic()
            acked_by_then = set(pub.acked)
            await wait_stored(db_url, acked_by_then, limit=60)
            recovery = time.monotonic() - freed
            with trio.fail_after(90):
                while len(pub.attempted) < len(batch):
                    await trio.sleep(0.2)
            await wait_stored(db_url, pub.acked, limit=90)
            with trio.fail_after(30):  # the alert event, kept while the disk was full, is replayed
                while not any(e.type == "alert" for e in sse.events):
                    await trio.sleep(0.2)
            recovered_status = (await trio.to_thread.run_sync(gw.ping))["status"]
            nursery.cancel_scope.cancel()
    finally:
        gw.kill_safely()
        print("\n".join(line[:250] for line in gw.log().splitlines() if " INFO " not in line)[-6000:])
    rows = stored(db_url)
    alerts = [e.data.get("name") or e.data.get("alert") for e in sse.events if e.type == "alert"]
    acc = report(
        account(
            "10 disk full under the database",
            sent=pub.attempted,
            acked=pub.acked,
            stored=rows,
            recovery_s=recovery,
            degraded="degraded" in states,
            alert=alerted,
            alert_events=",".join(map(str, alerts)),
            status_after=recovered_status,
        )
    )
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.acked == len(batch)
    assert "degraded" in states
    assert alerted, "no disk_almost_full alert in the log"
