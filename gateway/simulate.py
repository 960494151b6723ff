"""``gateway simulate``: a fleet of virtual ESP32-like sensors publishing real packets over MQTT.

Users run it to try the gateway without hardware; the benchmarks use it as their load. Each virtual
device keeps its own drifting state (temperature random walk with mean reversion, humidity, pressure,
a slowly draining battery) and its own ``seq`` counter. A chosen share of packets is malformed in one
of many ways (:data:`INVALID_KINDS`), so the reject path gets exercised too.

Publishing is paced to the offered rate by a token schedule (message *k* is due at ``t0 + k / rate``);
when the process cannot keep up it publishes as fast as it can and reports how far behind it fell.
``--processes P`` splits the devices and the rate over *P* worker processes and merges their summaries.

The broker link is the gateway's own (:class:`gateway.mqtt.MqttBridge`, paho bridged into Trio with
no paho thread, publishes encoded and written in batches): one bridge for the gateway, the simulator
and the benchmarks' receiver, without the gateway's ingest plumbing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import trio

from gateway.errors import ConfigError, SimulateError
from gateway.health import ComponentHealth
from gateway.mqtt import Inbound, MqttBridge
from gateway.settings import MqttSettings, load_settings

INVALID_KINDS: tuple[str, ...] = (
    "bad_json",
    "naive_timestamp",
    "missing_field",
    "wrong_type",
    "oversized",
    "non_utf8",
    "battery_out_of_range",
    "bad_status",
    "bad_device_id",
    "not_an_object",
    "empty_measurements",
    "non_finite",
)
"""Every way the simulator breaks a packet; each one is refused by ``gateway.packets.parse_packet``."""

DEFAULT_TOPIC_TEMPLATE = "sensors/{device_id}/data"

SEQ_RANDOM_RANGE = 1_000_000
"""Without ``--seq-start`` each device's counter starts somewhere below this, as after a reboot."""

PROGRESS_EVERY = 5.0
"""Seconds between progress lines on stderr (``--progress``; 0 turns them off)."""


# --------------------------------------------------------------------------------------------------
# Virtual devices


@dataclass
class Outgoing:
    """One packet ready to publish."""

    device_id: str
    seq: int | None
    payload: bytes
    valid: bool
    kind: str  # "ok" or one of INVALID_KINDS


@dataclass
class SimDevice:
    """The drifting state of one virtual sensor."""

    device_id: str
    temperature: float
    humidity: float
    pressure: float
    battery: float
    seq: int = 0

    def step(self, rng: random.Random) -> None:
        """Advance the measurements one reading: small random walks pulled back towards typical values."""
        # Uniform steps instead of gauss(): the walk looks the same and costs a third.
        r = rng.random
        self.temperature += (r() - 0.5) * 0.2 + (21.0 - self.temperature) * 0.01
        humidity = self.humidity + (r() - 0.5) * 0.8 + (45.0 - self.humidity) * 0.01
        self.humidity = min(100.0, max(0.0, humidity))
        self.pressure += (r() - 0.5) * 0.2 + (1013.25 - self.pressure) * 0.005
        self.battery -= 0.002
        if self.battery < 5.0:  # the user replaced the batteries
            self.battery = 100.0

    def status(self, rng: random.Random) -> str:
        """Mostly ``ok``; ``warning`` on a low battery, rare errors and maintenance."""
        r = rng.random()
        if r < 0.001:
            return "error"
        if r < 0.0015:
            return "maintenance"
        if self.battery < 20.0 and r < 0.05:
            return "warning"
        return "ok"


