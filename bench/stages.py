"""Stage budget: CPU µs per reading of each hot-path stage, by micro-benchmarks over batches of 500.

``python -m bench.stages [--quick] [--pg-url URL] [--json FILE]`` (without ``--pg-url`` a throwaway
PostgreSQL cluster is started). The pipeline scenario prints this table beside its own.

Each stage calls the gateway's own functions on a batch of :data:`BATCH` readings (the simulator's
packets) and is timed with ``time.process_time()`` (this process, all threads: the SQLite worker
thread counts, the PostgreSQL server does not), setup excluded; the table shows the median batch.
Where a faster function lands under a known name it is measured instead of today's path, and the
``path`` column says which one ran:

- frame decode: ``gateway.mqtt_codec`` (``decode_publishes``, ``decode_frames``, ``decode`` or
  ``FrameDecoder().feed``, called with the bytes of 500 MQTT 5 PUBLISH frames) if it exists; else
  the bridge's read path (paho ``loop_read`` over the gateway's buffered socket, into ``Inbound``
  through the bridge's ``on_message``); else bare paho.
- event encode: ``gateway.sse.encode_events`` (a batch) if it exists, else ``encode_event`` per event;
  the path names the JSON library the module uses.
- rules: ``Processor._plan_all`` (async) or ``Processor._plan_batch`` if one exists, else
  ``Processor._plan`` per message (rules evaluation + event build as the processor does it).

A stage whose functions changed shape beyond these is reported as not measured, with the reason,
rather than failing the run.

Outside the sum, after the store rows: the SQLite write with ``synchronous=NORMAL`` instead of the
shipped ``FULL``, and one reading per commit with each, so what durability costs stays measured.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

BATCH = 500
TOPIC = "sensors/bench/data"


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Watch:
    """Accumulates CPU and wall time over the ``with`` blocks of one batch."""

    cpu: float = 0.0
    wall: float = 0.0
    _c0: float = 0.0
    _w0: float = 0.0

    def __enter__(self) -> Watch:
        self._c0, self._w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cpu += time.process_time() - self._c0
        self.wall += time.perf_counter() - self._w0


@dataclass
class Stage:
    """One row of the table."""

    key: str
    name: str
    path: str = ""
    cpu_us: float | None = None
    wall_us: float | None = None
    batches: int = 0
    counted: bool = True  # part of the sum (False: shown for context, or included in another row)
    error: str | None = None
    samples: list[float] = field(default_factory=list)


async def repeat(
    stage: Stage | list[Stage], batch: Callable[..., Awaitable[str | None]], batches: int, warmup: int = 1
) -> list[Stage]:
    """Run ``batch`` ``warmup + batches`` times; keep the median per-reading CPU and wall of the rest.

    With one stage ``batch(watch, i)``; with several ``batch(watches, i)``, one watch per stage (one
    pass measures several stages, e.g. publish then PUBACK). ``batch`` returns the path it measured
    (``" / "`` between the stages' paths), or None to keep the stages' own labels.
    """
    group = stage if isinstance(stage, list) else [stage]
    cpus: list[list[float]] = [[] for _ in group]
    walls: list[list[float]] = [[] for _ in group]
    try:
        for i in range(warmup + batches):
            ws = [Watch() for _ in group]
            path = await batch(ws if isinstance(stage, list) else ws[0], i)
            if path:
                parts = path.split(" / ") if len(group) > 1 else [path]
                for st, p in zip(group, parts * len(group) if len(parts) == 1 else parts, strict=False):
                    st.path = p
            if i >= warmup:
                for k, w in enumerate(ws):
                    cpus[k].append(w.cpu / BATCH * 1e6)
                    walls[k].append(w.wall / BATCH * 1e6)
    except Exception as exc:  # a stage that changed shape: say so, measure the rest
        for st in group:
            st.error = f"{type(exc).__name__}: {exc}"[:200]
        traceback.print_exc()
        return group
    for st, c, wl in zip(group, cpus, walls, strict=True):
        st.cpu_us, st.wall_us, st.batches, st.samples = statistics.median(c), statistics.median(wl), len(c), c
    return group


# --------------------------------------------------------------------------------------------------
# Inputs


def payloads(prefix: str, n: int = BATCH) -> list[bytes]:
    """``n`` valid packets from the simulator's fleet (100 devices; ``prefix`` keeps them unique)."""
    from gateway.simulate import Fleet

    fleet = Fleet(100, seed=3, id_prefix=prefix)
    return [fleet.next_packet().payload for _ in range(n)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (128 if n else 0))
        if not n:
            return bytes(out)


def publish_frames(bodies: list[bytes], *, v5: bool = True, first_mid: int = 1) -> bytes:
    """QoS 1 PUBLISH frames for ``bodies`` on :data:`TOPIC` (MQTT 5: empty properties)."""
    topic = TOPIC.encode()
    head = len(topic).to_bytes(2, "big") + topic
    out = bytearray()
    for i, body in enumerate(bodies):
        rest = head + (first_mid + i).to_bytes(2, "big") + (b"\x00" if v5 else b"") + body
        out += b"\x32" + _varint(len(rest)) + rest
    return bytes(out)


def puback_frames(mids: list[int]) -> bytes:
    """PUBACK frames (success, no properties: the short form both protocol versions accept)."""
    return b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)


