"""The only place paho-mqtt lives: its socket bridged into Trio, no paho thread.

One connection = one paho ``Client`` and one *generation* number. Inside a connection's nursery:

* reader: ``wait_readable`` → ``recv`` while the socket (or the SSL buffer) holds data, up to
  1 MiB per wakeup; the QoS 0/1 PUBLISH frames are decoded by :mod:`gateway.mqtt_codec` into
  :class:`Inbound` (one timestamp per burst), every other frame goes to paho's ``loop_read()``
  in stream order (paho still does CONNACK, SUBACK, PINGRESP, DISCONNECT), except the PUBACKs
  for our publishes, settled per burst; then ONE ``inbound.send(batch)``. A full channel stops
  the reader, so the broker stops sending once Receive Maximum messages are unacknowledged
  (backpressure, never a drop). A malformed frame loses the connection.
* writer: woken by ``on_socket_register_write`` or by our own batches; one ``send`` takes what
  paho queued and our PUBACKs / PUBLISHes (one write buffer, so packet order is kept).
* housekeeping: ``loop_misc()`` every second (keepalive).
* publisher: drains the outbound queue with QoS 1, everything waiting encoded together by us
  (not paho), re-sends what the broker did not confirm. The queue is memory: what must survive
  a crash goes through the outbox (:mod:`gateway.publish`), which hands rows over with
  :meth:`MqttBridge.send_many` and hears back on the PUBACK (a reason code >= 0x80 is a
  refusal, reported as such, never counted as delivered).

paho callbacks only hand data over (append to a list, set an event, cancel the connection's scope).
They may fire from the ``connect()`` worker thread or from ``Client.__del__``: each checks that it
runs on the Trio thread and belongs to the live generation before touching anything.

Delivery: QoS 1, persistent session, ``manual_ack=True``; :meth:`MqttBridge.ack` sends PUBACKs
only after ingest committed, in arrival order, encoded together and written in one send. Acks
for an older generation are dropped: the broker redelivers those messages on the new connection
and the store recognises the duplicates. :meth:`MqttBridge.leave` (a graceful stop with
``MQTT_SESSION_EXPIRY=0``) unsubscribes and drains before the disconnect ends the session.
"""

from __future__ import annotations

import logging
import ssl
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
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import MqttUnavailable
from gateway.health import ComponentHealth
from gateway.mqtt_codec import (
    PUBACK,
    Frame,
    FrameDecoder,
    MqttCodecError,
    Publish,
    decode_puback,
    encode_pubacks,
    encode_publish,
)
from gateway.settings import MqttSettings

log = logging.getLogger("gateway.mqtt")
_paho_log = logging.getLogger("gateway.mqtt.paho")

TAKEOVER_REPEATS = 3
"""MQTT 3.1.1: this many drops in a row soon after CONNACK are reported as a session takeover."""

_SESSION_TAKEN_OVER = 0x8E

LEAVE_QUIET = 0.5
"""Seconds without a byte from the broker after which :meth:`MqttBridge.leave` counts the
session's queue as drained (the broker sends what it holds at once, not in trickles)."""

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
    qos: int = 1


_READ_BURST = 1 << 20
"""Bytes read from the socket per wakeup at most before decoding (bounds latency and memory)."""
_RECV = 65536


