"""Scenario 9: a hung event loop, through a test-only hook [the systemd watchdog notices; restarted].

systemd cannot run here, so the test is the service manager: it listens on ``NOTIFY_SOCKET``, sets
``WATCHDOG_USEC``, and does what systemd does for ``WatchdogSec=`` with ``Restart=on-failure``: when
no ``WATCHDOG=1`` came within ``WATCHDOG_USEC`` it sends SIGABRT (SIGKILL if that does not end it) and
starts the service again. Readings published around the hang are all stored.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest
import trio

from gateway import testhooks
from tests.faults.accounting import account, report
from tests.faults.harness import Gateway, Publisher, gateway_env, readings, stored, wait_stored
from tests.support.mqtt import MosquittoServer

pytestmark = pytest.mark.slow

WATCHDOG_S = 2.0


def test_hang_hook_needs_both_variables(tmp_path: Path) -> None:
    trigger = tmp_path / "hang"
    trigger.touch()
    assert testhooks.hang_file({"GATEWAY_TEST_HANG_FILE": str(trigger)}) is None
    assert testhooks.hang_file({"GATEWAY_TEST_HOOKS": "1", "GATEWAY_TEST_HANG_FILE": str(trigger)}) is None
    armed = {"GATEWAY_TEST_HOOKS": testhooks.ARMED, "GATEWAY_TEST_HANG_FILE": str(trigger)}
    assert testhooks.hang_file(armed) == trigger
    testhooks.maybe_hang(None)  # returns at once
    testhooks.maybe_hang(tmp_path / "absent")


class _Manager:
    """The service manager's side of sd_notify: records every datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path
        self.messages: list[tuple[float, str]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(str(self.path))
        task_status.started()
        while True:
            data = await self.sock.recv(4096)
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def last(self, line: str) -> float | None:
        times = [t for t, m in self.messages if m == line]
        return times[-1] if times else None


async def test_hung_event_loop_is_noticed_and_restarted(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    trigger = tmp_path / "hang-now"
    manager = _Manager(tmp_path / "notify.sock")
    environ = {
        "NOTIFY_SOCKET": str(manager.path),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
        "GATEWAY_TEST_HOOKS": testhooks.ARMED,
        "GATEWAY_TEST_HANG_FILE": str(trigger),
    }
    gw = Gateway(
        tmp_path / "gw",
        gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id="gw-watchdog"),
        environ=environ,
    )
    batch = readings("watchdog", 3000, devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-watchdog")
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await trio.to_thread.run_sync(gw.start)
        try:
            assert gw.proc is not None
            with trio.fail_after(10):
                while manager.last("READY=1") is None or manager.last("WATCHDOG=1") is None:
                    await trio.sleep(0.05)
            first_pid = gw.proc.pid
            nursery.start_soon(lambda: pub.arun(batch, rate=300, ack_wait=60))
            await trio.sleep(2.0)
            trigger.touch()
            hung_at = time.monotonic()
            # The manager's watchdog: no WATCHDOG=1 for WATCHDOG_USEC means the service is hung.
            with trio.fail_after(30):
                while time.monotonic() - (manager.last("WATCHDOG=1") or 0.0) < WATCHDOG_S:
                    await trio.sleep(0.05)
            noticed = time.monotonic() - hung_at
            assert gw.running  # hung, not dead: only the watchdog can tell
            gw.signal(signal.SIGABRT)
            try:
                await trio.to_thread.run_sync(gw.wait, 5.0)
            except Exception:
                await trio.to_thread.run_sync(gw.kill)
            trigger.unlink()
            restarted_at = time.monotonic()
            await trio.to_thread.run_sync(gw.start)
            with trio.fail_after(30):
                while (manager.last("READY=1") or 0.0) < restarted_at:
                    await trio.sleep(0.05)
            ready = time.monotonic() - restarted_at
            with trio.fail_after(60):
                while len(pub.attempted) < len(batch):
                    await trio.sleep(0.1)
            await wait_stored(db_url, pub.acked, limit=60)
            recovery = time.monotonic() - hung_at
            assert gw.proc.pid != first_pid
            await trio.sleep(0.5)
        finally:
            gw.kill_safely()
            nursery.cancel_scope.cancel()
    acc = report(
        account(
            "9 hung event loop, watchdog restart",
            sent=pub.attempted,
            acked=pub.acked,
            stored=stored(db_url),
            recovery_s=recovery,
            noticed_s=round(noticed, 2),
            watchdog_s=WATCHDOG_S,
            ready_after_restart_s=round(ready, 2),
        )
    )
    assert noticed <= WATCHDOG_S + 1.5  # the last ping came at most one interval (half) before the hang
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.acked == len(batch)
