"""The only place paho-mqtt lives: its socket bridged into Trio, no paho thread.

One connection = one paho ``Client`` and one *generation* number. Inside a connection's nursery:

* reader: ``wait_readable`` → ``loop_read()`` while the socket (FIONREAD) or the SSL buffer
  (``pending()``) holds data, at most :data:`READ_CAP` packets per wakeup, then ONE
  ``inbound.send(batch)``. A full channel stops the reader, so the broker stops sending once
  Receive Maximum messages are unacknowledged (backpressure, never a drop).
* writer: woken by ``on_socket_register_write``; writes while ``want_write()``.
* housekeeping: ``loop_misc()`` every second (keepalive).
* publisher: drains the outbound queue with QoS 1, re-sends what the broker did not confirm.
  The queue is memory: what must survive a crash goes through the outbox (:mod:`gateway.publish`),
  which hands rows over with :meth:`MqttBridge.send` and hears back on the PUBACK (a reason code
  >= 0x80 is a refusal, reported as such, never counted as delivered).

paho callbacks only hand data over (append to a list, set an event, cancel the connection's scope).
They may fire from the ``connect()`` worker thread or from ``Client.__del__``: each checks that it
runs on the Trio thread and belongs to the live generation before touching anything.

Delivery: QoS 1, persistent session, ``manual_ack=True``; :meth:`MqttBridge.ack` sends PUBACKs
only after ingest committed, in arrival order. Acks for an older generation are dropped: the
broker redelivers those messages on the new connection and the store recognises the duplicates.
"""

from __future__ import annotations

import array
import fcntl
import logging
import ssl
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import MqttUnavailable
from gateway.health import ComponentHealth
from gateway.settings import MqttSettings

log = logging.getLogger("gateway.mqtt")
_paho_log = logging.getLogger("gateway.mqtt.paho")

READ_CAP = 2000
"""Packets read per socket wakeup before handing the batch over (bounds latency and memory)."""

TAKEOVER_REPEATS = 3
"""MQTT 3.1.1: this many drops in a row soon after CONNACK are reported as a session takeover."""

_SESSION_TAKEN_OVER = 0x8E

_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message received from the broker; ``generation`` is the connection it came on.

    ``topic_device``: the topic's level at the ``+`` of the subscribe filter when
    ``MQTT_DEVICE_FROM_TOPIC`` is on (the packet's ``device_id`` must equal it), else None.
    ``truncated_from``: the payload's size on the wire when only its first bytes were kept
    (a packet over ``MQTT_MAX_PACKET_SIZE``), else None.
    """

    topic: str
    payload: bytes
    received_at: datetime
    mid: int
    qos: int
    dup: bool
    generation: int
    topic_device: str | None = None
    truncated_from: int | None = None


OnPublished = Callable[[str | None], None]
"""Told the outcome of one publish: None when the broker confirmed it, else why it refused it."""


@dataclass(slots=True)
class _Outgoing:
    """A queued publish; ``sent_at`` is the monotonic time of the latest attempt."""

    topic: str
    payload: bytes
    queued_at: float
    sent_at: float = 0.0
    on_done: OnPublished | None = None


_PUBLISH = 0x30
_KEEP = 65536
"""Payload bytes kept of a PUBLISH over ``MQTT_MAX_PACKET_SIZE`` (the rest is read past, not held)."""
_HEAD = 2 + 65535 + 2 + 4
"""Room for a PUBLISH's variable header: topic length and topic, packet id, properties length."""
_READS_PER_CALL = 16
"""Socket reads one ``recv`` may spend skipping or collecting before it lets the reader yield."""


def mqtt_packet(cmd: int, body: bytes) -> bytes:
    """An MQTT packet: the command byte, the remaining length (a varint), then ``body``."""
    length = bytearray()
    n = len(body)
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (128 if n else 0))
        if not n:
            return bytes([cmd]) + bytes(length) + body