class _Link:
    """The connected socket as paho sees it after CONNACK's read path is ours.

    The reader reads the raw socket itself and decodes the PUBLISH frames of the hot path
    (:mod:`gateway.mqtt_codec`); every other frame (CONNACK, SUBACK, PUBACK, PINGRESP,
    DISCONNECT, QoS 2 flow) is put in :attr:`feed` and paho reads it from there with
    ``loop_read()``. A closed peer or a read error reaches paho the same way, once the frames
    before it were handled (:meth:`end_of_stream`).

    Writes: paho's ``send()`` lands in :attr:`out` whole, and so do our batches of PUBACKs, in
    the order they were produced; the writer sends it all with one :meth:`flush`.
    """

    __slots__ = ("_closing", "_feed", "_feed_pos", "_raw", "eof", "error", "out")

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._feed = b""
        self._feed_pos = 0
        self._closing = False
        self.out = bytearray()
        self.eof = False
        """The peer closed the connection (the broker dropped us, e.g. for another client)."""
        self.error: OSError | None = None

    def give(self, data: bytes) -> None:
        """Queue a whole frame for paho's next ``loop_read()``."""
        if self._feed_pos >= len(self._feed):
            self._feed, self._feed_pos = data, 0
        else:
            self._feed = self._feed[self._feed_pos :] + data
            self._feed_pos = 0

    @property
    def fed(self) -> bool:
        """Whether paho has frames left to read."""
        return self._feed_pos < len(self._feed)

    def end_of_stream(self) -> None:
        """From now on paho's reads see the peer's close (or the read error)."""
        self._closing = True

    def read(self) -> bytes | None:
        """One ``recv`` from the socket: data, b"" at end of stream, None when it would block."""
        try:
            data: bytes = self._raw.recv(_RECV)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except OSError as exc:  # reset by the peer, TLS failure: paho reports it
            self.error = exc
            self.eof = isinstance(exc, ConnectionResetError)  # the peer closed, as before
            return b""
        if not data:
            self.eof = True
        return data

    def recv(self, bufsize: int) -> bytes:
        if self._feed_pos < len(self._feed):
            end = self._feed_pos + bufsize
            chunk = self._feed[self._feed_pos : end]
            self._feed_pos += len(chunk)
            return chunk
        if self._closing:
            if self.error is not None:
                raise self.error
            return b""
        raise BlockingIOError

    def pending(self) -> int:
        return len(self._feed) - self._feed_pos

    def send(self, data: bytes | bytearray) -> int:
        # Taken whole: the writer flushes after paho has queued everything it had.
        self.out += data
        return len(data)

    def flush(self) -> bool:
        """Send what is buffered; True when all of it went, False when the socket is full."""
        while self.out:
            try:
                sent = int(self._raw.send(self.out))
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del self.out[:sent]
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
    link: _Link | None = None
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
    unsuback: trio.Event = field(default_factory=trio.Event)
    unsub_mid: int | None = None
    lost: str | None = None
    unconfirmed: dict[int, _Outgoing] = field(default_factory=dict)
    confirmed: trio.Event = field(default_factory=trio.Event)
    inflight: int = 0  # messages handed to ingest and not acked yet (QoS 0 until committed)
    inflight_bytes: int = 0  # their payload bytes
    room: trio.Event = field(default_factory=trio.Event)  # set by ack(): the reader may go on
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # of the latest read burst
    paho_cut: int | None = None  # truncated_from of the PUBLISH handed to paho right now
    heard_at: float = field(default_factory=time.monotonic)  # last bytes read (keepalive: _housekeeping)

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

    def __init__(
        self, settings: MqttSettings, health: ComponentHealth, *, subscribe: bool = True, persistent: bool = True
    ) -> None:
        """``subscribe=False``: publish only (no SUBSCRIBE). ``persistent=False``: a clean
        session each connection, kept by the broker for no time (the simulator's publisher)."""
        self.settings = settings
        self._health = health
        self._subscribe = subscribe
        self._persistent = persistent
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

    def reconfigure(self, settings: MqttSettings) -> None:
        """Use ``settings`` from the next connection on (the app restarts :meth:`run` to reconnect).

        ``outbound_queue`` sizes the queue made here: it applies with the next process.
        """
        self.settings = settings
        self._device_level = settings.device_level
        self._stable_after = max(5.0, 2 * settings.reconnect_max)
        self._set_detail()

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
        mids: list[int] = []
        n = size = 0
        for m in messages:
            if m.generation == gen:
                if m.qos == 1:
                    mids.append(m.mid)
                elif m.qos == 2:
                    conn.client.ack(m.mid, 2)
                n += 1
                size += len(m.payload)
        if mids and conn.link is not None:
            # All of them in one write, behind whatever paho queued before (packet order kept).
            conn.link.out += encode_pubacks(mids)
            conn.write_wanted.set()
        if n:
            conn.inflight -= n
            conn.inflight_bytes -= size
            metrics.MQTT_INFLIGHT.set(conn.inflight)
            metrics.MQTT_INFLIGHT_BYTES.set(conn.inflight_bytes)
            conn.room.set()

    async def leave(self) -> bool:
        """Leave the subscription without losing a reading (a member removed from its share group
        for good): UNSUBSCRIBE, then wait until the broker has sent nothing for
        :data:`LEAVE_QUIET` seconds and everything received is committed and acknowledged.

        After the UNSUBACK the broker still delivers what it had queued for this session; new
        readings go to the other members. Returns True when drained, False without a live
        subscribed connection or when the connection is lost meanwhile. The caller bounds the
        wait with a cancel scope, then stops the bridge as usual.
        """
        conn = self._conn
        if conn is None or not conn.ready or not self._subscribe or conn.lost is not None:
            return False
        rc, mid = conn.client.unsubscribe(self.settings.subscription)
        if rc != _SUCCESS:
            return False
        conn.unsub_mid = mid
        conn.write_wanted.set()
        with trio.move_on_after(self.settings.connect_timeout):
            await conn.unsuback.wait()
        if not conn.unsuback.is_set() or conn.lost is not None:
            return False
        log.info("unsubscribed subscription=%s: draining what the broker holds for us", self.settings.subscription)
        while conn.lost is None:
            quiet = (datetime.now(UTC) - conn.received_at).total_seconds()
            if conn.inflight == 0 and quiet >= LEAVE_QUIET:
                log.info("drained: every message received is committed and acknowledged")
                return True
            await trio.sleep(0.05)
        return False

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

    async def send_many(self, items: Sequence[tuple[bytes, str | None, OnPublished]]) -> None:
        """:meth:`send` for many (payload, subtopic, on_done) at once: queued without a checkpoint
        each while there is room (the publisher then encodes and writes them together)."""
        await self.send_to_many([(self._topic(subtopic), payload, on_done) for payload, subtopic, on_done in items])

    async def send_to_many(self, items: Sequence[tuple[str, bytes, OnPublished | None]], *, qos: int = 1) -> None:
        """Queue publishes to any topics, (topic, payload, on_done) each, as :meth:`send_many`.

        QoS 0: written once, never re-sent, ``on_done`` not called.
        """
        now = time.monotonic()
        for topic, payload, on_done in items:
            item = _Outgoing(topic, payload, now, on_done=on_done, qos=qos)
            try:
                self._out_send.send_nowait(item)
            except trio.WouldBlock:
                await self._out_send.send(item)
        await trio.lowlevel.checkpoint()
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
            # The reader reads the socket and decodes the hot path's PUBLISH frames; paho reads
            # every other frame from the link, and writes into it.
            conn.sock = raw
            conn.link = _Link(raw)
            client._sock = conn.link
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
        if not self._subscribe:
            return True
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
        if not conn.session_present and self._persistent and self._subscribe:
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
            props.SessionExpiryInterval = s.session_expiry if self._persistent else 0
            props.ReceiveMaximum = s.receive_maximum
            props.MaximumPacketSize = s.max_packet_size  # the broker drops bigger ones for us
            clean = not self._persistent
            client.connect(s.host, s.port, keepalive=s.keepalive, clean_start=clean, properties=props)
        else:
            client.connect(s.host, s.port, keepalive=s.keepalive)

    def _make_client(self, generation: int) -> paho.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            clean_session=None if v5 else not self._persistent,
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
        client.on_unsubscribe = lambda c, u, mid, rcs, props: self._cb_unsubscribe(generation, mid)
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
                    if conn.link is not None:
                        conn.link.flush()
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
        """Read bursts of bytes, decode the PUBLISH frames ourselves, hand each burst over as one batch.

        One ``recv`` of up to 64 KiB serves many packets, one timestamp serves the burst, and
        every frame that is not a QoS 0/1 PUBLISH goes to paho in order (:meth:`_to_paho`). A
        malformed frame loses the connection (the next one starts clean, with backoff).

        Our own window, whatever the broker does with Receive Maximum: at most
        ``MQTT_RECEIVE_MAXIMUM`` messages and about ``MQTT_INFLIGHT_BYTES`` payload bytes are
        between the socket and the ack. At either limit the reader stops decoding and reading
        the socket until ingest acks, so TCP pushes back on the broker.

        The steps are methods called once per burst (read, decode, hand over), never per message:
        the per-message loop is the one inside :meth:`_decode`.
        """
        link = conn.link
        assert link is not None
        s = self.settings
        cap, budget = s.receive_maximum, s.inflight_bytes
        v5 = s.protocol == "5"
        decoder = FrameDecoder(v5=v5, max_packet=s.max_packet_size)
        starved = True  # the decoder needs more bytes before it can give another frame
        while True:
            if conn.inflight >= cap or conn.inflight_bytes >= budget:
                # Set by any ack since the last wait (also one that came while we handed over).
                await conn.room.wait()
                conn.room = trio.Event()
                # We did not read while the window was full: the keepalive clock starts again now.
                conn.heard_at = time.monotonic()
                continue
            if starved and not (link.eof or link.error):
                if not await self._read_burst(conn, decoder):
                    return
            else:
                await trio.lowlevel.checkpoint()
            batch = conn.batch
            starved = self._decode(conn, decoder, v5, cap - conn.inflight, budget - conn.inflight_bytes)
            if starved and (link.eof or link.error) and conn.lost is None:
                link.end_of_stream()  # after the frames before it: paho reports the close
                self._paho_read(conn)
                conn.lose("socket closed")
            if batch:
                conn.batch = []
                conn.inflight += len(batch)
                conn.inflight_bytes += sum(len(m.payload) for m in batch)
                metrics.MQTT_RECEIVED.inc(len(batch))
                metrics.MQTT_INFLIGHT.set(conn.inflight)
                metrics.MQTT_INFLIGHT_BYTES.set(conn.inflight_bytes)
                # Blocks while ingest is behind: we stop reading, the broker stops sending.
                await inbound.send(batch)
            if conn.lost is not None:
                return

    async def _read_burst(self, conn: _Connection, decoder: FrameDecoder) -> bool:
        """Wait until the socket is readable, then feed ``decoder`` what it holds (up to 1 MiB).

        Returns False when the socket was closed under us (the connection is then lost).
        """
        sock, link = conn.sock, conn.link
        assert link is not None
        ssl_sock = isinstance(sock, ssl.SSLSocket)
        if ssl_sock and sock.pending():  # whole records wait in the SSL buffer
            await trio.lowlevel.checkpoint()
        else:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                conn.lose("socket closed")
                return False
        got = 0
        while got < _READ_BURST:
            data = link.read()
            if not data:
                break
            decoder.feed(data)
            got += len(data)
            if len(data) < _RECV and not ssl_sock:
                break  # the kernel buffer is drained: spare the recv that says so
        if got:
            conn.received_at = datetime.now(UTC)
            # paho's keepalive counts received bytes; it does not see the publishes.
            conn.client._last_bytes_received = conn.heard_at = time.monotonic()
        return True

    def _decode(self, conn: _Connection, decoder: FrameDecoder, v5: bool, room: int, room_bytes: int) -> bool:
        """Take the decoded frames: QoS 0/1 PUBLISHes onto ``conn.batch`` (up to ``room`` messages
        and about ``room_bytes`` payload bytes), PUBACKs for our publishes settled together, any
        other frame to paho in stream order. Returns whether the decoder ran out of bytes.

        A malformed frame loses the connection.
        """
        batch, now, gen, level = conn.batch, conn.received_at, conn.generation, self._device_level
        acks: list[tuple[int, int]] = []  # PUBACKs for our publishes, (packet id, reason code)
        size = 0
        try:
            while len(batch) < room and size < room_bytes and conn.lost is None:
                frame = decoder.next()
                if frame is None:
                    return True
                if type(frame) is Publish and frame.qos < 2 and conn.connack.is_set():
                    topic = frame.topic
                    device = None
                    if level is not None:
                        levels = topic.split("/")
                        device = levels[level] if len(levels) > level else ""
                    batch.append(
                        Inbound(topic, frame.payload, now, frame.mid, frame.qos, frame.dup, gen, device,
                                frame.truncated_from)
                    )  # fmt: skip
                    size += len(frame.payload)
                elif type(frame) is Frame and frame.first == PUBACK and conn.unconfirmed:
                    acks.append(decode_puback(frame, v5=v5))
                else:
                    self._to_paho(conn, frame)
        except MqttCodecError as exc:
            conn.lose(f"malformed packet from the broker: {exc}")
        finally:
            if acks:
                self._confirmed(conn, acks)
        return False

    def _to_paho(self, conn: _Connection, frame: Frame | Publish) -> None:
        """Let paho handle one frame: the handshake, SUBACK, PUBACK, PINGRESP, DISCONNECT, QoS 2.

        A PUBLISH (QoS 2, or one before CONNACK) is re-encoded for paho, which hands it to
        :meth:`_cb_message`.
        """
        assert conn.link is not None
        if type(frame) is Publish:
            v5 = self.settings.protocol == "5"
            conn.paho_cut = frame.truncated_from
            data = encode_publish(frame.topic.encode(), frame.payload, frame.mid, v5=v5, qos=frame.qos, dup=frame.dup)
        else:
            assert isinstance(frame, Frame)
            data = frame.data
        conn.link.give(data)
        while conn.link.fed and conn.lost is None:
            self._paho_read(conn)
        conn.paho_cut = None

    def _paho_read(self, conn: _Connection) -> None:
        rc = conn.client.loop_read()
        if rc != _SUCCESS:
            conn.lose(f"read: {paho.error_string(rc)}")

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
                    done = conn.link.flush() if conn.link is not None else True
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
        ka, s = self.settings.keepalive, self.settings
        while True:
            await trio.sleep(1.0)
            # paho pings after a keepalive of silence and gives up a keepalive later (up to 2x
            # keepalive for a frozen broker). Ping at half of it, give up after one keepalive of
            # silence: a frozen broker is noticed within ~keepalive + 1 s. Not while our window is
            # full: then we are not reading the socket, so silence says nothing about the broker.
            client = conn.client
            if conn.inflight < s.receive_maximum and conn.inflight_bytes < s.inflight_bytes:
                idle = time.monotonic() - conn.heard_at
                if idle >= ka:
                    conn.lose(f"keepalive: nothing from the broker for {idle:.1f}s")
                    return
                if idle >= ka / 2 and client._ping_t == 0:
                    client._send_pingreq()
            rc = client.loop_misc()
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
        if lived is None or lived >= self._stable_after or conn.link is None or not conn.link.eof:
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

        Whatever is queued when it looks (up to the window) is encoded together (QoS 1, our own
        packet ids from paho's counter) and goes out in one write, behind what paho queued. An
        item stays in ``_resend`` until it is in the write buffer, and from then on in
        ``unconfirmed`` until its PUBACK (:meth:`_confirmed`), so a connection lost (or the
        gateway stopped) at any point never loses it: ``_drop_connection`` queues it again.
        """
        assert conn.link is not None
        link, client = conn.link, conn.client
        v5 = self.settings.protocol == "5"
        window = self.settings.receive_maximum
        if conn.broker_receive_max is not None:
            window = min(window, conn.broker_receive_max)
        if self._resend:
            log.info("re-sending unconfirmed publishes count=%d", len(self._resend))
        unconfirmed = conn.unconfirmed
        while True:
            while self._resend:
                while len(unconfirmed) >= window:
                    await conn.confirmed.wait()
                    conn.confirmed = trio.Event()
                now = time.monotonic()
                chunks: list[bytes] = []
                while self._resend and len(unconfirmed) < window:
                    item = self._resend.popleft()
                    if not item.qos:
                        chunks.append(encode_publish(item.topic.encode(), item.payload, 0, v5=v5, qos=0))
                        continue
                    mid = client._mid_generate()  # shared with paho's SUBSCRIBE ids
                    while mid in unconfirmed:
                        mid = client._mid_generate()
                    item.sent_at = now
                    chunks.append(encode_publish(item.topic.encode(), item.payload, mid, v5=v5))
                    unconfirmed[mid] = item
                link.out += b"".join(chunks)
                conn.write_wanted.set()
                self._queue_gauge()
            # No checkpoint between receive() returning and the append: the item cannot get lost.
            self._resend.append(await self._out_recv.receive())
            for _ in range(window - len(unconfirmed) - 1):  # and whatever else is waiting
                try:
                    self._resend.append(self._out_recv.receive_nowait())
                except trio.WouldBlock:
                    break

    def _confirmed(self, conn: _Connection, acks: list[tuple[int, int]]) -> None:
        """PUBACKs of one read burst for our publishes: outcomes told, metrics once per burst.

        A reason code >= 0x80 (MQTT 5) is a refusal: reported to ``on_done``, never counted as
        published.
        """
        now = time.monotonic()
        latencies: list[float] = []
        for mid, reason in acks:
            item = conn.unconfirmed.pop(mid, None)
            if item is None:
                continue
            refusal: str | None = None
            if reason >= 0x80:
                code = f"0x{reason:02x}"
                name = str(ReasonCode(PacketTypes.PUBACK, identifier=reason))
                refusal = f"broker refused the publish: {name} ({code})"
                metrics.MQTT_PUBLISH_REFUSED.labels(code).inc()
                log.warning("publish refused topic=%s reason=%r code=%s", item.topic, name, code)
            else:
                latencies.append(now - item.sent_at)
            if item.on_done is not None:
                try:
                    item.on_done(refusal)
                except Exception:  # one broken callback must not cost the connection
                    log.exception("publish outcome callback failed topic=%s", item.topic)
        if latencies:
            metrics.MQTT_PUBLISHED.inc(len(latencies))
            metrics.observe_many(metrics.MQTT_PUBLISH_LATENCY, latencies)
        conn.confirmed.set()
        self._queue_gauge()

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
            conn.batch.append(
                Inbound(topic, payload, conn.received_at, msg.mid, msg.qos, bool(msg.dup), generation, device,
                        conn.paho_cut)
            )  # fmt: skip
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

    def _cb_unsubscribe(self, generation: int, mid: int) -> None:
        conn = self._live(generation)
        if conn is not None and mid == conn.unsub_mid:
            conn.unsuback.set()

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

    @property
    def outstanding(self) -> int:
        """Publishes queued, or sent (QoS 1) and not answered yet."""
        conn = self._conn
        waiting = self._out_recv.statistics().current_buffer_used + len(self._resend)
        return waiting + (len(conn.unconfirmed) if conn else 0)

    def _queue_gauge(self) -> None:
        metrics.MQTT_PUBLISH_QUEUE.set(self.outstanding)


# CONNACK reason codes no retry fixes (MQTT 5 values; paho maps 3.1.1 return codes 1, 2, 4, 5 onto
# them): unsupported protocol version, client id not valid, bad user name or password, not
# authorised, banned, bad authentication method.
_REFUSED_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ssl.SSLError) else f"TLS: {text}"


__all__ = ["Inbound", "MqttBridge", "OnPublished"]
