"""Pieces every scenario uses: throwaway broker and database, the gateway as a process, load, stats.

Each scenario owns its instances: a mosquitto and (when it needs one) a PostgreSQL cluster on free
ports in a temp directory, and ``gateway serve`` started exactly as an operator would start it (an
env file, ``NOTIFY_SOCKET`` pointing at a datagram socket we own so we see ``READY=1``).
Nothing here pins an absolute time: results are rates, percentiles and ratios of one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class BenchFailed(Exception):
    """The measurement itself could not be made (a process did not start, nothing arrived)."""


@dataclass
class Options:
    """Run-wide options: ``quick`` shrinks volumes and durations."""

    quick: bool = False
    profile: bool = False
    instances: int | None = None  # pipeline: also run this many gateways on one PostgreSQL (None: 2 full, 1 quick)
    burst: int | None = None  # pipeline: messages per burst (None: 20,000 full, 5,000 quick)
    rate: float | None = None  # pipeline: the paced run's msg/s (None: 1,000 full, none quick; 0: none)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchFailed(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchFailed(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A temp directory for one scenario, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Broker and database


class Mosquitto:
    """A private mosquitto on a free port. Queues are deep so a slow QoS 1 consumer loses nothing."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "mosquitto"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # The default (1000) silently drops messages queued for a slow QoS 1 subscriber.
            "max_queued_messages 10000000\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 1000\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\n"
        )
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class Postgres:
    """A private PostgreSQL 15 cluster (initdb + pg_ctl as the postgres user) on a free port."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory / "pg"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/bench"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> Postgres:
        self.dir.mkdir(parents=True)
        shutil.chown(self.dir, "postgres", "postgres")
        # Its parents inside the temp dir (mkdtemp makes them 0700) must be traversable by postgres.
        tmp = Path(tempfile.gettempdir()).resolve()
        parent = self.dir.parent.resolve()
        while parent != tmp and tmp in parent.parents:
            os.chmod(parent, os.stat(parent).st_mode | 0o055)
            parent = parent.parent
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.dir),
            "-o",
            opts,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        self._as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "bench")
        return self

    def stop(self) -> None:
        if (self.dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# The gateway as a process


def api_key(name: str = "bench", role: str = "admin") -> tuple[str, str]:
    """A fresh key and its ``API_KEYS`` entry (``name:role:sha256hex``)."""
    key = "bench-" + secrets.token_urlsafe(24)
    return key, f"{name}:{role}:{hashlib.sha256(key.encode()).hexdigest()}"


class Gateway:
    """``gateway serve --env-file FILE`` in its own directory, with READY seen through NOTIFY_SOCKET."""

    def __init__(self, directory: Path, *, database_url: str, mqtt_url: str, **extra: str) -> None:
        self.dir = directory / "gateway"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key, entry = api_key()
        self.client_id = "bench-gw-" + secrets.token_hex(4)
        self.env = {
            "DATABASE_URL": database_url,
            "MQTT_URL": mqtt_url,
            "MQTT_CLIENT_ID": self.client_id,
            "MQTT_SUBSCRIBE_TOPIC": "sensors/+/data",
            "MQTT_PUBLISH_TOPIC": "gateway/events",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.port),
            "API_KEYS": entry,
            # The benchmarks are the only clients; the default 600/minute would throttle them.
            "RATE_LIMIT": "100000000/second",
            "LOG_FILE": str(self.dir / "gateway.log"),
            "LOG_LEVEL": "INFO",
            **extra,
        }
        self.env_file = self.dir / "gateway.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        self.ping_seconds: float | None = None
        self.headers = {"X-API-Key": self.key}

    def start(self, timeout: float = 60.0) -> Gateway:
        """Start and wait for READY=1 (time kept in ``ready_seconds``) and a 200 from ping."""
        notify_path = self.dir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DATABASE_", "HTTP_", "API_"))}
        env["NOTIFY_SOCKET"] = str(notify_path)
        # The gateway of this checkout, not whatever the venv's editable install points at (a
        # worktree's bench would otherwise measure another tree's gateway).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.stderr = open(self.dir / "stderr.log", "ab")  # noqa: SIM115 - closed in stop()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [PY, "-m", "gateway", "serve", "--env-file", str(self.env_file)],
            cwd=self.dir,
            env=env,
            stdout=self.stderr,
            stderr=self.stderr,
        )
        deadline = t0 + timeout
        try:
            while self.ready_seconds is None:
                if self.proc.poll() is not None:
                    raise BenchFailed(f"gateway exited with {self.proc.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchFailed(f"gateway not READY after {timeout} s: {self.log_tail()}")
                notify.settimeout(0.2)
                try:
                    data = notify.recv(4096)
                except TimeoutError:
                    continue
                if b"READY=1" in data.split(b"\n"):
                    self.ready_seconds = time.monotonic() - t0
        finally:
            notify.close()
        while True:
            try:
                if httpx.get(self.url + "/api/v1/ping", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchFailed(f"gateway ping never answered 200: {self.log_tail()}")
            time.sleep(0.05)
        self.ping_seconds = time.monotonic() - t0
        return self

    def rss_kib(self) -> int:
        """Resident memory of the gateway process in KiB (0 once it has exited)."""
        if self.proc is None:
            return 0
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) if m else 0

    def log_tail(self, n: int = 3000) -> str:
        out = []
        for name in ("stderr.log", "gateway.log"):
            path = self.dir / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-n:])
        return "\n".join(out)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


async def scrape(client: httpx.AsyncClient, gw: Gateway) -> dict[str, float]:
    """The gateway's Prometheus metrics as ``{name{labels}: value}`` (samples summed over labels too)."""
    resp = await client.get(gw.url + "/metrics", headers=gw.headers, timeout=10.0)
    resp.raise_for_status()
    out: dict[str, float] = {}
    for line in resp.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[name_labels] = v
        base = name_labels.split("{", 1)[0]
        if "{" in name_labels:
            out[base] = out.get(base, 0.0) + v
    return out


