"""The fault harness: a publisher that records every PUBACK, real ``gateway serve`` processes, and
what the store holds, all by key (``device_id:seq``) for :mod:`tests.faults.accounting`.

- :func:`readings` makes the packets a scenario sends (:class:`Reading`: key, topic, payload).
- :class:`Publisher` publishes them at QoS 1 (MQTT 5 or 3.1.1) and records ``attempted`` and
  ``acked`` keys; it reconnects by itself (paho re-sends what was not acknowledged). Blocking: run
  it in a thread (:meth:`Publisher.arun` does that from Trio).
- :class:`Gateway` is ``gateway serve --env-file FILE`` in its own directory (built on
  :class:`tests.e2e.harness.GatewayProcess`), with test-friendly defaults (:func:`gateway_env`).
- :func:`stored` lists the stored keys of either store (one entry per row); :func:`settled`
  waits until a count stops moving.
- :class:`RawMqtt` speaks MQTT 3.1.1 over a plain socket, for what paho will not send
  (a chosen packet id, the DUP flag).

The TCP fault proxy lives in :mod:`tests.faults.proxy`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import httpx
import trio

from tests.e2e.harness import GatewayProcess, api_key, free_port
from tests.support.mqtt import packet, stored_keys

Protocol = Literal["5", "3.1.1"]


class Reading(NamedTuple):
    """One packet to publish: its accounting key, topic and payload."""

    key: str
    topic: str
    payload: bytes


def readings(device: str, count: int, *, start: int = 0, devices: int = 1) -> list[Reading]:
    """``count`` valid packets with seq ``start``.. spread over ``devices`` devices (``device-N``)."""
    out = []
    for seq in range(start, start + count):
        dev = f"{device}-{seq % devices}" if devices > 1 else device
        out.append(Reading(f"{dev}:{seq}", f"sensors/{dev}/data", packet(dev, seq)))
    return out


def key_of(device_id: str, seq: int | None) -> str:
    """The accounting key of a stored row."""
    return f"{device_id}:{seq}"


class Publisher:
    """A QoS 1 publisher that records, by key, every message it attempted and every PUBACK it got.

    ``attempted`` (in order) and ``acked`` (a set) are updated from the publishing thread and may
    be read from any thread. A PUBACK with an MQTT 5 failure reason code (>= 0x80) is not an ack.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        protocol: Protocol = "5",
        client_id: str = "",
        keepalive: int = 10,
        inflight: int = 1000,
    ) -> None:
        self.host, self.port, self.protocol = host, port, protocol
        self.client_id = client_id
        self.keepalive = keepalive
        self.inflight = inflight
        self.attempted: list[str] = []
        self.acked: set[str] = set()
        self.refused: set[str] = set()
        self.reconnects = 0
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask a running :meth:`run` to return soon (what is unacked stays unacked)."""
        self._stop.set()

    def run(self, batch: Sequence[Reading], *, rate: float | None = None, ack_wait: float = 60.0) -> None:
        """Publish ``batch`` (at ``rate`` per second, or as fast as the broker takes it) and wait up
        to ``ack_wait`` seconds after the last publish for the outstanding PUBACKs (also the limit
        for the first connect). Blocking."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

        v5 = self.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.max_inflight_messages_set(self.inflight)
        client.max_queued_messages_set(0)
        by_mid: dict[int, str] = {}
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS

        def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            key = by_mid.pop(mid, None)
            if key is None:
                return
            if getattr(rc, "is_failure", False):
                self.refused.add(key)
            else:
                self.acked.add(key)

        client.on_publish = on_publish

        def pump(wait: float) -> None:
            # loop() runs the callbacks in this thread; on a lost connection reconnect (paho re-sends
            # the unacknowledged messages itself).
            if client.loop(wait) != ok:
                time.sleep(0.05)
                with contextlib.suppress(OSError):
                    client.reconnect()
                    self.reconnects += 1

        started = time.monotonic()
        connect_deadline = started + ack_wait
        while True:
            try:
                client.connect(self.host, self.port, keepalive=self.keepalive)
                break
            except OSError:
                if time.monotonic() > connect_deadline or self._stop.is_set():
                    raise
                time.sleep(0.1)
        for i, reading in enumerate(batch):
            if self._stop.is_set():
                break
            if rate is not None:
                while (delay := started + i / rate - time.monotonic()) > 0:
                    pump(min(delay, 0.01))
            while len(by_mid) >= self.inflight and not self._stop.is_set():
                pump(0.01)
            info = client.publish(reading.topic, reading.payload, qos=1)
            self.attempted.append(reading.key)
            by_mid[info.mid] = reading.key
            if i % 64 == 0:
                pump(0)
        deadline = time.monotonic() + ack_wait
        while by_mid and time.monotonic() < deadline and not self._stop.is_set():
            pump(0.01)
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop(0.1)

    async def arun(self, batch: Sequence[Reading], *, rate: float | None = None, ack_wait: float = 60.0) -> None:
        """:meth:`run` in a worker thread; cancelling it stops the publisher (its thread returns
        within one loop turn)."""
        try:
            await trio.to_thread.run_sync(lambda: self.run(batch, rate=rate, ack_wait=ack_wait), abandon_on_cancel=True)
        finally:
            self.stop()