class Fleet:
    """Virtual devices and the packets they publish, round-robin across devices.

    ``invalid_ratio`` is honoured exactly over any run (an error accumulator decides which packet is
    malformed, the RNG only decides how), so ``n`` packets hold ``floor(n * ratio)`` invalid ones.
    """

    def __init__(
        self,
        devices: int,
        *,
        invalid_ratio: float = 0.0,
        seed: int | None = None,
        first_index: int = 1,
        stride: int = 1,
        id_prefix: str = "esp32-sim-",
        seq_start: int | None = 0,
    ) -> None:
        """``seq_start``: each device's first ``seq`` is ``seq_start + 1``; None starts each device
        at its own random point, as a fleet of devices that rebooted at different times would."""
        if devices < 1:
            raise ValueError("devices must be at least 1")
        if not 0.0 <= invalid_ratio <= 1.0:
            raise ValueError("invalid_ratio must be between 0 and 1")
        self.rng = random.Random(seed)
        self.invalid_ratio = invalid_ratio
        self.devices = [
            SimDevice(
                device_id=f"{id_prefix}{first_index + i * stride:04d}",
                temperature=self.rng.uniform(17.0, 25.0),
                humidity=self.rng.uniform(30.0, 60.0),
                pressure=self.rng.uniform(1000.0, 1025.0),
                battery=self.rng.uniform(40.0, 100.0),
            )
            for i in range(devices)
        ]
        for dev in self.devices:
            dev.seq = self.rng.randrange(SEQ_RANDOM_RANGE) if seq_start is None else seq_start
        self._next = 0
        self._count = 0
        self._ts_second = -1
        self._ts_prefix = ""

    def next_packet(self) -> Outgoing:
        """The next packet of the next device in turn."""
        dev = self.devices[self._next]
        k = self._count
        self._count += 1
        invalid = math.floor((k + 1) * self.invalid_ratio) > math.floor(k * self.invalid_ratio)
        if invalid:
            # The device keeps its turn and sends a good packet next: otherwise, with a device
            # count that is a multiple of 1/ratio, the same device would send every bad packet
            # and never a good one (20 devices at 5 % would show 19 on a dashboard).
            kind = self.rng.choice(INVALID_KINDS)
            return Outgoing(dev.device_id, None, _invalid_payload(dev, kind, self.rng), False, kind)
        self._next = (self._next + 1) % len(self.devices)
        dev.step(self.rng)
        dev.seq += 1
        return Outgoing(dev.device_id, dev.seq, self._valid_payload(dev), True, "ok")

    def _valid_payload(self, dev: SimDevice) -> bytes:
        # Formatted by hand, not json.dumps: this is the simulator's hot path (3 µs instead of 15 µs),
        # and every part is a number, a literal or a device id we generated from a safe alphabet.
        r = self.rng.random()
        now = time.time()
        if r < 0.1:  # some firmware sends epoch seconds ...
            ts = f"{now:.3f}"
        elif r < 0.15:  # ... or epoch milliseconds
            ts = str(int(now * 1000))
        else:
            ts = f'"{self._rfc3339(now)}"'
        return (
            f'{{"device_id":"{dev.device_id}","timestamp":{ts},"seq":{dev.seq},'
            f'"measurements":{{"temperature":{dev.temperature:.2f},"humidity":{dev.humidity:.1f},'
            f'"pressure":{dev.pressure:.1f}}},"status":"{dev.status(self.rng)}","battery":{dev.battery:.1f}}}'
        ).encode()

    def _rfc3339(self, now: float) -> str:
        second = int(now)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((now - second) * 1000):03d}Z"


def _invalid_payload(dev: SimDevice, kind: str, rng: random.Random) -> bytes:
    """A packet broken in the way ``kind`` names."""
    ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body: dict[str, Any] = {
        "device_id": dev.device_id,
        "timestamp": ts,
        "measurements": {"temperature": round(dev.temperature, 2)},
        "status": "ok",
        "battery": round(dev.battery, 1),
    }
    if kind == "bad_json":
        text = json.dumps(body)
        return text[: rng.randrange(1, len(text) - 1)].encode()
    if kind == "naive_timestamp":
        body["timestamp"] = ts.removesuffix("Z")
    elif kind == "missing_field":
        del body[rng.choice(["device_id", "timestamp", "measurements", "status"])]
    elif kind == "wrong_type":
        wrong: dict[str, Any] = {"measurements": {"temperature": "21.5"}, "status": 1, "timestamp": [1, 2]}
        field_name = rng.choice(sorted(wrong))
        body[field_name] = wrong[field_name]
    elif kind == "oversized":
        body["measurements"] = {"temperature": 21.0}
        body["note"] = "x" * (70 * 1024)
    elif kind == "non_utf8":
        return json.dumps(body).encode().replace(b'"ok"', b'"\xff\xfe"')
    elif kind == "battery_out_of_range":
        body["battery"] = rng.choice([-5, 101, 150.5, 1000])
    elif kind == "bad_status":
        body["status"] = rng.choice(["OK", "fine", "", "unknown"])
    elif kind == "bad_device_id":
        body["device_id"] = rng.choice(["", "bad id with spaces", "x" * 65, "ünïcode"])
    elif kind == "not_an_object":
        return json.dumps([body]).encode()
    elif kind == "empty_measurements":
        body["measurements"] = {}
    elif kind == "non_finite":
        body["measurements"]["temperature"] = rng.choice([math.nan, math.inf, -math.inf])  # NaN/Infinity
    else:  # pragma: no cover - guarded by INVALID_KINDS
        raise ValueError(kind)
    return json.dumps(body).encode()


