"""MQTT test support: throwaway mosquitto brokers, packet makers and a QoS 1 publisher.

Fixtures: ``mosquitto`` (plain listener), ``mosquitto_tls`` (TLS listener with a trustme CA),
``mosquitto_mtls`` (TLS, client certificate required). Each is a :class:`MosquittoServer` on a free
port with persistence in its own temp dir, so ``stop()``/``kill()`` + ``start()`` keeps sessions
(``kill`` loses what was not autosaved: ``autosave_interval`` is 1 s).

Publisher: :func:`publish` (in-process, blocking: call it via ``trio.to_thread.run_sync``) and
:func:`publish_subprocess` (``python -m tests.support.mqtt --port P --count N ...``; JSON result).
Ingest path: :func:`pipeline` (in-process bridge → ingest → store) and :func:`pipeline_subprocess`
(``python -m tests.support.mqtt pipeline ...``, to SIGKILL). :func:`stored_keys` reads what is stored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TlsFiles:
    """PEM files made by trustme: the CA, the broker's cert/key and a client cert/key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verifying against it must fail

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("localhost", "127.0.0.1")
        client = ca.issue_cert("gateway-client")
        files = cls(
            ca=directory / "ca.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            other_ca=directory / "other-ca.pem",
        )
        ca.cert_pem.write_to_path(str(files.ca))
        server.private_key_pem.write_to_path(str(files.server_key))
        with files.server_cert.open("wb") as fh:
            for pem in server.cert_chain_pems:
                fh.write(pem.bytes())
        client.private_key_pem.write_to_path(str(files.client_key))
        with files.client_cert.open("wb") as fh:
            for pem in client.cert_chain_pems:
                fh.write(pem.bytes())
        trustme.CA().cert_pem.write_to_path(str(files.other_ca))
        return files


@dataclass
class MosquittoServer:
    """A mosquitto 2 broker of our own: ``start()``, ``stop()`` (SIGTERM, saves), ``kill()`` (SIGKILL).

    ``max_queued_messages`` is raised to 1,000,000: the default 1000 silently drops messages
    for a slow QoS 1 subscriber during bursts.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    require_certificate: bool = False
    extra_config: str = ""
    autosave_interval: int = 1  # seconds; mosquitto rewrites its whole DB each time (slow under load)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "localhost" if self.tls else "127.0.0.1"

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}" if self.tls else f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.directory / "mosquitto.log"

    def config(self) -> str:
        lines = [
            "user root",
            "persistence true",
            f"persistence_location {self.directory}/",
            f"autosave_interval {self.autosave_interval}",
            "max_queued_messages 1000000",
            "max_inflight_messages 1000",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
        ]
        if self.tls:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "tls_version tlsv1.2",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the broker on the same port; returns when it accepts connections."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(self.config())
        cmd = ["mosquitto", "-c", str(conf)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err} {self._log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM and wait: mosquitto saves its persistence file on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: whatever was not autosaved is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text()[-2000:]
        except OSError:
            return ""


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A fresh broker (plain TCP) on a free port; stopped after the test."""
    server = MosquittoServer(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def mqtt_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """One trustme CA with server and client certificates for the session."""
    return TlsFiles.create(tmp_path_factory.mktemp("mqtt-tls"))


@pytest.fixture
def mosquitto_tls(tmp_path: Path, mqtt_tls_files: TlsFiles) -> Iterator[MosquittoServer]:
    """A broker with a TLS listener (``server.url`` is ``mqtts://localhost:PORT``)."""
    server = MosquittoServer(tmp_path / "mosquitto-tls", tls=mqtt_tls_files)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def mosquitto_mtls(tmp_path: Path, mqtt_tls_files: TlsFiles) -> Iterator[MosquittoServer]:
    """A TLS broker that requires a client certificate signed by the same CA."""
    server = MosquittoServer(tmp_path / "mosquitto-mtls", tls=mqtt_tls_files, require_certificate=True)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0, poll: float = 0.01) -> None:
    """Wait until ``predicate()`` is true; fails the test after ``seconds``."""
    import trio

    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(poll)


# ------------------------------------------------------------------------------------- packets


def packet(device: str, seq: int | None, *, temperature: float = 21.5, ts: float | None = None) -> bytes:
    """A valid sensor packet as the firmware would publish it."""
    body: dict[str, Any] = {
        "device_id": device,
        "timestamp": ts if ts is not None else 1_790_000_000 + (seq or 0) / 1000,
        "measurements": {"temperature": temperature, "humidity": 40.0},
        "status": "ok",
        "battery": 87,
    }
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body, separators=(",", ":")).encode()