class _BufferedSocket:
    """The connected socket as paho sees it: a read buffer that knows where packets begin.

    paho 2.2 reads each packet in several small ``recv()`` calls and sends each packet with its
    own ``send()``; here one ``recv(65536)`` serves many packets, and the writer sends everything
    paho queued (a batch of PUBACKs, a run of publishes) with one :meth:`flush`.

    At each packet boundary it reads the fixed header first, which gives two controls paho lacks:

    * a gate: a PUBLISH is handed to paho only while ``room`` (messages) and ``room_bytes`` are
      left; otherwise ``blocked`` is set and paho sees "would block", so nothing more is read from
      the socket and TCP pushes back on the broker;
    * a size cap: a PUBLISH over ``max_packet`` bytes is never held whole. Its topic, packet id and
      first :data:`_KEEP` payload bytes are kept (MQTT 5 properties dropped), the rest is read and
      thrown away as it streams in, and paho gets the shortened packet; ``truncated`` maps its
      number (``publishes`` counts every PUBLISH handed over, in order) to the original payload size.

    Read errors (``BlockingIOError``, ``ssl.SSLWantReadError``, a closed peer) come from the
    underlying socket unchanged, exactly as paho expects.
    """

    __slots__ = (
        "_big",
        "_big_cmd",
        "_big_need",
        "_big_packet",
        "_big_remaining",
        "_buf",
        "_discard",
        "_left",
        "_max_packet",
        "_out",
        "_pos",
        "_raw",
        "_starved",
        "_v5",
        "blocked",
        "eof",
        "publishes",
        "room",
        "room_bytes",
        "truncated",
    )

    def __init__(self, raw: Any, *, max_packet: int = 268435460, v5: bool = False) -> None:
        self._raw = raw
        self._buf = b""
        self._pos = 0
        self._left = 0  # bytes of the current packet paho has not read yet
        self._out = bytearray()
        self._max_packet = max_packet
        self._v5 = v5
        self._big: bytearray | None = None  # head of an oversized PUBLISH, being collected
        self._big_cmd = 0
        self._big_remaining = 0
        self._big_need = 0
        self._big_packet: bytes | None = None  # its shortened form, handed over after the skip
        self._discard = 0
        self._starved = False
        self.eof = False
        """The peer closed the connection (the broker dropped us, e.g. for another client)."""
        self.room = 1 << 30
        self.room_bytes = 1 << 62
        self.blocked = False
        self.publishes = 0
        self.truncated: dict[int, int] = {}

    @property
    def buffered(self) -> int:
        """Bytes received that paho can make progress with now (0 while waiting for more)."""
        if self._starved or self.blocked:
            return 0
        return len(self._buf) - self._pos

    def recv(self, bufsize: int) -> bytes:
        if self._left == 0 and not self._next_packet():
            return b""
        if self._pos >= len(self._buf) and not self._fill():
            return b""
        end = self._pos + min(bufsize, self._left)
        chunk = self._buf[self._pos : end]
        self._pos += len(chunk)
        self._left -= len(chunk)
        return chunk

    def _fill(self) -> bool:
        """Read once from the socket into the buffer; False when the peer closed."""
        try:
            data: bytes = self._raw.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            self._starved = True
            raise
        except ConnectionResetError:
            self.eof = True
            raise
        if not data:
            self.eof = True
            return False
        self._starved = False
        if self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf, self._pos = self._buf[self._pos :] + data, 0
        return True

    def _next_packet(self) -> bool:
        """Move to the next packet paho may read (sets ``_left``); False when the peer closed.

        Raises ``BlockingIOError`` when the gate is shut or more bytes are needed first.
        """
        reads = 0
        while True:
            if self._big_packet is not None and not self._discard:
                packet, self._big_packet = self._big_packet, None
                self._buf, self._pos = packet + self._buf[self._pos :], 0
                self._left = len(packet)
                return True
            avail = len(self._buf) - self._pos
            if avail and self._discard:
                n = min(avail, self._discard)
                self._pos += n
                self._discard -= n
                continue
            if avail and self._big is not None:
                n = min(avail, self._big_need - len(self._big))
                self._big += self._buf[self._pos : self._pos + n]
                self._pos += n
                if len(self._big) == self._big_need:
                    self._shorten()
                continue
            busy = self._discard or self._big is not None
            header = self._header() if avail >= 2 and not busy else None
            if header is None:
                reads += 1
                if reads > _READS_PER_CALL:
                    raise BlockingIOError  # the reader yields to Trio, then calls again
                if not self._fill():
                    return False
                continue
            cmd, remaining, hlen = header
            if cmd & 0xF0 == _PUBLISH:
                if self.room <= 0 or self.room_bytes <= 0:
                    self.blocked = True
                    raise BlockingIOError
                self.room -= 1
                self.publishes += 1
                if hlen + remaining > self._max_packet:
                    self.room_bytes -= _KEEP
                    self._pos += hlen
                    self._big, self._big_cmd, self._big_remaining = bytearray(), cmd, remaining
                    self._big_need = min(remaining, _HEAD + _KEEP)
                    continue
                self.room_bytes -= remaining
            self._left = hlen + remaining
            return True

    def _header(self) -> tuple[int, int, int] | None:
        """(first byte, remaining length, header length) of the packet at ``_pos``; None if incomplete."""
        buf, pos = self._buf, self._pos
        remaining, mult, i = 0, 1, pos + 1
        while i < len(buf):
            byte = buf[i]
            remaining += (byte & 127) * mult
            i += 1
            if not byte & 128:
                return buf[pos], remaining, i - pos
            if i - pos > 4:  # a 5th length byte follows: hand it over, paho reports the protocol error
                return buf[pos], 0, 6
            mult *= 128
        return None

    def _shorten(self) -> None:
        """The collected head of an oversized PUBLISH becomes a short packet; skip the rest."""
        head, cmd, remaining = self._big, self._big_cmd, self._big_remaining
        assert head is not None
        self._big = None
        pos = 2 + int.from_bytes(head[0:2], "big") + (2 if cmd & 0x06 else 0)
        if pos > len(head):
            raise ConnectionError("malformed PUBLISH (topic longer than the packet)")
        var = bytes(head[:pos])
        if self._v5:  # drop the properties (we use none of an inbound publish's)
            plen, mult, i = 0, 1, pos
            while True:
                if i >= len(head) or i - pos >= 4:
                    raise ConnectionError("malformed PUBLISH (properties length)")
                byte = head[i]
                plen += (byte & 127) * mult
                i += 1
                if not byte & 128:
                    break
                mult *= 128
            pos = i + plen
            var += b"\x00"
        body = var + bytes(head[pos : pos + _KEEP])
        self.truncated[self.publishes] = max(0, remaining - pos)
        self._big_packet = mqtt_packet(cmd, body)
        self._discard = remaining - len(head)

    def pending(self) -> int:
        extra = self._raw.pending() if hasattr(self._raw, "pending") else 0
        return self.buffered + int(extra)

    def send(self, data: bytes | bytearray) -> int:
        # Taken whole: the writer flushes after paho has queued everything it had.
        self._out += data
        return len(data)

    def flush(self) -> bool:
        """Send what is buffered; True when all of it went, False when the socket is full."""
        while self._out:
            try:
                sent = int(self._raw.send(self._out))
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del self._out[:sent]
        return True

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def close(self) -> None:
        self._raw.close()

    def setblocking(self, flag: bool) -> None:
        self._raw.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@dataclass(eq=False)