# ----------------------------------------------------------------------------------- gateway


READ_KEY, READ_ENTRY = api_key("faults", "admin")


def gateway_env(workdir: Path, *, mqtt_url: str, db_url: str, client_id: str, **extra: str) -> dict[str, str]:
    """A configuration for ``gateway serve`` in tests: quick reconnects, a long broker session,
    a log file in ``workdir``, one admin key (:data:`READ_KEY`), no rate limit to speak of."""
    env = {
        "MQTT_URL": mqtt_url,
        "MQTT_CLIENT_ID": client_id,
        "MQTT_SESSION_EXPIRY": "3600",
        "MQTT_RECONNECT_MIN": "0.05",
        "MQTT_RECONNECT_MAX": "0.5",
        "DATABASE_URL": db_url,
        "DATABASE_RETRY_MIN": "0.05",
        "DATABASE_RETRY_MAX": "0.5",
        "DATABASE_CONNECT_TIMEOUT": "3",
        "HTTP_PORT": str(free_port()),
        "API_KEYS": READ_ENTRY,
        "RATE_LIMIT": "100000/second",
        "LOG_FILE": str(workdir / "gateway.log"),
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


class Gateway(GatewayProcess):
    """``gateway serve --env-file WORKDIR/gateway.env``; ``start()`` again after ``kill()`` restarts
    it with the same configuration. ``environ`` adds process-environment variables (test hooks)."""

    def __init__(self, workdir: Path, env: dict[str, str], *, environ: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, env, env_file=workdir / "gateway.env")
        self.config = env
        self.env.update(environ or {})
        self.headers = {"X-API-Key": READ_KEY}

    @property
    def log_file(self) -> Path:
        return Path(self.config["LOG_FILE"])

    def log(self) -> str:
        """The gateway's log file (all of it, every run)."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET ``path`` with the admin key."""
        kwargs.setdefault("timeout", 5.0)
        return httpx.get(self.url + path, headers=self.headers, **kwargs)

    def ping(self) -> dict[str, Any]:
        """``/api/v1/ping`` with component detail."""
        data: dict[str, Any] = self.get("/api/v1/ping").json()
        return data

    def metric(self, name: str) -> float | None:
        """One unlabelled sample from ``/metrics`` (None when absent)."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def kill_safely(self) -> None:
        """SIGKILL if running, and never raise (for finally blocks)."""
        with contextlib.suppress(Exception):
            self.kill()


# ------------------------------------------------------------------------------------- store


def stored(db_url: str) -> list[str]:
    """The key of every row in ``messages`` (a key stored twice appears twice); [] when the
    database cannot be read yet."""
    try:
        return [key_of(d, s) for d, s in stored_keys(db_url)]
    except Exception:
        return []


def count_stored(db_url: str) -> int:
    """``SELECT count(*) FROM messages`` (0 when the database cannot be read yet): cheap to poll."""
    try:
        if db_url.startswith("sqlite:///"):
            import sqlite3

            conn = sqlite3.connect(db_url[len("sqlite:///") :], timeout=30)
            try:
                return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
            finally:
                conn.close()
        from tests.support.pg import psql

        return int(psql(db_url, "SELECT count(*) FROM messages").strip() or 0)
    except Exception:
        return 0


async def acount_stored(db_url: str) -> int:
    """:func:`count_stored` from Trio, in a worker thread."""
    return await trio.to_thread.run_sync(count_stored, db_url)


async def astored(db_url: str) -> list[str]:
    """:func:`stored` from Trio, in a worker thread."""
    return await trio.to_thread.run_sync(stored, db_url)


async def wait_stored(db_url: str, keys: Iterable[str], limit: float = 120.0, poll: float = 0.2) -> list[str]:
    """Wait until every key in ``keys`` is stored (at most ``limit`` seconds); returns what is
    stored. Raises trio.TooSlowError."""
    want = set(keys)
    with trio.fail_after(limit):
        while True:
            rows = await astored(db_url)
            if want <= set(rows):
                return rows
            await trio.sleep(poll)


async def settled(value: Callable[[], int], *, quiet: float, limit: float, poll: float = 0.1) -> int:
    """Wait until ``value()`` has not changed for ``quiet`` seconds (at most ``limit``); returns it."""
    deadline = trio.current_time() + limit
    last, since = value(), trio.current_time()
    while trio.current_time() < deadline:
        await trio.sleep(poll)
        now = value()
        if now != last:
            last, since = now, trio.current_time()
        elif trio.current_time() - since >= quiet:
            return now
    raise AssertionError(f"still changing after {limit} s")


# ----------------------------------------------------------------------------------- raw MQTT


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


class RawMqtt:
    """MQTT 3.1.1 over a plain blocking socket, for packets paho does not let a test choose:
    a PUBLISH with a given packet id and DUP flag. ``pubacks()`` returns the ids acked so far."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self._buf = b""
        self._acked: list[int] = []
        body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _string(client_id)
        self.sock.sendall(bytes([0x10]) + _varint(len(body)) + body)
        kind, payload = self._read_packet()
        assert kind == 0x20 and payload[1] == 0, f"CONNACK refused: {payload!r}"

    def publish(self, topic: str, payload: bytes, packet_id: int, *, dup: bool = False) -> None:
        """Send one QoS 1 PUBLISH."""
        body = _string(topic) + struct.pack("!H", packet_id) + payload
        self.sock.sendall(bytes([0x32 | (0x08 if dup else 0)]) + _varint(len(body)) + body)

    def wait_pubacks(self, count: int, timeout: float = 10.0) -> list[int]:
        """Read until ``count`` PUBACKs arrived in all; returns their packet ids in order."""
        deadline = time.monotonic() + timeout
        while len(self._acked) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            kind, payload = self._read_packet()
            if kind == 0x40:
                self._acked.append(struct.unpack("!H", payload[:2])[0])
        return list(self._acked)

    def _read_packet(self) -> tuple[int, bytes]:
        def need(n: int) -> None:
            while len(self._buf) < n:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("broker closed the connection")
                self._buf += chunk

        need(2)
        length, mult, i = 0, 1, 1
        while True:
            need(i + 1)
            b = self._buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        need(i + length)
        kind, payload = self._buf[0] & 0xF0, self._buf[i : i + length]
        self._buf = self._buf[i + length :]
        return kind, payload

    def close(self) -> None:
        """DISCONNECT and close."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()