# --------------------------------------------------------------------------------------------------
# The broker link: the gateway's own bridge (gateway.mqtt), not a second one


@dataclass(frozen=True)
class LinkOptions:
    """How to reach the broker; ``subscribe``: a topic filter to receive (QoS 1), else publish only."""

    url: str = "mqtt://127.0.0.1:1883"
    protocol: str = "5"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    connect_timeout: float = 10.0
    clean_start: bool = True
    session_expiry: int = 0  # MQTT 5: seconds the broker keeps the session (with clean_start=False)
    subscribe: str | None = None


@asynccontextmanager
async def open_link(
    opts: LinkOptions, *, on_message: Callable[[Inbound], None] | None = None
) -> AsyncIterator[MqttBridge]:
    """Connect through :class:`gateway.mqtt.MqttBridge` and yield it (publish with
    :meth:`~gateway.mqtt.MqttBridge.send_to_many`).

    Returns after the CONNACK (and the SUBACK with ``opts.subscribe``; each received message
    goes to ``on_message``, acknowledged after it). Raises :class:`SimulateError` when the broker
    is unreachable or refuses the connection. On exit, disconnects cleanly.
    """
    parts = urlsplit(opts.url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SimulateError(f"--url must be mqtt://host[:port] or mqtts://host[:port], not {opts.url!r}")
    tls = parts.scheme == "mqtts"
    host, port = parts.hostname, parts.port or (8883 if tls else 1883)
    settings = MqttSettings.model_validate(
        {
            "url": opts.url,
            "client_id": opts.client_id or f"sim-{uuid.uuid4().hex[:12]}",
            "protocol": opts.protocol,
            "username": opts.username,
            "password": opts.password,
            "ca_file": opts.ca_file,
            "cert_file": opts.cert_file,
            "key_file": opts.key_file,
            "keepalive": opts.keepalive,
            "connect_timeout": opts.connect_timeout,
            "session_expiry": opts.session_expiry,
            "subscribe_topic": opts.subscribe or "unused",
            "device_from_topic": False,
            # Pacing is ours: only the broker's Receive Maximum holds publishes back.
            "receive_maximum": 65535,
        }
    )
    health = ComponentHealth("mqtt")
    bridge = MqttBridge(settings, health, subscribe=opts.subscribe is not None, persistent=not opts.clean_start)
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)  # started: connected, or the first attempt failed
        if not bridge.connected:
            failure = health.last_error or "no connection"
            nursery.cancel_scope.cancel()
        else:
            if on_message is not None:
                nursery.start_soon(_deliver, bridge, recv, on_message)
            try:
                yield bridge
            finally:
                nursery.cancel_scope.cancel()  # the bridge sends DISCONNECT as it stops
    if failure is not None:
        raise SimulateError(f"cannot connect to {host}:{port}: {failure}")


async def _deliver(
    bridge: MqttBridge, recv: trio.MemoryReceiveChannel[list[Inbound]], on_message: Callable[[Inbound], None]
) -> None:
    async for batch in recv:
        for msg in batch:
            on_message(msg)
        bridge.ack(batch)


# --------------------------------------------------------------------------------------------------
# The simulator run