class _Connection:
    """State of one connection (one paho client, one generation)."""

    generation: int
    client: paho.Client
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sock: Any = None
    rbuf: _BufferedSocket | None = None
    batch: list[Inbound] = field(default_factory=list)
    write_wanted: trio.Event = field(default_factory=trio.Event)
    connack: trio.Event = field(default_factory=trio.Event)
    connack_failure: str | None = None
    refused: bool = False  # the CONNACK refusal is one no retry fixes (credentials, client id)
    connack_at: float | None = None
    ready: bool = False  # CONNACK, and SUBACK unless the session was present
    taken_over: bool = False
    session_present: bool = False
    broker_receive_max: int | None = None
    suback: trio.Event = field(default_factory=trio.Event)
    suback_failure: str | None = None
    sub_mid: int | None = None
    lost: str | None = None
    unconfirmed: dict[int, _Outgoing] = field(default_factory=dict)
    confirmed: trio.Event = field(default_factory=trio.Event)
    inflight: int = 0  # messages handed to ingest and not acked yet (QoS 0 until committed)
    inflight_bytes: int = 0  # their payload bytes
    room: trio.Event = field(default_factory=trio.Event)  # set by ack(): the reader may go on
    delivered: int = 0  # PUBLISH packets paho handed to on_message (matches rbuf.publishes)

    def lose(self, reason: str) -> None:
        """Mark the connection dead (first reason wins) and stop its tasks."""
        if self.lost is None:
            self.lost = reason
        self.scope.cancel()