class FakeSocket:
    """A non-blocking socket holding ``data`` to read; what is sent is kept in ``sent``."""

    def __init__(self, data: bytes = b"") -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.sent = bytearray()

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            raise BlockingIOError
        chunk = bytes(self._data[self._pos : self._pos + bufsize])
        self._pos += len(chunk)
        return chunk

    def send(self, data: bytes | bytearray) -> int:
        self.sent += data
        return len(data)

    def fileno(self) -> int:
        return -1

    def setblocking(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        pass


def inbound_batch(bodies: list[bytes]) -> list[Any]:
    """``Inbound`` messages as the bridge hands them to ingest."""
    from gateway.mqtt import Inbound

    now = datetime.now(UTC)
    return [
        Inbound(topic=TOPIC, payload=b, received_at=now, mid=i + 1, qos=1, dup=False, generation=1)
        for i, b in enumerate(bodies)
    ]


# --------------------------------------------------------------------------------------------------
# MQTT: the bridge with a fake connection


def _mqtt_settings() -> Any:
    from gateway.settings import MqttSettings

    return MqttSettings.model_validate(
        {"MQTT_URL": "mqtt://127.0.0.1:1", "MQTT_CLIENT_ID": "bench-stages", "MQTT_DEVICE_FROM_TOPIC": False}
    )


def bridge_with(data: bytes) -> tuple[Any, Any]:
    """A real :class:`~gateway.mqtt.MqttBridge` whose live connection reads ``data`` from a fake socket.

    Returns (bridge, connection). Uses the bridge's internals (``_make_client``, ``_Connection``,
    ``_BufferedSocket``): a rewrite of ``gateway/mqtt.py`` makes callers fall back to bare paho.
    """
    from gateway import mqtt as gm
    from gateway.health import ComponentHealth

    s = _mqtt_settings()
    bridge = gm.MqttBridge(s, ComponentHealth("mqtt"))
    bridge._trio_thread = threading.get_ident()
    client = bridge._make_client(1)
    conn = gm._Connection(1, client)
    conn.rbuf = gm._BufferedSocket(FakeSocket(data), max_packet=s.max_packet_size, v5=s.protocol == "5")
    conn.sock = conn.rbuf
    client._sock = conn.rbuf
    bridge._conn = conn
    return bridge, conn


def bare_paho(data: bytes) -> tuple[Any, list[Any]]:
    """A bare paho MQTT 5 client (manual ack) reading ``data``; returns (client, messages list)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[Any] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5, manual_ack=True)
    client.on_message = lambda c, u, m: got.append(m)
    client.max_inflight_messages_set(1000)
    client._sock = FakeSocket(data)
    return client, got


def _codec() -> Any:
    """``gateway.mqtt_codec`` (a pure MQTT frame codec) if it has landed, else None."""
    try:
        return importlib.import_module("gateway.mqtt_codec")
    except ImportError:
        return None


def _find_codec() -> tuple[str, Callable[[bytes], Any]] | None:
    """A pure frame decoder in ``gateway.mqtt_codec``, if one has landed: (its name, bytes → messages)."""
    codec = _codec()
    if codec is None:
        return None
    cls = getattr(codec, "FrameDecoder", None)
    if cls is not None:

        def drain(data: bytes) -> list[Any]:
            dec = cls(v5=True)
            dec.feed(data)
            out = []
            while (item := dec.next()) is not None:
                out.append(item)
            return out

        return "gateway.mqtt_codec.FrameDecoder: feed + next (codec only)", drain
    for name in ("decode_publishes", "decode_frames", "decode"):
        fn = getattr(codec, name, None)
        if callable(fn):
            return f"gateway.mqtt_codec.{name} (codec only)", fn
    return None


def _count(result: Any) -> int:
    """How many messages a decoder returned: a list, or a tuple whose first item is the list."""
    if isinstance(result, tuple) and result and isinstance(result[0], list):
        return len(result[0])
    return len(result)


async def frame_decode(w: Watch, i: int) -> str:
    bodies = payloads(f"fd{i}-")
    data = publish_frames(bodies)
    codec = _find_codec()
    if codec is not None:
        name, fn = codec
        try:
            with w:
                got = fn(data)
            if _count(got) == BATCH:
                return name
        except Exception as exc:
            print(f"stages: {name} did not decode the frames ({exc!r}); measuring the bridge", file=sys.stderr)
        w.cpu = w.wall = 0.0
    try:
        bridge, conn = bridge_with(data)
    except (ImportError, AttributeError, TypeError):
        bridge = None
    if bridge is not None:
        client = conn.client
        with w:
            while len(conn.batch) < BATCH:
                if client.loop_read() != 0:
                    raise RuntimeError("loop_read failed")
        bridge._conn = None  # paho's __del__ closing the fake socket must not reach the bridge
        return "bridge: paho loop_read → Inbound"
    client, got = bare_paho(data)
    with w:
        while len(got) < BATCH:
            client.loop_read()
    return "bare paho loop_read (bridge internals not found)"


async def outbound(ws: list[Watch], _i: int) -> str:
    """Outbound publish encode (bridge.send → publisher task → paho publish → one flush) and then
    the PUBACK handling of those 500 publishes, each timed on its own watch."""
    pub, ack = ws
    bodies = payloads("ob-")
    codec = _codec()
    if codec is not None and hasattr(codec, "encode_publish") and hasattr(codec, "decode_puback"):
        return _outbound_codec(codec, pub, ack, bodies)
    try:
        bridge, conn = bridge_with(b"")
    except (ImportError, AttributeError, TypeError):
        return await _outbound_bare(pub, ack, bodies)
    client = conn.client
    done: list[str | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge._publisher, conn)
        with pub:
            for b in bodies:
                await bridge.send(b, None, done.append)
            while len(conn.unconfirmed) < BATCH:
                await trio.lowlevel.checkpoint()
            while client.want_write():
                client.loop_write()
            conn.rbuf.flush()
        nursery.cancel_scope.cancel()
    from gateway import mqtt as gm

    mids = sorted(conn.unconfirmed)
    rbuf = gm._BufferedSocket(FakeSocket(puback_frames(mids)), v5=True)
    client._sock = conn.rbuf = rbuf
    with ack:
        while len(done) < BATCH:
            if client.loop_read() != 0:
                raise RuntimeError("loop_read failed")
    bridge._conn = None  # paho's __del__ closing the fake socket must not reach the bridge
    return "bridge.send → _publisher → paho publish → flush / paho loop_read → _cb_publish"


def _outbound_codec(codec: Any, pub: Watch, ack: Watch, bodies: list[bytes]) -> str:
    """The pure codec's side of outbound: 500 PUBLISH encoded and joined, 500 PUBACKs decoded."""
    topic = b"gateway/events"
    with pub:
        data = b"".join([codec.encode_publish(topic, b, i + 1, v5=True) for i, b in enumerate(bodies)])
    assert data
    acks = puback_frames(list(range(1, BATCH + 1)))
    with ack:
        dec = codec.FrameDecoder(v5=True)
        dec.feed(acks)
        mids = []
        while (frame := dec.next()) is not None:
            mids.append(codec.decode_puback(frame, v5=True)[0])
    assert len(mids) == BATCH
    return (
        "gateway.mqtt_codec.encode_publish + join (codec only)"
        " / gateway.mqtt_codec.FrameDecoder + decode_puback (codec only)"
    )


async def _outbound_bare(pub: Watch, ack: Watch, bodies: list[bytes]) -> str:
    client, _ = bare_paho(b"")
    done: list[int] = []
    client.on_publish = lambda c, u, mid, rc, p: done.append(mid)
    with pub:
        mids = [client.publish("gateway/events", b, qos=1).mid for b in bodies]
        while client.want_write():
            client.loop_write()
    client._sock = FakeSocket(puback_frames(mids))
    with ack:
        while len(done) < BATCH:
            client.loop_read()
    return "bare paho publish / loop_read (bridge internals not found)"


# --------------------------------------------------------------------------------------------------
# Processing


def _processor(store: Any) -> Any:
    from gateway.health import ComponentHealth
    from gateway.processor import Processor
    from gateway.settings import ProcessorSettings
    from gateway.wake import Nudge

    settings = ProcessorSettings.model_validate({})
    return Processor(settings, store, Nudge(), ComponentHealth("processor"), instance_id="bench-stages")


async def plan(proc: Any, messages: list[Any]) -> tuple[str, list[Any], list[Any], Any]:
    """Rules + event build as the processor does them: (path, work items, new events, publish builder).

    Takes the processor's batch planner when it has one (``_plan_all``, async, or ``_plan_batch``),
    else ``_plan`` per message (with the rule set's ``fixed`` plan when it takes one).
    """
    rules = proc.rules
    if (plan_all := getattr(proc, "_plan_all", None)) is not None:
        work = await plan_all(rules, messages)
        path = "Processor._plan_all (batch)"
    elif (plan_batch := getattr(proc, "_plan_batch", None)) is not None:
        work = plan_batch(rules, messages)
        path = "Processor._plan_batch"
    elif len(inspect.signature(proc._plan).parameters) == 3:
        fixed = getattr(rules, "fixed", None)
        work = [proc._plan(rules, fixed, m) for m in messages]
        path = "Processor._plan per message (fixed plan)"
    else:
        work = [proc._plan(rules, m) for m in messages]
        path = "Processor._plan per message (RuleSet.evaluate + SseAction.build)"
    events = [e for w in work for _, e in w.events]
    return path, work, events, proc._publishes(work)


# --------------------------------------------------------------------------------------------------
# SSE


def _sse_encoder() -> tuple[str, Callable[[list[Any]], list[bytes] | bytes]]:
    from gateway import sse

    lib = "orjson loaded" if "orjson" in sys.modules else "json"
    batch = getattr(sse, "encode_events", None)
    if callable(batch):
        return f"gateway.sse.encode_events ({lib})", batch
    return f"gateway.sse.encode_event per event ({lib})", lambda evs: [sse.encode_event(e) for e in evs]


class _StaticStore:
    """Just enough of a store for a hub that never needs to read (no replay, contiguous ids)."""

    def __init__(self, position: int) -> None:
        self.position = position

    async def event_bounds(self) -> tuple[int, int]:
        return self.position, self.position

    async def read_events(self, **_kw: Any) -> list[Any]:
        return []


async def sse_delivery(w: Watch, events: list[Any]) -> str:
    """Hub fan-out → the response generator (its subscription, encode, chunking) → h11 chunked
    framing → a real socket (what hypercorn does for HTTP/1.1; quart's ASGI layer is not included).

    ``events`` must carry consecutive ids (the hub then fans them out without a store read).
    """
    import h11

    from gateway.http.sse import SseStreams
    from gateway.hub import Hub

    hub = Hub(_StaticStore(events[0].id - 1))  # type: ignore[arg-type]
    streams = SseStreams()
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    a.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    h = h11.Connection(h11.SERVER)
    h.receive_data(b"GET /api/v1/events HTTP/1.1\r\nHost: bench\r\n\r\n")
    h.next_event()
    await stream.send_all(h.send(h11.Response(status_code=200, headers=[("content-type", "text/event-stream")])))
    sent = 0
    all_sent = trio.Event()
    client_cpu = [0.0]

    def drain() -> None:  # the client's side: its CPU is taken out of the stage's below
        b.settimeout(10)
        t0 = time.thread_time()
        try:
            while b.recv(1 << 20):
                client_cpu[0] = time.thread_time() - t0
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            await nursery.start(streams.run)

            async def respond() -> None:
                nonlocal sent
                body = streams.stream(
                    hub, {"last_event_id": None, "types": None, "device_id": None}, heartbeat=60, retry_ms=1000
                )
                async for chunk in body:
                    await stream.send_all(h.send(h11.Data(data=chunk)))
                    sent += chunk.count(b"\nevent: ")
                    if sent >= len(events):
                        all_sent.set()

            nursery.start_soon(respond)
            while not hub.clients:  # the stream subscribed
                await trio.sleep(0.001)
            before = client_cpu[0]
            with w:
                hub.committed(events)
                await all_sent.wait()
            await trio.sleep(0.01)  # the reader takes the last bytes (its CPU is read after it did)
            w.cpu -= client_cpu[0] - before
            streams.close()
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
        b.close()
        reader.join(2)
    return "hub.committed → SseStreams.stream → h11 → socket (incl. encode)"


# --------------------------------------------------------------------------------------------------
# The whole table


async def ingest_metrics(w: Watch, i: int) -> str:
    """Ingest's counters and histograms for one committed batch (``gateway.ingest.observe``)."""
    from gateway.ingest import Stored, observe, to_records
    from gateway.settings import IngestSettings
    from gateway.store.base import InsertOutcome

    batch = inbound_batch(payloads(f"im{i}-"))
    messages, rejects = to_records(batch, IngestSettings.model_validate({}).max_payload)
    stored = Stored(messages, [InsertOutcome(k + 1, False) for k in range(len(messages))], rejects)
    with w:
        observe(batch, stored, "mqtt")
    return "gateway.ingest.observe"


async def sqlite_durability(sqlite_dir: Path, batches: int, max_payload: int) -> list[Stage]:
    """What SQLite's ``synchronous=FULL`` (shipped) costs against ``NORMAL``: batches of 500 and one
    reading per commit (a trickle: each commit holds one reading). Context rows, not in the sum;
    the cost is in the wall column (the fsync waits, this process's CPU hardly moves)."""
    from gateway.store import sqlite as sqlite_store

    shipped = sqlite_store._SYNCHRONOUS
    out: list[Stage] = []
    for sync in ("NORMAL", shipped):
        sqlite_store._SYNCHRONOUS = sync  # read when the connection opens and after each lease
        try:
            out += await _durability_rows(sqlite_dir / f"durability-{sync.lower()}.db", sync, sync == shipped,
                                          batches, max_payload)  # fmt: skip
        finally:
            sqlite_store._SYNCHRONOUS = shipped
    return out


async def _durability_rows(path: Path, sync: str, shipped: bool, batches: int, max_payload: int) -> list[Stage]:
    from gateway.ingest import to_records
    from gateway.settings import DatabaseSettings
    from gateway.store import open_store

    out: list[Stage] = []
    settings = DatabaseSettings.model_validate({"DATABASE_URL": f"sqlite:///{path}"})
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)

        async def batch_of_500(w: Watch, i: int) -> None:
            rows, _ = to_records(inbound_batch(payloads(f"dn{sync}{i}-")), max_payload)
            with w:
                await store.write_batch(rows, [])

        async def one_per_commit(w: Watch, i: int) -> None:
            rows, _ = to_records(inbound_batch(payloads(f"d1{sync}{i}-")), max_payload)
            with w:
                for row in rows:
                    await store.write_batch([row], [])

        if not shipped:
            name, path_ = "store write (sqlite, synchronous=NORMAL)", "Store.write_batch of 500 (NORMAL: not shipped)"
            out += await repeat(Stage("store_write_sqlite_normal", name, path_, counted=False), batch_of_500, batches)
        label = f"synchronous={sync}" + (" (shipped)" if shipped else " (not shipped)")
        row = Stage(f"store_trickle_sqlite_{sync.lower()}", f"store write, 1 per commit (sqlite, {sync})",
                    f"Store.write_batch of 1 reading, {label}", counted=False)  # fmt: skip
        out += await repeat(row, one_per_commit, batches)
        nursery.cancel_scope.cancel()
    return out