def malformed_packets() -> list[tuple[str, bytes]]:
    """(expected reason, payload) for many kinds of bad packet."""
    good = json.loads(packet("bad-dev", 1))

    def variant(**changes: Any) -> bytes:
        body = dict(good)
        for k, v in changes.items():
            if v is _DROP:
                body.pop(k, None)
            else:
                body[k] = v
        return json.dumps(body).encode()

    return [
        ("bad_json", b"{not json"),
        ("bad_json", b""),
        ("bad_json", b'{"device_id": "x", "value": NaN}'),
        ("bad_encoding", b'{"device_id": "\xff\xfe"}'),
        ("not_an_object", b"[1, 2, 3]"),
        ("not_an_object", b"42"),
        ("schema", variant(timestamp="2026-11-27T09:00:00")),  # naive time
        ("schema", variant(timestamp="yesterday")),
        ("schema", variant(device_id="has space")),
        ("schema", variant(device_id="")),
        ("schema", variant(measurements={})),
        ("schema", variant(measurements={"t": "hot"})),
        ("schema", variant(measurements={"t": True})),
        ("schema", variant(status="fine")),
        ("schema", variant(battery=101)),
        ("schema", variant(seq=-1)),
        ("schema", variant(extra_field=1)),
        ("schema", variant(device_id=_DROP)),
        ("schema", variant(measurements=_DROP)),
        ("too_large", variant(pad="x" * 70_000)),
    ]


_DROP = object()


# ----------------------------------------------------------------------------------- publisher


@dataclass
class PublishResult:
    """Which of the payloads (by index) got a PUBACK, and how long publishing took."""

    acked: set[int]
    seconds: float

    @property
    def count(self) -> int:
        return len(self.acked)


def publish(
    host: str,
    port: int,
    payloads: Sequence[bytes],
    *,
    topic: str = "sensors/dev/data",
    topics: Sequence[str] | None = None,
    qos: int = 1,
    ca_file: Path | None = None,
    client_id: str = "",
    timeout: float = 60.0,
    rate: float | None = None,
) -> PublishResult:
    """Publish every payload (QoS 1 by default) and wait for the PUBACKs. Blocking, one thread.

    ``rate`` limits messages per second (a "stream"); ``topics`` gives one topic per payload.
    When the broker goes away the client reconnects and paho re-sends what was unacknowledged.
    Returns the indices the broker acknowledged (within ``timeout`` seconds of the last publish).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(1000)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    acked: set[int] = set()
    by_mid: dict[int, int] = {}
    ok = MQTTErrorCode.MQTT_ERR_SUCCESS

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        idx = by_mid.pop(mid, None)
        if idx is not None:
            acked.add(idx)

    client.on_publish = on_publish

    def pump(wait: float) -> None:
        # loop() runs callbacks in this thread; on a lost connection, reconnect (paho re-sends).
        if client.loop(wait) != ok:
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                client.reconnect()

    started = time.monotonic()
    client.connect(host, port, keepalive=10)
    for i, data in enumerate(payloads):
        if rate is not None:
            while (delay := started + i / rate - time.monotonic()) > 0:
                pump(min(delay, 0.01))
        info = client.publish(topics[i] if topics else topic, data, qos=qos)
        if qos == 0:
            acked.add(i)
        else:
            by_mid[info.mid] = i
        if i % 64 == 0:
            pump(0)
    deadline = time.monotonic() + timeout
    while by_mid and time.monotonic() < deadline:
        pump(0.01)
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.1)
    return PublishResult(set(acked), time.monotonic() - started)


def publish_subprocess(
    port: int,
    count: int,
    *,
    device: str = "dev",
    start: int = 0,
    rate: float | None = None,
    timeout: float = 120.0,
) -> subprocess.Popen[bytes]:
    """Start ``python -m tests.support.mqtt`` publishing ``count`` packets (seq start..start+count-1).

    Its stdout is one JSON line ``{"acked": [seq, ...], "seconds": s}``; read it with
    :func:`publisher_result`.
    """
    args = [
        sys.executable,
        "-m",
        "tests.support.mqtt",
        "--port",
        str(port),
        "--count",
        str(count),
        "--device",
        device,
        "--start",
        str(start),
        "--timeout",
        str(timeout),
    ]
    if rate is not None:
        args += ["--rate", str(rate)]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen(args, stdout=subprocess.PIPE, cwd=root, env=env)


def publisher_result(proc: subprocess.Popen[bytes], timeout: float = 180.0) -> PublishResult:
    """Wait for a publisher process and parse its result."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"publisher exited with {proc.returncode}"
    data = json.loads(out.decode().strip().splitlines()[-1])
    return PublishResult(set(data["acked"]), float(data["seconds"]))