class MqttBridge:
    """The broker connection: inbound QoS 1 stream, manual acks, and a QoS 1 outbound queue.

    Also satisfies :class:`gateway.publish.Publisher`. The outbound queue is created here, so
    queued publishes survive restarts of :meth:`run` (and the broker being down), but not the
    process: durable publishes come from the outbox.
    """

    def __init__(self, settings: MqttSettings, health: ComponentHealth) -> None:
        self.settings = settings
        self._health = health
        self._device_level = settings.device_level
        self._out_send, self._out_recv = trio.open_memory_channel[_Outgoing](settings.outbound_queue)
        # Publishes taken off the queue but not confirmed by a PUBACK yet, oldest first; they
        # are re-sent on the next connection.
        self._resend: deque[_Outgoing] = deque()
        self._conn: _Connection | None = None
        self._generation = 0
        self._trio_thread: int | None = None
        self._ever_connected = False
        self.connected = False
        self.reconnects = 0
        # A connection that lasted this long was not in a fight over its client id (a rival with
        # the same settings reconnects within reconnect_max): only then the backoff starts over.
        self._stable_after = max(5.0, 2 * settings.reconnect_max)
        self._early_drops = 0
        self._takeover: str | None = None
        self.takeovers = 0
        self._set_detail()

    # ----------------------------------------------------------------------------------- public

    async def run(
        self,
        inbound: trio.MemorySendChannel[list[Inbound]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, subscribe, stream messages into ``inbound``; reconnect forever with backoff.

        Reports started after CONNACK and SUBACK (CONNACK alone when the broker kept our session:
        it may send the backlog first), or after the first failed attempt (health
        ``degraded``) so the gateway can start without its broker. Does not close ``inbound``.
        Runs until cancelled.
        """
        self._trio_thread = threading.get_ident()
        s = self.settings
        backoff = Backoff(s.reconnect_min, s.reconnect_max)
        started = False
        while True:
            self._generation += 1
            conn = _Connection(self._generation, self._make_client(self._generation))
            self._conn = conn
            ready = False
            try:
                ready = await self._connection(conn, inbound, task_status if not started else None)
            finally:
                was_connected = self.connected
                self._conn = None
                self._set_connected(False)
                self._drop_connection(conn)
            if ready:
                started = True
            reason = conn.lost or "closed"
            lived = time.monotonic() - conn.connack_at if conn.connack_at is not None else None
            if was_connected:
                log.warning("disconnected host=%s generation=%d reason=%s", s.host, conn.generation, reason)
            else:
                log.warning("connect failed host=%s port=%d reason=%s", s.host, s.port, reason)
            if lived is not None and lived >= self._stable_after:
                backoff.reset()  # a short-lived connection (a takeover fight, a flapping link) keeps growing it
            takeover = self._takeover_cause(conn, lived)
            if takeover is not None:
                self._takeover = takeover
                self.takeovers += 1
                self._set_detail()
                metrics.MQTT_TAKEOVERS.inc()
                log.error("%s; reconnecting with growing backoff", takeover)
            if conn.refused:
                self._health.set("degraded", f"broker: {reason}", code="mqtt_refused", refused=True)
            else:
                self._health.set("degraded", self._takeover or f"broker: {reason}", code="mqtt_unavailable")
            if not started:
                started = True
                task_status.started()
            delay = backoff.next()
            log.info("reconnecting in=%.2fs attempt=%d", delay, backoff.attempt)
            await trio.sleep(delay)

    def ack(self, messages: Sequence[Inbound]) -> None:
        """Acknowledge committed messages (PUBACK), in the given (arrival) order.

        Messages from an older connection are skipped: the broker redelivers them.
        """
        conn = self._conn
        if conn is None or conn.lost is not None:
            return
        gen = conn.generation
        client = conn.client
        n = size = 0
        for m in messages:
            if m.generation == gen:
                if m.qos > 0:
                    client.ack(m.mid, m.qos)
                n += 1
                size += len(m.payload)
        if n:
            conn.inflight -= n
            conn.inflight_bytes -= size
            metrics.MQTT_INFLIGHT.set(conn.inflight)
            metrics.MQTT_INFLIGHT_BYTES.set(conn.inflight_bytes)
            conn.room.set()

    async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue a QoS 1 publish on the publish topic (or ``<topic>/<subtopic>``); waits for room."""
        await self._out_send.send(_Outgoing(self._topic(subtopic), payload, time.monotonic()))
        self._queue_gauge()

    async def send(self, payload: bytes, subtopic: str | None, on_done: OnPublished) -> None:
        """Queue a QoS 1 publish whose outcome ``on_done`` hears (on the Trio thread): None on a
        PUBACK with success, else the refusal (e.g. ``Not authorized``). Waits for room.
        Re-sent after a reconnect until the broker answers; lost only with the process."""
        await self._out_send.send(_Outgoing(self._topic(subtopic), payload, time.monotonic(), on_done=on_done))
        self._queue_gauge()

    def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue a QoS 1 publish; raises :class:`MqttUnavailable` when the queue is full."""
        try:
            self._out_send.send_nowait(_Outgoing(self._topic(subtopic), payload, time.monotonic()))
        except trio.WouldBlock:
            limit = self.settings.outbound_queue
            raise MqttUnavailable(f"outbound MQTT queue full ({limit} publishes)") from None
        self._queue_gauge()

    # ---------------------------------------------------------------------------- connection

    async def _connection(
        self,
        conn: _Connection,
        inbound: trio.MemorySendChannel[list[Inbound]],
        task_status: trio.TaskStatus[None] | None,
    ) -> bool:
        """Run one connection until it is lost; returns whether it got as far as subscribed."""
        s = self.settings
        client = conn.client
        with conn.scope:
            # connect() blocks (DNS, TCP, TLS handshake): a worker thread, under the timeout.
            with trio.move_on_after(s.connect_timeout) as cs:
                try:
                    await trio.to_thread.run_sync(self._connect_blocking, client, abandon_on_cancel=True)
                except (OSError, ValueError) as exc:
                    conn.lose(_describe(exc))
                    return False
            if cs.cancelled_caught:
                conn.lose(f"connect timed out after {s.connect_timeout}s")
                return False
            raw = client.socket()
            if raw is None:
                conn.lose("no socket after connect")
                return False
            # paho reads a packet in three or more recv() calls (type, length, body): give it a
            # buffer filled by one large recv per burst instead of a syscall per field.
            conn.sock = raw
            conn.rbuf = _BufferedSocket(raw, max_packet=s.max_packet_size, v5=s.protocol == "5")
            client._sock = conn.rbuf
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, conn, inbound)
                nursery.start_soon(self._writer, conn)
                nursery.start_soon(self._housekeeping, conn)
                conn.write_wanted.set()  # CONNECT was queued on the connect thread
                if not await self._handshake(conn):
                    return False
                self._on_ready(conn)
                if task_status is not None:
                    task_status.started()
                nursery.start_soon(self._publisher, conn)
        # Reached when conn.lose() cancelled the scope (never by a plain return of the nursery).
        return conn.ready

    async def _acknowledged(self, conn: _Connection, ack: trio.Event, what: str) -> bool:
        """Wait up to the connect timeout for ``ack``; a silent broker loses the connection."""
        with trio.move_on_after(self.settings.connect_timeout):
            await ack.wait()
        if not ack.is_set():
            conn.lose(f"no {what} in time")
            return False
        return True

    async def _handshake(self, conn: _Connection) -> bool:
        """Wait for CONNACK, subscribe, wait for SUBACK; False (connection lost) on failure."""
        s = self.settings
        if not await self._acknowledged(conn, conn.connack, "CONNACK"):
            return False
        if conn.connack_failure is not None:
            conn.lose(f"broker refused the connection: {conn.connack_failure}")
            return False
        if s.protocol == "5":
            rc, mid = conn.client.subscribe(s.subscription, options=SubscribeOptions(qos=1))
        else:
            rc, mid = conn.client.subscribe(s.subscription, qos=1)
        if rc != _SUCCESS:
            conn.lose(f"subscribe failed: {paho.error_string(rc)}")
            return False
        conn.sub_mid = mid
        if conn.session_present:
            # The broker may send the session's backlog before the SUBACK, and the reader takes
            # only our own window of it until ingest acks: waiting here could wait for ever.
            # The subscription is in the session already; a refusal still ends the connection.
            return True
        if not await self._acknowledged(conn, conn.suback, "SUBACK"):
            return False
        if conn.suback_failure is not None:
            conn.lose(f"subscription {s.subscription!r} refused: {conn.suback_failure}")
            return False
        return True

    def _on_ready(self, conn: _Connection) -> None:
        s = self.settings
        conn.ready = True
        if self._ever_connected:
            self.reconnects += 1
            metrics.MQTT_RECONNECTS.inc()
        self._ever_connected = True
        self._set_connected(True)
        if self._takeover is None:
            self._health.set("ok")
        else:  # until the session stays ours for a while (see _housekeeping)
            self._health.set("degraded", f"{self._takeover} (connected again, watching)")
        log.info(
            "connected host=%s port=%d client_id=%s protocol=%s session_present=%s subscription=%s generation=%d",
            s.host,
            s.port,
            s.client_id,
            s.protocol,
            conn.session_present,
            s.subscription,
            conn.generation,
        )
        if not conn.session_present:
            log.warning(
                "no session on the broker client_id=%s: messages published while the gateway was away "
                "were not kept (normal on the very first start, or after the session expired)",
                s.client_id,
            )

    def _connect_blocking(self, client: paho.Client) -> None:
        """Runs in a worker thread: TCP (+TLS) connect and queue CONNECT."""
        s = self.settings
        if s.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.session_expiry
            props.ReceiveMaximum = s.receive_maximum
            props.MaximumPacketSize = s.max_packet_size  # the broker drops bigger ones for us
            client.connect(s.host, s.port, keepalive=s.keepalive, clean_start=False, properties=props)
        else:
            client.connect(s.host, s.port, keepalive=s.keepalive)

    def _make_client(self, generation: int) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        # An exception in a callback would make paho deliver the same message again.
        client.suppress_exceptions = True
        # ...but then paho only reports a callback's exception through its logger.
        client.enable_logger(_paho_log)
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.receive_maximum)
        if s.username is not None:
            client.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls:
            client.tls_set_context(self._tls_context())
        client.on_connect = lambda c, u, flags, rc, props: self._cb_connect(generation, flags, rc, props)
        client.on_subscribe = lambda c, u, mid, rcs, props: self._cb_subscribe(generation, mid, rcs)
        client.on_message = lambda c, u, msg: self._cb_message(generation, msg)
        client.on_publish = lambda c, u, mid, rc, props: self._cb_publish(generation, mid, rc)
        client.on_disconnect = lambda c, u, flags, rc, props: self._cb_disconnect(generation, flags, rc)
        client.on_socket_close = lambda c, u, sock: self._cb_socket_close(generation, sock)
        client.on_socket_register_write = lambda c, u, sock: self._cb_register_write(generation)
        return client

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        cafile = str(s.ca_file) if s.ca_file else None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if s.cert_file is not None:
            ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
        return ctx

    def _drop_connection(self, conn: _Connection) -> None:
        """Close the socket (if paho did not) and keep unconfirmed publishes for the next connection."""
        if conn.unconfirmed:
            pending = [*conn.unconfirmed.values(), *self._resend]
            self._resend = deque(sorted(pending, key=lambda o: o.queued_at))
            conn.unconfirmed.clear()
        sock = conn.client.socket()
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            # Stopping (not lost): send DISCONNECT if the socket takes it at once. The session, and
            # every unacked message in it, stays on the broker.
            if conn.lost is None:
                try:
                    conn.client.disconnect()
                    conn.client.loop_write()
                    if conn.rbuf is not None:
                        conn.rbuf.flush()
                except OSError:
                    pass
            if conn.client.socket() is not None:
                conn.client._sock_close()  # paho has no public "close now"
        if conn.lost is None:
            conn.lost = "stopped"
        metrics.MQTT_INFLIGHT.set(0)
        metrics.MQTT_INFLIGHT_BYTES.set(0)
        self._queue_gauge()

    # ------------------------------------------------------------------------------ tasks

    async def _reader(self, conn: _Connection, inbound: trio.MemorySendChannel[list[Inbound]]) -> None:
        """Read bursts of packets and hand each burst over as one batch.

        Our own window, whatever the broker does with Receive Maximum: at most
        ``MQTT_RECEIVE_MAXIMUM`` messages and about ``MQTT_INFLIGHT_BYTES`` payload bytes are
        between the socket and the ack. At either limit the reader stops reading the socket until
        ingest acks, so TCP pushes back on the broker.
        """
        client, sock, rbuf = conn.client, conn.sock, conn.rbuf
        assert rbuf is not None
        cap, budget = self.settings.receive_maximum, self.settings.inflight_bytes
        ssl_sock = isinstance(sock, ssl.SSLSocket)
        fionread = array.array("i", [0])
        fd = sock.fileno()

        def pending() -> bool:
            if rbuf.buffered:
                return True
            if ssl_sock:
                return bool(sock.pending())
            fcntl.ioctl(fd, termios.FIONREAD, fionread)
            return fionread[0] > 0

        while True:
            if conn.inflight >= cap or conn.inflight_bytes >= budget or rbuf.blocked:
                # Set by any ack since the last wait (also one that came while we handed over).
                await conn.room.wait()
                conn.room = trio.Event()
                rbuf.blocked = False
                continue
            rbuf.room, rbuf.room_bytes = cap - conn.inflight, budget - conn.inflight_bytes
            if pending():
                await trio.lowlevel.checkpoint()
            else:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    conn.lose("socket closed")
                    return
            for _ in range(READ_CAP):
                rc = client.loop_read()
                if rc != _SUCCESS:
                    conn.lose(f"read: {paho.error_string(rc)}")
                    break
                if conn.lost is not None or rbuf.blocked or not pending():
                    break
            if conn.batch:
                batch, conn.batch = conn.batch, []
                conn.inflight += len(batch)
                conn.inflight_bytes += sum(len(m.payload) for m in batch)
                metrics.MQTT_RECEIVED.inc(len(batch))
                metrics.MQTT_INFLIGHT.set(conn.inflight)
                metrics.MQTT_INFLIGHT_BYTES.set(conn.inflight_bytes)
                # Blocks while ingest is behind: we stop reading, the broker stops sending.
                await inbound.send(batch)
            if conn.lost is not None:
                return

    async def _writer(self, conn: _Connection) -> None:
        client = conn.client
        while True:
            await conn.write_wanted.wait()
            conn.write_wanted = trio.Event()
            while True:
                # paho "sends" every queued packet into our buffer at once...
                while client.want_write():
                    rc = client.loop_write()
                    if rc != _SUCCESS:
                        conn.lose(f"write: {paho.error_string(rc)}")
                        return
                    if client.want_write():
                        await self._wait_writable(conn)
                        if conn.lost is not None:
                            return
                # ...and one send() takes them all to the socket.
                try:
                    done = conn.rbuf.flush() if conn.rbuf is not None else True
                except OSError as exc:
                    conn.lose(f"write: {_describe(exc)}")
                    return
                if done:
                    break
                await self._wait_writable(conn)
                if conn.lost is not None:
                    return

    async def _wait_writable(self, conn: _Connection) -> None:
        try:
            await trio.lowlevel.wait_writable(conn.sock)
        except trio.ClosedResourceError:
            conn.lose("socket closed")

    async def _housekeeping(self, conn: _Connection) -> None:
        while True:
            await trio.sleep(1.0)
            rc = conn.client.loop_misc()
            if rc != _SUCCESS:
                conn.lose(f"keepalive: {paho.error_string(rc)}")
                return
            held = time.monotonic() - conn.connack_at if conn.connack_at is not None else 0.0
            if self._takeover is not None and self.connected and held >= self._stable_after:
                log.info("session kept for %.0fs: no other client takes it over now", held)
                self._takeover = None
                self._early_drops = 0
                self._health.set("ok")

    def _takeover_cause(self, conn: _Connection, lived: float | None) -> str | None:
        """Why this connection ended, when another client with our id took the session; else None.

        MQTT 5 says so (DISCONNECT 0x8E). MQTT 3.1.1 only closes the socket: a connection the
        broker closes soon after CONNACK, :data:`TAKEOVER_REPEATS` times in a row, is reported as
        a probable takeover. A failed connect (the broker is away) starts the count over.
        """
        cid = self.settings.client_id
        if conn.taken_over:
            self._early_drops = 0
            return f"another client with id {cid!r} took the session over (broker DISCONNECT 0x8E)"
        if lived is None or lived >= self._stable_after or conn.rbuf is None or not conn.rbuf.eof:
            self._early_drops = 0
            return None
        self._early_drops += 1
        if self._early_drops < TAKEOVER_REPEATS:
            return None
        return (
            f"another client with id {cid!r} probably took the session over: the broker closed the connection "
            f"{self._early_drops} times in a row within {self._stable_after:.0f}s of accepting it"
        )

    async def _publisher(self, conn: _Connection) -> None:
        """Send queued publishes, re-sends first, keeping at most the broker's window unconfirmed.

        An item stays in ``_resend`` until paho took it, so a connection lost (or the gateway
        stopped) while waiting never loses it.
        """
        window = self.settings.receive_maximum
        if conn.broker_receive_max is not None:
            window = min(window, conn.broker_receive_max)
        if self._resend:
            log.info("re-sending unconfirmed publishes count=%d", len(self._resend))
        while True:
            while self._resend:
                while len(conn.unconfirmed) >= window:
                    await conn.confirmed.wait()
                    conn.confirmed = trio.Event()
                item = self._resend[0]
                item.sent_at = time.monotonic()
                info = conn.client.publish(item.topic, item.payload, qos=1)
                if info.rc != _SUCCESS:
                    conn.lose(f"publish: {paho.error_string(info.rc)}")
                    await trio.lowlevel.checkpoint()
                    return
                self._resend.popleft()
                conn.unconfirmed[info.mid] = item
                self._queue_gauge()
            # No checkpoint between receive() returning and the append: the item cannot get lost.
            self._resend.append(await self._out_recv.receive())

    # -------------------------------------------------------------------------- callbacks

    def _live(self, generation: int) -> _Connection | None:
        """The connection a callback belongs to, if it is live and we are on the Trio thread."""
        conn = self._conn
        if conn is None or conn.generation != generation or threading.get_ident() != self._trio_thread:
            return None
        return conn

    def _cb_message(self, generation: int, msg: paho.MQTTMessage) -> None:
        conn = self._conn
        if conn is None or conn.generation != generation:
            return
        try:
            topic = msg._topic.decode("utf-8", "replace")  # .topic raises on bad UTF-8
            payload = bytes(msg.payload)
            device = None
            if self._device_level is not None:
                levels = topic.split("/")
                device = levels[self._device_level] if len(levels) > self._device_level else ""
            conn.delivered += 1
            cut = conn.rbuf.truncated.pop(conn.delivered, None) if conn.rbuf and conn.rbuf.truncated else None
            conn.batch.append(
                Inbound(topic, payload, datetime.now(UTC), msg.mid, msg.qos, bool(msg.dup), generation, device, cut)
            )
        except Exception:  # never let paho see an exception: it would redeliver
            log.exception("cannot take a message mid=%s", getattr(msg, "mid", None))

    def _cb_connect(self, generation: int, flags: Any, rc: Any, props: Any) -> None:
        conn = self._live(generation)
        if conn is None:
            return
        if rc.is_failure:
            conn.connack_failure = str(rc)
            conn.refused = rc.value in _REFUSED_CONNACK
            conn.lose(f"broker refused the connection: {rc}")
        else:
            conn.connack_at = time.monotonic()
        conn.session_present = bool(flags.session_present)
        rm = getattr(props, "ReceiveMaximum", None) if props is not None else None
        conn.broker_receive_max = int(rm) if rm else None
        conn.connack.set()

    def _cb_subscribe(self, generation: int, mid: int, rcs: Sequence[Any]) -> None:
        conn = self._live(generation)
        if conn is None or mid != conn.sub_mid:
            return
        bad = [str(rc) for rc in rcs if rc.is_failure]
        if bad:
            conn.suback_failure = ", ".join(bad)
            if conn.ready:
                conn.lose(f"subscription {self.settings.subscription!r} refused: {conn.suback_failure}")
        conn.suback.set()

    def _cb_publish(self, generation: int, mid: int, rc: Any) -> None:
        # Runs under paho's own mutex: only bookkeeping here, and on_done must not publish.
        conn = self._live(generation)
        if conn is None:
            return
        item = conn.unconfirmed.pop(mid, None)
        if item is None:
            return
        conn.confirmed.set()
        self._queue_gauge()
        refusal: str | None = None
        if getattr(rc, "is_failure", False):  # MQTT 5 PUBACK reason code >= 0x80
            code = f"0x{int(getattr(rc, 'value', 0)):02x}"
            refusal = f"broker refused the publish: {rc} ({code})"
            metrics.MQTT_PUBLISH_REFUSED.labels(code).inc()
            log.warning("publish refused topic=%s reason=%r code=%s", item.topic, str(rc), code)
        else:
            metrics.MQTT_PUBLISHED.inc()
            metrics.MQTT_PUBLISH_LATENCY.observe(time.monotonic() - item.sent_at)
        if item.on_done is not None:
            try:
                item.on_done(refusal)
            except Exception:  # never let paho see an exception
                log.exception("publish outcome callback failed topic=%s", item.topic)

    def _cb_disconnect(self, generation: int, flags: Any, rc: Any) -> None:
        # Fires twice on a keepalive timeout, and from loop_read/loop_write/loop_misc.
        conn = self._live(generation)
        if conn is None:
            return
        if getattr(flags, "is_disconnect_packet_from_server", False):
            # paho closed the socket first ("socket closed"): the broker's reason says more.
            conn.lost = f"broker sent DISCONNECT: {rc}"
            conn.taken_over = getattr(rc, "value", None) == _SESSION_TAKEN_OVER
        conn.lose(f"disconnected: {rc}")

    def _cb_socket_close(self, generation: int, sock: Any) -> None:
        # Also called from Client.__del__ (any thread, possibly after Trio ended).
        conn = self._live(generation)
        if conn is not None:
            trio.lowlevel.notify_closing(sock)  # wake (with ClosedResourceError) whoever waits on it
            conn.lose("socket closed")

    def _cb_register_write(self, generation: int) -> None:
        conn = self._live(generation)
        if conn is not None:
            conn.write_wanted.set()

    # ---------------------------------------------------------------------------- helpers

    def _topic(self, subtopic: str | None) -> str:
        base = self.settings.publish_topic
        return f"{base}/{subtopic}" if subtopic else base

    def _set_connected(self, value: bool) -> None:
        self.connected = value
        metrics.MQTT_CONNECTED.set(1 if value else 0)
        self._set_detail()

    def _set_detail(self) -> None:
        self._health.detail.update(
            connected=self.connected,
            reconnects=self.reconnects,
            takeovers=self.takeovers,
            broker=f"{self.settings.host}:{self.settings.port}",
        )

    def _queue_gauge(self) -> None:
        conn = self._conn
        waiting = self._out_recv.statistics().current_buffer_used + len(self._resend)
        metrics.MQTT_PUBLISH_QUEUE.set(waiting + (len(conn.unconfirmed) if conn else 0))


# CONNACK reason codes no retry fixes (MQTT 5 values; paho maps 3.1.1 return codes 1, 2, 4, 5 onto
# them): unsupported protocol version, client id not valid, bad user name or password, not
# authorised, banned, bad authentication method.
_REFUSED_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ssl.SSLError) else f"TLS: {text}"


__all__ = ["READ_CAP", "Inbound", "MqttBridge", "OnPublished"]