@dataclass
class SimOptions:
    """One simulator run."""

    devices: int = 10
    rate: float = 10.0
    duration: float = 10.0
    invalid_ratio: float = 0.0
    qos: int = 1
    topic_template: str = DEFAULT_TOPIC_TEMPLATE
    seed: int | None = None
    drain_timeout: float = 10.0
    link: LinkOptions = field(default_factory=LinkOptions)
    first_index: int = 1
    stride: int = 1
    device_prefix: str = "esp32-sim-"
    seq_start: int | None = None
    progress: float = 0.0  # seconds between progress lines on stderr; 0: none


@dataclass
class Summary:
    """What a run did. Latencies are publish → PUBACK in milliseconds."""

    sent: int = 0
    valid: int = 0
    invalid: int = 0
    acked: int = 0
    nacked: int = 0
    unacked: int = 0
    offered_rate: float = 0.0
    achieved_rate: float = 0.0
    elapsed: float = 0.0
    max_lag: float = 0.0
    puback_p50_ms: float | None = None
    puback_p99_ms: float | None = None
    puback_max_ms: float | None = None
    invalid_kinds: dict[str, int] = field(default_factory=dict)
    processes: int = 1
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    def public(self) -> dict[str, Any]:
        """The summary without the raw latency samples."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latencies_ms"}
        out["invalid_kinds"] = dict(self.invalid_kinds)
        return out


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) by nearest rank, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


async def simulate(opts: SimOptions, *, record: TextIO | None = None) -> Summary:
    """Publish ``rate * duration`` packets from the fleet, paced to ``rate``; wait for the PUBACKs.

    With ``record``, writes ``device_id seq publish_time_ns`` per valid packet (for latency benches).
    Returns the :class:`Summary`. Raises :class:`SimulateError` on connection problems.
    """
    fleet = Fleet(
        opts.devices,
        invalid_ratio=opts.invalid_ratio,
        seed=opts.seed,
        first_index=opts.first_index,
        stride=opts.stride,
        id_prefix=opts.device_prefix,
        seq_start=opts.seq_start,
    )
    topics = {d.device_id: opts.topic_template.format(device_id=d.device_id) for d in fleet.devices}
    summary = Summary(offered_rate=opts.rate)
    total = max(0, round(opts.rate * opts.duration))
    answers = _Answers(summary)
    records: list[str] | None = [] if record is not None else None
    async with open_link(opts.link) as link, trio.open_nursery() as nursery:
        t0 = trio.current_time()
        if opts.progress > 0:
            nursery.start_soon(_progress, summary, t0, opts.progress)
        sent = 0
        batch = max(1, min(500, int(opts.rate / 200) or 1))
        while sent < total:
            now = trio.current_time()
            due = min(total, int((now - t0) * opts.rate) + 1)
            if due <= sent:
                await trio.sleep_until(t0 + sent / opts.rate)
                continue
            summary.max_lag = max(summary.max_lag, now - t0 - sent / opts.rate)
            items = _next_items(fleet, topics, min(due - sent, batch), opts.qos, answers, records)
            sent += len(items)
            summary.sent = sent
            await link.send_to_many(items, qos=opts.qos)  # encoded and written together
        # The last message is due at (n-1)/rate; the window it completes is n/rate long.
        summary.elapsed = max(trio.current_time() - t0, sent / opts.rate)
        answers.sending_done = True
        with trio.move_on_after(opts.drain_timeout):
            await _drained(link, opts.qos, answers)
        summary.unacked = sent - summary.acked - summary.nacked if opts.qos else 0
        nursery.cancel_scope.cancel()
    summary.achieved_rate = summary.sent / summary.elapsed if summary.elapsed > 0 else 0.0
    _fill_percentiles(summary)
    if record is not None:
        record.writelines(records or [])
    return summary


class _Answers:
    """Counts a run's PUBACKs into its summary; ``all_answered`` is set once every sent message
    was answered (after ``sending_done``)."""

    def __init__(self, summary: Summary) -> None:
        self.summary = summary
        self.all_answered = trio.Event()
        self.sending_done = False

    def on_done(self, sent_ns: int, refusal: str | None) -> None:
        s = self.summary
        if refusal is not None:
            s.nacked += 1
        else:
            s.acked += 1
            s.latencies_ms.append((time.perf_counter_ns() - sent_ns) / 1e6)
        if self.sending_done and s.acked + s.nacked >= s.sent:
            self.all_answered.set()


def _next_items(
    fleet: Fleet, topics: dict[str, str], n: int, qos: int, answers: _Answers, records: list[str] | None
) -> list[tuple[str, bytes, Callable[[str | None], None] | None]]:
    """The next ``n`` packets of the fleet as (topic, payload, on PUBACK), counted in the summary
    (and recorded as ``device_id seq publish_time_ns`` when ``records`` is a list)."""
    summary = answers.summary
    items: list[tuple[str, bytes, Callable[[str | None], None] | None]] = []
    for _ in range(n):
        pkt = fleet.next_packet()
        t_ns = time.time_ns()
        done = functools.partial(answers.on_done, time.perf_counter_ns()) if qos else None
        items.append((topics[pkt.device_id], pkt.payload, done))
        if pkt.valid:
            summary.valid += 1
            if records is not None:
                records.append(f"{pkt.device_id} {pkt.seq} {t_ns}\n")
        else:
            summary.invalid += 1
            summary.invalid_kinds[pkt.kind] = summary.invalid_kinds.get(pkt.kind, 0) + 1
    return items


async def _drained(link: MqttBridge, qos: int, answers: _Answers) -> None:
    """Wait until every message sent is answered (QoS 1), or written out (QoS 0)."""
    s = answers.summary
    if qos:
        if s.acked + s.nacked < s.sent:
            await answers.all_answered.wait()
    else:
        # QoS 0: until all of it is in the write buffer (the DISCONNECT flushes it).
        while link.outstanding:  # noqa: ASYNC110 (a poll at the very end of a run)
            await trio.sleep(0.01)


async def _progress(summary: Summary, t0: float, every: float) -> None:
    """A line on stderr every ``every`` seconds: what was sent and acknowledged so far, and the rate."""
    last_t, last_sent = t0, 0
    while True:
        await trio.sleep(every)
        now = trio.current_time()
        rate = (summary.sent - last_sent) / (now - last_t) if now > last_t else 0.0
        last_t, last_sent = now, summary.sent
        print(
            f"simulate: {now - t0:6.1f} s  sent {summary.sent}  acked {summary.acked}"
            f"  refused {summary.nacked}  {rate:,.0f} msg/s",
            file=sys.stderr,
            flush=True,
        )


def _fill_percentiles(summary: Summary) -> None:
    lat = summary.latencies_ms
    summary.puback_p50_ms = percentile(lat, 50)
    summary.puback_p99_ms = percentile(lat, 99)
    summary.puback_max_ms = max(lat) if lat else None


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gateway simulate`` options to ``parser``."""
    parser.add_argument("--devices", type=_positive_int, default=10, help="number of virtual sensors (10)")
    parser.add_argument("--rate", type=_positive_float, default=10.0, help="messages/s in total (10)")
    parser.add_argument("--duration", type=_non_negative_float, default=10.0, help="seconds to publish (10)")
    parser.add_argument("--invalid-ratio", type=_ratio, default=0.0, help="share of malformed, 0-1 (0)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="MQTT QoS (1)")
    parser.add_argument(
        "--protocol", choices=("5", "3.1.1"), default=None, help="MQTT version (default: MQTT_PROTOCOL)"
    )
    _broker_arguments(parser)
    parser.add_argument("--processes", type=_positive_int, default=1, help="worker processes (1)")
    parser.add_argument(
        "--device-prefix",
        type=_device_prefix,
        default="esp32-sim-",
        help="device ids are PREFIX0001, PREFIX0002, ... (esp32-sim-)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for repeatable runs")
    parser.add_argument(
        "--seq-start",
        type=_non_negative_int,
        default=None,
        help="first seq of every device is N+1 (default: a random point per device, as after a reboot)",
    )
    parser.add_argument(
        "--progress",
        type=_non_negative_float,
        default=PROGRESS_EVERY,
        metavar="SECONDS",
        help="a progress line on stderr every SECONDS: sent, acked, rate (default %(default)s; 0: none)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=10.0,
        help="seconds to wait for outstanding PUBACKs at the end (10)",
    )
    parser.add_argument("--record", help="write 'device_id seq time_ns' lines")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    # Internal: set by the parent of a multi-process run.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker options; each defaults to the gateway's own configuration (:func:`_broker_defaults`)."""
    parser.add_argument(
        "--env-file",
        default=None,
        help="take the broker options not given here from this file, as `gateway serve` does (default: ./.env)",
    )
    parser.add_argument(
        "--url",
        default=None,
        help="broker, mqtt:// or mqtts:// (default: MQTT_URL from the environment or .env, else mqtt://127.0.0.1:1883)",
    )
    parser.add_argument(
        "--topic-template",
        default=DEFAULT_TOPIC_TEMPLATE,
        help="each device's topic; {device_id} is replaced by the device's id (default: %(default)s)",
    )
    parser.add_argument("--ca-file", help="CA bundle to verify the broker (TLS; default: MQTT_CA_FILE)")
    parser.add_argument("--cert-file", help="client certificate (TLS; default: MQTT_CERT_FILE)")
    parser.add_argument("--key-file", help="client key (TLS; default: MQTT_KEY_FILE)")
    parser.add_argument("--username", default=None, help="broker user name (default: MQTT_USERNAME)")
    parser.add_argument(
        "--password", default=None, help="broker password (default: MQTT_PASSWORD; prefer that: argv is visible to ps)"
    )


def main(args: argparse.Namespace) -> int:
    """Run the simulator from parsed arguments; print the summary. Returns the exit code."""
    try:
        _broker_defaults(args)
        multi = args.processes > 1 and args.worker is None
        summary = _run_processes(args) if multi else _run_one(args)
    except SimulateError as exc:
        print(f"gateway simulate: {exc}", file=sys.stderr)
        return 1
    if args.worker is not None:
        out = summary.public()
        out["latencies_ms"] = [round(v, 3) for v in summary.latencies_ms]
        print(json.dumps(out))
    elif args.json:
        print(json.dumps(summary.public()))
    else:
        print(_human(summary))
    return 0 if summary.sent else 1 if round(args.rate * args.duration) else 0


def _broker_defaults(args: argparse.Namespace) -> None:
    """Fill the broker options not given on the command line from the gateway's own configuration
    (the environment over ``--env-file`` or ``./.env``, read as ``gateway serve`` reads it), so the
    simulator reaches the broker the gateway uses without repeating its URL or credentials."""
    try:
        mqtt = load_settings(args.env_file if args.env_file else ".env").mqtt
    except ConfigError as exc:
        if args.env_file:
            raise SimulateError(f"configuration error: {exc}") from None
        print(f"gateway simulate: ignoring ./.env ({exc}); using the built-in broker defaults", file=sys.stderr)
        mqtt = MqttSettings.model_validate({})
    args.url = args.url or mqtt.url
    args.protocol = args.protocol or mqtt.protocol
    args.username = args.username or mqtt.username
    if args.password is None and mqtt.password is not None:
        args.password = mqtt.password.get_secret_value()
    for opt in ("ca_file", "cert_file", "key_file"):
        if getattr(args, opt) is None and getattr(mqtt, opt) is not None:
            setattr(args, opt, str(getattr(mqtt, opt)))


def _run_one(args: argparse.Namespace) -> Summary:
    index, count = 0, 1
    if args.worker is not None:
        index, count = (int(x) for x in args.worker.split("/"))
    devices = len(range(index, args.devices, count))
    opts = SimOptions(
        devices=devices,
        rate=args.rate / count,
        duration=args.duration,
        invalid_ratio=args.invalid_ratio,
        qos=args.qos,
        topic_template=args.topic_template,
        seed=None if args.seed is None else args.seed + index,
        drain_timeout=args.drain_timeout,
        first_index=1 + index,
        stride=count,
        device_prefix=args.device_prefix,
        seq_start=args.seq_start,
        # Workers of a multi-process run stay quiet: their parent prints the merged summary.
        progress=0.0 if args.worker is not None or args.json else args.progress,
        link=LinkOptions(
            url=args.url,
            protocol=args.protocol,
            username=args.username,
            password=args.password,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
        ),
    )
    if args.record:
        with open(args.record, "w", encoding="utf-8") as fh:
            return trio.run(functools.partial(simulate, opts, record=fh))
    return trio.run(simulate, opts)


def _run_processes(args: argparse.Namespace) -> Summary:
    """Run ``--processes`` workers (``python -m gateway.simulate --worker i/P``) and merge their summaries."""
    count = min(args.processes, args.devices)
    argv = _forward_argv(args)
    procs: list[tuple[subprocess.Popen[str], str | None]] = []
    tmpdir = tempfile.mkdtemp(prefix="gateway-sim-")
    for i in range(count):
        rec = os.path.join(tmpdir, f"record.{i}") if args.record else None
        cmd = [sys.executable, "-m", "gateway.simulate", *argv, "--worker", f"{i}/{count}"]
        if rec:
            cmd += ["--record", rec]
        # The password goes through the environment, never argv (visible to every user in ps).
        env = {**os.environ, "MQTT_PASSWORD": args.password} if args.password else None
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env), rec))
    merged = Summary(offered_rate=args.rate, processes=count)
    errors = []
    for proc, _ in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"worker exited with {proc.returncode}")
            continue
        part = json.loads(out.strip().splitlines()[-1])
        for key in ("sent", "valid", "invalid", "acked", "nacked", "unacked"):
            setattr(merged, key, getattr(merged, key) + part[key])
        merged.elapsed = max(merged.elapsed, part["elapsed"])
        merged.max_lag = max(merged.max_lag, part["max_lag"])
        for kind, n in part["invalid_kinds"].items():
            merged.invalid_kinds[kind] = merged.invalid_kinds.get(kind, 0) + n
        merged.latencies_ms.extend(part["latencies_ms"])
    if args.record:
        with open(args.record, "w", encoding="utf-8") as out_fh:
            for _, rec in procs:
                if rec and os.path.exists(rec):
                    out_fh.write(Path(rec).read_text(encoding="utf-8"))
                    os.unlink(rec)
    shutil.rmtree(tmpdir, ignore_errors=True)
    if errors:
        raise SimulateError("; ".join(errors))
    merged.achieved_rate = merged.sent / merged.elapsed if merged.elapsed > 0 else 0.0
    _fill_percentiles(merged)
    return merged


