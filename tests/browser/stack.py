"""A whole gateway for the browser tests: its own mosquitto, ``gateway serve`` on SQLite as a
process, and ``gateway simulate`` feeding it (some packets malformed, so rejects show)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e.harness import GatewayProcess, api_key
from tests.support.mqtt import MosquittoServer


@dataclass
class Stack:
    """Broker, gateway and simulator in ``directory``; ``key`` is a read key for the dashboard."""

    directory: Path
    broker: MosquittoServer = field(init=False)
    gateway: GatewayProcess = field(init=False)
    key: str = field(init=False)
    simulator: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.broker = MosquittoServer(self.directory / "mosquitto")
        self.key, entry = api_key("dash", "read")
        work = self.directory / "gateway"
        work.mkdir(parents=True, exist_ok=True)
        self.gateway = GatewayProcess(
            work,
            {
                "DATABASE_URL": f"sqlite:///{work}/gateway.db",
                "MQTT_URL": self.broker.url,
                "MQTT_CLIENT_ID": f"browser-{self.broker.port}",
                "API_KEYS": entry,
                "LOG_FILE": str(work / "server.log"),
                "PROCESSOR_INTERVAL": "0.2",
            },
        )

    @property
    def url(self) -> str:
        return self.gateway.url

    def start(self, *, devices: int = 4, rate: float = 8.0, invalid_ratio: float = 0.1) -> None:
        """Start the broker, the gateway, then a simulator that runs until :meth:`stop`."""
        self.broker.start()
        self.gateway.start()
        self.simulator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "simulate",
                "--url",
                self.broker.url,
                "--devices",
                str(devices),
                "--rate",
                str(rate),
                "--duration",
                "3600",
                "--invalid-ratio",
                str(invalid_ratio),
                "--device-prefix",
                "sensor-",
                "--seed",
                "7",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "simulate.log", "ab"),  # noqa: SIM115 - the child keeps it
        )

    def wait_stored(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the gateway has stored at least ``count`` readings."""
        deadline = time.monotonic() + timeout
        headers = {"X-API-Key": self.key}
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/api/v1/messages?limit=1", headers=headers, timeout=2.0)
                if r.status_code == 200 and r.json()["total"] >= count:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} readings stored: {self.gateway.log_text()[-2000:]}")

    def stop(self) -> None:
        """Stop everything (simulator, gateway, broker), whatever state each is in."""
        if self.simulator is not None and self.simulator.poll() is None:
            self.simulator.kill()
            self.simulator.wait(10)
        try:
            if self.gateway.proc is not None:
                self.gateway.stop()
        finally:
            self.broker.kill()
