"""Run the whole gateway as a process, as a user or systemd would."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_key(name: str, role: str) -> tuple[str, str]:
    """(key, API_KEYS entry) for tests."""
    key = f"test-{name}-{role}-" + os.urandom(8).hex()
    return key, f"{name}:{role}:{hashlib.sha256(key.encode()).hexdigest()}"


class GatewayProcess:
    """``gateway serve`` in a child process with its own working directory and environment."""

    def __init__(self, workdir: Path, env: dict[str, str], *, env_file: Path | None = None) -> None:
        """``env`` is the configuration; with ``env_file`` it is written to that file and passed as
        ``--env-file`` (the way an operator runs it) instead of through the environment."""
        self.workdir = workdir
        self.port = int(env.get("HTTP_PORT") or free_port())
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DATABASE_", "HTTP_", "API_"))}
        # Short broker sessions: test client ids must not leave queues behind on a shared broker.
        config = {"HTTP_PORT": str(self.port), "MQTT_SESSION_EXPIRY": "60", **env}
        self.args: list[str] = []
        if env_file is None:
            self.env = {**base, **config}
        else:
            env_file.write_text("".join(f"{k}={v}\n" for k, v in config.items()), encoding="utf-8")
            self.env = base
            self.args = ["--env-file", str(env_file)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the process; with ``wait``, return once ``/api/v1/ping`` answers."""
        self.stderr = open(self.workdir / "stderr.log", "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", *self.args],
            cwd=self.workdir,
            env=self.env,
            stdout=self.stderr,
            stderr=self.stderr,
        )
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ping until it answers 200 (or the process dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/api/v1/ping", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("gateway did not become ready: " + self.log_text()[-3000:])

    def signal(self, signum: int) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.wait(timeout)
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.stderr.close()
        return rc

    def log_text(self) -> str:
        """What the process wrote to stdout/stderr."""
        path = self.workdir / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""