async def store_stages(
    backend: str, url: str, batches: int, max_payload: int
) -> tuple[list[Stage], list[Any], list[Any], Any]:
    """Store write, claim + complete, and the outbox's lease + delete on one database.

    Returns (rows, the last claimed batch and its stored events (for the rules and SSE stages),
    the processor used).
    """
    from gateway.ingest import to_records
    from gateway.settings import DatabaseSettings
    from gateway.store import open_store

    settings = DatabaseSettings.model_validate({"DATABASE_URL": url})
    out: list[Stage] = []
    claimed: list[Any] = []
    events: list[Any] = []
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(settings))
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(store.run)
        proc = _processor(store)
        seq = 0

        def fresh_rows() -> list[Any]:
            nonlocal seq
            seq += 1
            messages, _ = to_records(inbound_batch(payloads(f"s{backend}{seq}-")), max_payload)
            return messages

        async def write(w: Watch, i: int) -> None:
            messages = fresh_rows()
            with w:
                outcomes = await store.write_batch(messages, [])
            assert len(outcomes) == BATCH and not any(o.duplicate for o in outcomes)

        out += await repeat(
            Stage(f"store_write_{backend}", f"store write ({backend})", "Store.write_batch"), write, batches
        )
        # Nothing unprocessed left behind the write stage: each claim below takes exactly its own.
        while leftover := await store.claim(proc.owner, 5000, 60):
            await store.complete(proc.owner, [m.id for m in leftover], [], [], None)

        async def claim_complete(ws: list[Watch], i: int) -> str:
            nonlocal claimed, events
            cw, ow = ws
            await store.write_batch(fresh_rows(), [])
            with cw:
                got = await store.claim(proc.owner, BATCH, proc._settings.lease_seconds)
            _, work, new_events, publishes = await plan(proc, got)
            ids = [x.message.id for x in work if x.error is None]
            with cw:
                stored = await store.complete(proc.owner, ids, [], new_events, publishes)
            assert len(got) == BATCH and len(stored) == BATCH
            claimed, events = got, [e for mine in stored.values() for e in mine]
            # The outbox publisher's side of the same rows: lease them, then delete them on PUBACK.
            with ow:
                leased = await store.claim_outbox("bench-outbox", 1000, 60.0)
                await store.outbox_done([r.id for r in leased])
            assert len(leased) == BATCH
            return (
                "Store.claim + Store.complete (events + outbox rows rendered in it)"
                " / Store.claim_outbox + Store.outbox_done"
            )

        out += await repeat(
            [
                Stage(f"claim_complete_{backend}", f"claim + complete ({backend})"),
                Stage(f"outbox_{backend}", f"outbox lease + delete ({backend})"),
            ],
            claim_complete,
            batches,
        )
        nursery.cancel_scope.cancel()
    return out, claimed, events, proc