def _forward_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--devices",
        str(args.devices),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.duration),
        "--invalid-ratio",
        str(args.invalid_ratio),
        "--qos",
        str(args.qos),
        "--protocol",
        args.protocol,
        "--url",
        args.url,
        "--topic-template",
        args.topic_template,
        "--device-prefix",
        args.device_prefix,
        "--drain-timeout",
        str(args.drain_timeout),
    ]
    for opt in ("ca_file", "cert_file", "key_file", "username", "seed", "seq_start"):
        value = getattr(args, opt)
        if value is not None:
            argv += ["--" + opt.replace("_", "-"), str(value)]
    return argv


def _human(s: Summary) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} ms"

    kinds = ", ".join(f"{k} {n}" for k, n in sorted(s.invalid_kinds.items())) or "none"
    lines = [
        f"sent      {s.sent} packets in {s.elapsed:.2f} s ({s.achieved_rate:.0f}/s of"
        f" {s.offered_rate:.0f}/s offered, {s.processes} process{'es' if s.processes > 1 else ''})",
        f"valid     {s.valid}",
        f"invalid   {s.invalid} ({kinds})",
        f"PUBACKs   {s.acked} acked, {s.nacked} refused, {s.unacked} missing",
        f"PUBACK    p50 {ms(s.puback_p50_ms)}, p99 {ms(s.puback_p99_ms)}, max {ms(s.puback_max_ms)}",
    ]
    if s.max_lag > 1.0:
        lines.append(f"behind    up to {s.max_lag:.1f} s behind schedule: try --processes")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a non-negative number")
    return value


def _device_prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._:-]{0,56}", text):
        raise argparse.ArgumentTypeError("must be at most 56 of A-Z a-z 0-9 . _ : -")
    return text


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway simulate", description="A fleet of virtual sensors.")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