# --------------------------------------------------------------------------------------------------
# Load


async def run_simulator(
    url: str,
    *,
    rate: float,
    duration: float,
    devices: int = 100,
    processes: int = 1,
    qos: int = 1,
    record: Path | None = None,
    invalid_ratio: float = 0.0,
    protocol: str = "5",
    seed: int = 1,
    device_prefix: str | None = None,
) -> dict[str, Any]:
    """Run ``python -m gateway.simulate`` (the product's own simulator) and return its JSON summary.

    Every run gets fresh device ids (a random prefix) unless told otherwise, so a gateway that
    already stored earlier runs never sees a (device_id, seq) twice and drops it as a duplicate.
    """
    prefix = device_prefix if device_prefix is not None else f"sim{secrets.token_hex(3)}-"
    cmd = [
        PY,
        "-m",
        "gateway.simulate",
        "--device-prefix",
        prefix,
        "--url",
        url,
        "--devices",
        str(devices),
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--processes",
        str(processes),
        "--qos",
        str(qos),
        "--json",
        "--invalid-ratio",
        str(invalid_ratio),
        "--protocol",
        protocol,
        "--seed",
        str(seed),
        "--drain-timeout",
        "30",
    ]
    if record is not None:
        cmd += ["--record", str(record)]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise BenchFailed(f"simulator failed ({result.returncode}): {result.stderr.decode()[-2000:]}")
    summary: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return summary


def read_record(path: Path) -> dict[tuple[str, int], int]:
    """The simulator's ``--record`` file: (device_id, seq) → publish time (ns since the epoch)."""
    out: dict[tuple[str, int], int] = {}
    with path.open() as fh:
        for line in fh:
            dev, seq, t = line.split()
            out[(dev, int(seq))] = int(t)
    return out


def find_key(obj: Any) -> tuple[str, int] | None:
    """(device_id, seq) found anywhere in a decoded event/packet (the event format may nest them)."""
    if isinstance(obj, dict):
        dev, seq = obj.get("device_id"), obj.get("seq")
        if isinstance(dev, str) and isinstance(seq, int):
            return dev, seq
        for value in obj.values():
            found = find_key(value)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = find_key(value)
            if found is not None:
                return found
    return None


# --------------------------------------------------------------------------------------------------
# Numbers and output


def pct(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (0-100), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(p / 100 * len(ordered)))) - 1]


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99 and max of ``values``."""
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": pct(ordered, 50),
        "p95": pct(ordered, 95),
        "p99": pct(ordered, 99),
        "max": ordered[-1] if ordered else None,
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: Sequence[int] = (0,)) -> str:
    """A plain text table; the columns numbered in ``left`` are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title, "-" * len(title)]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Result:
    """What a scenario hands back: its tables (printed) and its data (written as JSON)."""

    scenario: str
    tables: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def write(self, quick: bool) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.scenario}.json"
        payload = {
            "scenario": self.scenario,
            "quick": quick,
            "machine": machine(),
            **self.data,
            "tables": self.tables,
        }
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        return path


def machine() -> dict[str, Any]:
    """Enough about the host to compare runs: cores, load at the start, Python."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "unix_time": int(time.time()),
    }
