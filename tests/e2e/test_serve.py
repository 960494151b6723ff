"""The gateway as a process: start on defaults, readiness, logs, graceful stop, systemd notify."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.e2e.harness import GatewayProcess, api_key, free_port


def test_serve_on_defaults_logs_ready_and_stops_cleanly(tmp_path: Path) -> None:
    key, entry = api_key("ops", "admin")
    gw = GatewayProcess(tmp_path, {"API_KEYS": entry, "MQTT_CLIENT_ID": f"e2e-{tmp_path.name}"})
    gw.start()
    try:
        ping = httpx.get(gw.url + "/api/v1/ping", headers={"X-API-Key": key}, timeout=5).json()
        assert ping["status"] in ("ok", "degraded")
        assert "database" in ping["components"]
    finally:
        t0 = time.monotonic()
        rc = gw.stop()
    assert rc == 0, gw.log_text()[-2000:]
    assert time.monotonic() - t0 < 10, "graceful stop is bounded"
    log = (tmp_path / "logs" / "server.log").read_text()
    assert "gateway ready" in log and "gateway stopped" in log
    assert (tmp_path / "data" / "gateway.db").exists()
    status = subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", "--status"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "applied" in status.stdout and "pending" not in status.stdout


def test_sigint_stops_like_ctrl_c(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, {"MQTT_CLIENT_ID": f"e2e-int-{tmp_path.name}"})
    gw.start()
    gw.signal(signal.SIGINT)
    assert gw.wait(20) == 0


def test_systemd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    gw = GatewayProcess(
        tmp_path,
        {
            "NOTIFY_SOCKET": str(sock_path),
            "WATCHDOG_USEC": "400000",
            "MQTT_CLIENT_ID": f"e2e-sd-{tmp_path.name}",
        },
    )
    gw.start(wait=False)
    received: list[str] = []

    def drain(until: float) -> None:
        while time.monotonic() < until:
            try:
                received.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                pass

    try:
        deadline = time.monotonic() + 30
        while "READY=1" not in received and time.monotonic() < deadline:
            drain(time.monotonic() + 0.2)
        assert "READY=1" in received, gw.log_text()[-2000:]
        drain(time.monotonic() + 1.5)
        assert received.count("WATCHDOG=1") >= 3, received
        assert any(line.startswith("STATUS=") for line in received)
    finally:
        rc = gw.stop()
        drain(time.monotonic() + 0.5)
        sock.close()
    assert rc == 0
    assert "STOPPING=1" in received


def test_invalid_rules_file_refuses_to_start(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "hot"\nwhen = { field = "measurements.t", op = "~~", value = 1 }\n')
    res = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "RULES_FILE": str(rules), "HTTP_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "hot" in res.stderr
