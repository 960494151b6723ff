"""The sd_notify protocol against real datagram sockets, and the watchdog's timing."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.systemd import Notifier


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_status_watchdog_stopping(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.status("connected, backlog 3\nsecond line")
    assert sock.recv(4096) == b"STATUS=connected, backlog 3 second line"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.extend_timeout(1.5)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"
    n.close()


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    lo = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    hi = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert lo <= int(value) <= hi


def test_abstract_socket() -> None:
    name = f"gateway-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_no_op_outside_systemd() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert not n.ready()
    assert not n.status("x")
    assert not n.stopping()


def test_default_environ_is_os_environ(manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().ready()
    assert sock.recv(4096) == b"READY=1"


def test_send_failure_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="gateway.systemd")
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert n.enabled
    assert not n.ready()
    assert not n.watchdog()
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1  # logged once, not per send
    assert failures[0].levelname == "DEBUG"


def test_unsupported_address_disables() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval == expected


async def test_watchdog_pings_at_half_the_timeout(
    manager: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})  # 10 s: ping every 5 s
    sock.setblocking(False)
    receiver = trio.socket.from_stdlib_socket(sock)
    stamps: list[tuple[float, bytes]] = []
    start = trio.current_time()

    async def listen() -> None:
        while True:
            data = await receiver.recv(4096)
            stamps.append((trio.current_time() - start, data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        await nursery.start(n.run_watchdog)
        await trio.sleep(22)
        nursery.cancel_scope.cancel()
    assert [data for _, data in stamps] == [b"WATCHDOG=1"] * 5
    assert [round(t, 3) for t, _ in stamps] == [0.0, 5.0, 10.0, 15.0, 20.0]


async def test_watchdog_stops_when_the_loop_stops(
    manager: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    """A blocked event loop sends nothing: that is what lets systemd restart a hung gateway.

    The stall is real time (a pinger on a thread would send during it); the rest is virtual."""
    sock, path = manager
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    async with trio.open_nursery() as nursery:
        await nursery.start(n.run_watchdog)
        assert _drain(sock) == ["WATCHDOG=1"]
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: the loop is stuck, no task runs
        assert _drain(sock) == []
        await trio.sleep(0.12)
        assert len(_drain(sock)) >= 1  # progress again: pings resume
        nursery.cancel_scope.cancel()


async def test_watchdog_without_systemd_just_waits(autojump_clock: trio.testing.MockClock) -> None:
    n = Notifier({})
    with trio.move_on_after(1000) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(n.run_watchdog)
    assert scope.cancelled_caught


async def test_status_line_follows_health_and_is_sent_on_change_only(
    manager: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    from gateway.health import Health

    sock, path = manager
    health = Health()
    n = Notifier({"NOTIFY_SOCKET": path})
    async with trio.open_nursery() as nursery:
        await nursery.start(n.run_status, health.summary)
        await trio.sleep(5.5)  # nothing changed: one line, not six
        assert _drain(sock) == ["STATUS=degraded; mqtt starting; db starting; backlog ?"]
        for name in ("mqtt", "database", "processor"):
            health.component(name).set("ok")
        health.component("processor").detail["backlog"] = 3
        await trio.sleep(1.0)
        assert _drain(sock) == ["STATUS=ok; mqtt ok; db ok; backlog 3"]
        nursery.cancel_scope.cancel()
    n.close()
