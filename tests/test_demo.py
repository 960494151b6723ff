"""``gateway demo``: one command brings up broker, gateway and sensors, and Ctrl-C takes them down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway import demo
from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MQTT_URL": "mqtt://127.0.0.1:1",
        "DATABASE_URL": "postgresql://x@nowhere/x",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _banner(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Read the demo's output up to the line that says how to stop it."""
    assert proc.stdout is not None
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith("Ctrl-C stops everything"):
            return "".join(out)
    proc.kill()
    raise AssertionError("no banner: " + "".join(out))


def test_demo_serves_readings_and_rejects_then_ctrl_c_stops_everything() -> None:
    port = free_port()
    proc = _start("--http-port", str(port), "--rate", "40")
    try:
        text = _banner(proc)
        # The user's own MQTT_URL/DATABASE_URL (unreachable here) did not leak into the demo.
        url = re.search(r"Dashboard\s+(http://127\.0\.0\.1:(\d+)/#key=(\S+))", text)
        assert url is not None, text
        assert int(url.group(2)) == port
        key = url.group(3)
        workdir = Path(re.search(r"files in (\S+),", text).group(1))  # type: ignore[union-attr]
        assert workdir.is_dir()
        api = f"http://127.0.0.1:{port}/api/v1"
        headers = {"X-API-Key": key}
        deadline = time.monotonic() + 30
        readings = rejects = 0
        while time.monotonic() < deadline and not (readings and rejects):
            readings = len(httpx.get(f"{api}/messages?limit=50", headers=headers, timeout=5).json()["items"])
            rejects = len(httpx.get(f"{api}/rejects?limit=50", headers=headers, timeout=5).json()["items"])
            time.sleep(0.5)
        assert readings > 0 and rejects > 0, (readings, rejects)
        # The key is a read key: writing is refused.
        assert httpx.post(f"{api}/packets", headers=headers, json={}, timeout=5).status_code == 403
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=40)
        assert proc.returncode == 0, rest
        assert "stopping the demo" in rest
        assert not workdir.exists()  # the temporary directory is removed
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{api}/ping", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_child_that_dies_ends_the_demo_with_its_log(tmp_path: Path) -> None:
    proc = _start("--workdir", str(tmp_path), "--http-port", str(free_port()))
    try:
        _banner(proc)
        broker = (tmp_path / "mosquitto.conf").exists()
        assert broker, "mosquitto is expected on this machine"
        subprocess.run(["pkill", "-KILL", "-f", f"mosquitto -c {tmp_path}/mosquitto.conf"], check=True)
        rest, _ = proc.communicate(timeout=40)
        assert proc.returncode == 1
        assert "the broker stopped; the demo ends" in rest
        assert (tmp_path / "gateway.log").exists()  # --workdir is kept
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_broker_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.DemoError, match="install mosquitto or amqtt"):
        demo.broker_command("amqtt", tmp_path, 1883)


def test_the_demo_gateway_has_its_own_client_id_and_none_of_the_users_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQTT_CLIENT_ID", "production-gateway")
    monkeypatch.setenv("DATABASE_URL", "postgresql://prod/db")
    env = demo.child_env()
    assert "MQTT_CLIENT_ID" not in env and "DATABASE_URL" not in env
    first = demo.gateway_env(tmp_path, mqtt_port=1, protocol="5", http_port=2, key_entries=["a:read:00"])
    second = demo.gateway_env(tmp_path, mqtt_port=1, protocol="5", http_port=2, key_entries=["a:read:00"])
    ids = [re.search(r"MQTT_CLIENT_ID=(\S+)", e).group(1) for e in (first, second)]  # type: ignore[union-attr]
    assert ids[0] != ids[1] and all(i.startswith("gateway-demo-") for i in ids)
    assert f"sqlite:///{tmp_path}/gateway.db" in first