async def measure(*, pg_url: str | None, sqlite_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Every stage on SQLite (and PostgreSQL when ``pg_url`` is given); a JSON-ready dict."""
    from gateway.ingest import to_records
    from gateway.packets import parse_packet
    from gateway.settings import IngestSettings

    batches = 4 if quick else 10
    max_payload = IngestSettings.model_validate({}).max_payload
    out: list[Stage] = []

    async def reference(w: Watch, i: int) -> None:
        bodies = payloads(f"re{i}-")
        with w:
            for b in bodies:
                json.loads(b)

    # Not a stage: how fast this machine runs Python right now. Host contention inflates every CPU
    # figure (up to 2x seen here); compare tables whose reference rows agree, or scale by it.
    ref = Stage("reference", "reference: json.loads of the packet", "machine speed now, not a stage")
    ref.counted = False
    out += await repeat(ref, reference, batches)
    out += await repeat(Stage("frame_decode", "frame decode (500 MQTT 5 PUBLISH)"), frame_decode, batches)

    async def validation(w: Watch, i: int) -> None:
        bodies = payloads(f"va{i}-")
        with w:
            for b in bodies:
                parse_packet(b, max_bytes=max_payload)

    validation_row = Stage("validation", "  of which validation", "gateway.packets.parse_packet per message")
    validation_row.counted = False

    async def rows(w: Watch, i: int) -> None:
        batch = inbound_batch(payloads(f"ro{i}-"))
        with w:
            messages, rejects = to_records(batch, max_payload)
        assert len(messages) == BATCH and not rejects

    out += await repeat(Stage("rows", "validation + row building", "gateway.ingest.to_records"), rows, batches)
    out += await repeat(validation_row, validation, batches)
    out += await repeat(Stage("ingest_metrics", "ingest metrics (per batch)"), ingest_metrics, batches)

    backends = [("sqlite", f"sqlite:///{sqlite_dir}/stages.db")]
    if pg_url is not None:
        backends.append(("postgres", pg_url))
    by_backend: dict[str, list[Stage]] = {}
    claimed: dict[str, list[Any]] = {}
    stored: dict[str, list[Any]] = {}
    proc: Any = None
    for backend, url in backends:
        rows_, claimed[backend], stored[backend], proc = await store_stages(backend, url, batches, max_payload)
        by_backend[backend] = rows_
    # Per stage, then per backend (SQLite above PostgreSQL).
    for k in range(len(by_backend["sqlite"])):
        out += [by_backend[b][k] for b, _ in backends]
    out += await sqlite_durability(sqlite_dir, batches, max_payload)
    rows_for_rules = claimed["sqlite"]

    async def rules(w: Watch, i: int) -> str:
        with w:
            path, _, new_events, _ = await plan(proc, rows_for_rules)
        assert len(new_events) == BATCH
        return path

    out += await repeat(Stage("rules", "rules + event build"), rules, batches)
    # Events as the store returned them (SQLite: one transaction's ids run on without a gap).
    events = stored["sqlite"]
    name, encode = _sse_encoder()

    async def encode_stage(w: Watch, i: int) -> str:
        with w:
            frames = encode(events)
        assert frames
        return name

    encode_row = Stage("event_encode", "  of which event encode (SSE frame)")
    encode_row.counted = False

    async def sse(w: Watch, i: int) -> str:
        return await sse_delivery(w, events)

    out += await repeat(Stage("sse_write", "SSE fan-out + write (incl. encode)"), sse, batches)
    out += await repeat(encode_row, encode_stage, batches)
    out += await repeat(
        [Stage("publish_encode", "outbound publish encode"), Stage("puback", "PUBACK handling")], outbound, batches
    )
    return summarize(out, [b for b, _ in backends])


def summarize(stages_: list[Stage], backends: list[str]) -> dict[str, Any]:
    """The stages as JSON, and the sum of the counted ones per backend (µs CPU per reading).

    Rows not ``counted`` ("of which ...") are parts of the row above them, shown for context.
    """
    totals: dict[str, float] = {}
    for backend in backends:
        other = [b for b in backends if b != backend]
        total = 0.0
        for s in stages_:
            if not s.counted or s.cpu_us is None or any(s.key.endswith("_" + o) for o in other):
                continue
            total += s.cpu_us
        totals[backend] = total
    return {
        "batch": BATCH,
        "stages": [
            {k: v for k, v in vars(s).items() if k != "samples"} | {"samples_cpu_us": s.samples} for s in stages_
        ],
        "total_cpu_us": totals,
    }


def stage_table(data: dict[str, Any]) -> str:
    """The stage budget as text."""
    from bench.harness import table

    if not data:
        return "stages: not measured"
    rows: list[list[Any]] = []
    for s in data["stages"]:
        mark = ""
        if s["error"]:
            rows.append([s["name"] + mark, None, None, f"not measured: {s['error']}"])
        else:
            rows.append([s["name"] + mark, s["cpu_us"], s["wall_us"], s["path"]])
    for backend, total in data["total_cpu_us"].items():
        note = "without the 'of which' rows (inside the row above them) and the synchronous/1 per commit ones"
        rows.append([f"sum of stages ({backend})", total, None, note])
    return table(
        f"stage budget: µs per reading, median of batches of {data['batch']} (CPU of this process; wall for context)",
        ["stage", "CPU µs", "wall µs", "path measured"],
        rows,
        left=(0, 3),
    )


async def _main_async(args: argparse.Namespace) -> dict[str, Any]:
    from bench.harness import Postgres, workdir

    with workdir("stages") as d:
        if args.pg_url:
            return await measure(pg_url=args.pg_url, sqlite_dir=d, quick=args.quick)
        with Postgres(d) as pg:
            return await measure(pg_url=pg.dsn, sqlite_dir=d, quick=args.quick)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--pg-url", help="an empty PostgreSQL database (default: a throwaway cluster)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    data = trio.run(_main_async, args)
    print(stage_table(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