# ------------------------------------------------------------------------------------ pipeline


@dataclass
class Pipeline:
    """A running MqttBridge + Ingest on one store; ``acked`` records every message ingest acked."""

    bridge: Any
    ingest: Any
    health: Any
    acked: list[Any]


@asynccontextmanager
async def pipeline(mqtt: Any, store: Any, ingest: Any = None, spool: Any = None) -> AsyncIterator[Pipeline]:
    """Run the ingest path (bridge → channel → ingest → store) in a nursery, as app.py wires it
    (with ``spool``, a :class:`gateway.spool.Spool`, ingest spools during long outages)."""
    import trio

    from gateway.health import Health
    from gateway.ingest import Ingest
    from gateway.mqtt import Inbound, MqttBridge
    from gateway.settings import IngestSettings

    settings = ingest or IngestSettings()
    health = Health()
    bridge = MqttBridge(mqtt, health.component("mqtt"))
    acked: list[Inbound] = []

    def ack(messages: Sequence[Inbound]) -> None:
        acked.extend(messages)
        bridge.ack(messages)

    ing = Ingest(settings, store, ack, lambda: None, health.component("ingest"), spool=spool)
    send, recv = trio.open_memory_channel[list[Inbound]](settings.channel_size)
    async with trio.open_nursery() as nursery:
        await nursery.start(ing.run, recv)
        await nursery.start(bridge.run, send)
        yield Pipeline(bridge, ing, health, acked)
        nursery.cancel_scope.cancel()


def stored_keys(db_url: str) -> list[tuple[str, int | None]]:
    """Every (device_id, seq) in ``messages``, read with plain SQL (sqlite3 or psql)."""
    if db_url.startswith("sqlite:///"):
        import sqlite3

        conn = sqlite3.connect(db_url[len("sqlite:///") :], timeout=30)
        try:
            return [(d, s) for d, s in conn.execute("SELECT device_id, seq FROM messages")]
        finally:
            conn.close()
    from tests.support.pg import psql

    out = psql(db_url, "SELECT device_id || ' ' || coalesce(seq::text, '') FROM messages")
    keys: list[tuple[str, int | None]] = []
    for line in out.splitlines():
        if line.strip():
            dev, _, seq = line.partition(" ")
            keys.append((dev, int(seq) if seq else None))
    return keys


async def _serve_pipeline(mqtt_url: str, db_url: str, client_id: str) -> None:
    import trio

    from gateway.settings import DatabaseSettings, IngestSettings, MqttSettings
    from gateway.store import open_store

    mqtt = MqttSettings(url=mqtt_url, client_id=client_id, reconnect_min=0.05, reconnect_max=0.5)
    db = DatabaseSettings.model_validate({"DATABASE_URL": db_url})
    async with open_store(db) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with pipeline(mqtt, store, IngestSettings()):
            print("ready", flush=True)
            await trio.sleep_forever()


def pipeline_subprocess(mqtt_url: str, db_url: str, client_id: str = "gw-proc") -> subprocess.Popen[bytes]:
    """The ingest path as its own process (``python -m tests.support.mqtt pipeline``), to SIGKILL.

    Returns once it printed ``ready`` (connected and subscribed).
    """
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    args = [sys.executable, "-m", "tests.support.mqtt", "pipeline", "--mqtt-url", mqtt_url]
    args += ["--db-url", db_url, "--client-id", client_id]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, cwd=root, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"ready", f"pipeline process did not start: {line!r}"
    return proc


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish QoS 1 sensor packets; print which were acked")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--device", default="dev")
    parser.add_argument("--devices", type=int, default=1, help="spread over this many devices (dev-N)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pipeline"]:
        pp = argparse.ArgumentParser(description="Run bridge + ingest + store until killed")
        pp.add_argument("--mqtt-url", required=True)
        pp.add_argument("--db-url", required=True)
        pp.add_argument("--client-id", default="gw-proc")
        pargs = pp.parse_args(argv[1:])
        import trio

        trio.run(_serve_pipeline, pargs.mqtt_url, pargs.db_url, pargs.client_id)
        return 0
    args = parser.parse_args(argv)
    seqs = range(args.start, args.start + args.count)
    devs = [f"{args.device}-{s % args.devices}" if args.devices > 1 else args.device for s in seqs]
    payloads = [packet(d, s) for d, s in zip(devs, seqs, strict=True)]
    topics = [f"sensors/{d}/data" for d in devs]
    result = publish(args.host, args.port, payloads, topics=topics, rate=args.rate, timeout=args.timeout)
    print(json.dumps({"acked": sorted(args.start + i for i in result.acked), "seconds": result.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
