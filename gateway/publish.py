"""The outbound side: the durable outbox publisher, and the in-memory :class:`Publisher` protocol.

Every publish a rule asks for is written to the ``outbox`` table in the transaction that marks its
message processed (see :mod:`gateway.processor`). :class:`OutboxPublisher` drains that table:

* it leases due rows (``MQTT_PUBLISH_LEASE``, renewed while they wait for a PUBACK) and hands at
  most ``MQTT_PUBLISH_INFLIGHT`` of them to the broker connection at once, only while connected;
* a PUBACK with success deletes the row; a refusal (MQTT 5 reason code >= 0x80, e.g. 0x87 not
  authorised) is logged and counted, and the row is retried after an exponential backoff
  (``MQTT_PUBLISH_RETRY_MIN``/``MAX``), then dead-lettered after ``MQTT_PUBLISH_MAX_ATTEMPTS``:
  kept with ``dead_at`` and ``last_error``, shown in metrics and in the ``outbox`` health detail;
* after a crash or restart, rows still in the table are sent again. The lease owner is the MQTT
  client id (one live connection per id), so a restarted gateway retakes its own rows at once.

Delivery is therefore at least once: a crash between the broker's PUBACK and the delete sends
that row again. Payloads carry the event id so receivers can deduplicate. The processor only
writes rows, so a slow, refusing or absent broker never holds up SSE events or scripts; the
backlog waits in the database (``gateway_outbox_pending``).

:class:`Publisher` is the best-effort path still used for alerts the database could not store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

import trio

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import StoreUnavailable
from gateway.health import ComponentHealth
from gateway.mqtt import OnPublished
from gateway.settings import MqttSettings
from gateway.store.base import OutboxItem, PublishFailure, Store
from gateway.wake import Nudge

log = logging.getLogger("gateway.publish")

_POLL = 1.0  # seconds between outbox looks when nothing wakes the publisher (other instances' rows, retries)
_SETTLE_MS = 10.0  # PUBACKs gathered this long before one delete (one commit per burst, not per ack)
_STATS_EVERY = 5.0  # seconds between outbox statistics (gauges, health detail)


class Publisher(Protocol):
    """Queues a QoS 1 publish on ``MQTT_PUBLISH_TOPIC`` (or ``<topic>/<subtopic>``), in memory.

    ``publish`` waits while the outbound queue is full; ``publish_nowait`` raises
    :class:`~gateway.errors.MqttUnavailable` then. Queued publishes are re-sent after a reconnect,
    but lost with the process: what must survive a crash goes through the outbox.
    """

    async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue one publish; waits for room."""
        ...

    def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
        """Queue one publish or raise MqttUnavailable when the queue is full."""
        ...


class Sender(Protocol):
    """The broker connection as the outbox publisher needs it (:class:`gateway.mqtt.MqttBridge`)."""

    connected: bool

    async def send(self, payload: bytes, subtopic: str | None, on_done: OnPublished) -> None:
        """Queue a publish; ``on_done`` hears None on success or the broker's refusal."""
        ...

    async def send_many(self, items: Sequence[tuple[bytes, str | None, OnPublished]]) -> None:
        """:meth:`send` for many (payload, subtopic, on_done), in order."""
        ...


class OutboxPublisher:
    """Drains the ``outbox`` table to MQTT; see the module docstring."""

    def __init__(
        self,
        settings: MqttSettings,
        store: Store,
        sender: Sender,
        health: ComponentHealth,
        *,
        owner: str | None = None,
        poll: float = _POLL,
        stats_every: float = _STATS_EVERY,
    ) -> None:
        """``owner`` names the leases (default: the MQTT client id, stable across restarts)."""
        self.settings = settings
        self._store = store
        self._sender = sender
        self._health = health
        self.owner = owner if owner is not None else f"mqtt:{settings.client_id}"
        self._poll = poll
        self._stats_every = stats_every
        self._wake = Nudge()
        self._settle = Nudge()
        self._inflight: dict[int, OutboxItem] = {}
        self._starved = False  # the feed stopped for want of room: settling must wake it
        self._released = False  # leases of our previous process dropped (once per object)
        self._acked: list[int] = []
        self._refused: list[tuple[int, str]] = []
        self.published = 0
        self.refused = 0
        self.dead = 0

    def reconfigure(self, settings: MqttSettings) -> None:
        """Use ``settings`` (in-flight window, lease, retry policy) from the next batch on; the
        lease owner stays (it names rows already leased)."""
        self.settings = settings

    def wake(self) -> None:
        """New rows were committed (or room freed): look at the outbox now."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        """Rows handed to the connection and not settled yet."""
        return len(self._inflight)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the outbox until cancelled. Reports started at once (the database may still be
        coming up: it is retried with backoff, health ``degraded`` meanwhile). Runs until cancelled."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._settle_loop)
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._stats_loop)
            await self._feed_loop()

    # -------------------------------------------------------------------------------- feeding

    async def _feed_loop(self) -> None:
        outage = Backoff(0.2, 10.0)
        while True:
            try:
                if not self._released:
                    # Rows our previous process leased and never settled: ours to send again now.
                    # Once only: after a group restart, rows still in flight keep their leases.
                    count = await self._store.release_outbox(self.owner)
                    self._released = True
                    if count:
                        log.info("outbox rows taken over after a restart count=%d owner=%s", count, self.owner)
                await self._feed()
            except StoreUnavailable as exc:
                delay = outage.next()
                self._health.set("degraded", f"database: {exc}")
                log.warning("outbox store unavailable error=%r retry_in=%.2fs", str(exc), delay)
                await trio.sleep(delay)
                continue
            outage.reset()
            if self._health.state != "ok":
                self._health.set("ok")
            await self._wake.wait(self._poll)

    async def _feed(self) -> None:
        """Hand due rows to the connection while it is up and there is room."""
        s = self.settings
        while self._sender.connected:
            room = s.publish_inflight - len(self._inflight)
            if room <= 0:
                self._starved = True
                return  # the settle loop wakes us when PUBACKs free room
            rows = await self._store.claim_outbox(self.owner, room, s.publish_lease)
            for row in rows:
                self._inflight[row.id] = row
            await self._sender.send_many([(row.payload, row.subtopic, partial(self._outcome, row.id)) for row in rows])
            if len(rows) < room:
                return

    def _outcome(self, row_id: int, refusal: str | None) -> None:
        # Called from the connection's reader, on a burst of PUBACKs: record and wake only.
        if refusal is None:
            self._acked.append(row_id)
        else:
            self._refused.append((row_id, refusal))
        self._settle.set()

    # ------------------------------------------------------------------------------- settling

    async def _settle_loop(self) -> None:
        """Delete confirmed rows and record refusals, one commit per burst of PUBACKs."""
        outage = Backoff(0.2, 10.0)
        while True:
            if not (self._acked or self._refused):  # results left by a cancelled run go first
                await self._settle.wait()
                await trio.sleep(_SETTLE_MS / 1000.0)
            while self._acked or self._refused:
                try:
                    await self._settle_once()
                except StoreUnavailable as exc:
                    delay = outage.next()
                    log.warning("outbox results not written yet error=%r retry_in=%.2fs", str(exc), delay)
                    await trio.sleep(delay)
                    continue
                outage.reset()
            # Only a feed that stopped for want of room needs waking: any other wake-up would
            # claim an outbox that new commits (which wake the feed themselves) left empty.
            if self._starved:
                self._starved = False
                self._wake.set()

    async def _settle_once(self) -> None:
        if self._acked:
            acked = self._acked
            self._acked = []
            try:
                await self._store.outbox_done(acked)
            except BaseException:
                self._acked[:0] = acked
                raise
            for row_id in acked:
                self._inflight.pop(row_id, None)
            self.published += len(acked)
        if self._refused:
            refused = self._refused
            self._refused = []
            failures = [self._failure(row_id, error) for row_id, error in refused if row_id in self._inflight]
            try:
                await self._store.outbox_failed(failures)
            except BaseException:
                self._refused[:0] = refused
                raise
            for row_id, _ in refused:
                self._inflight.pop(row_id, None)

    def _failure(self, row_id: int, error: str) -> PublishFailure:
        """A refused row: retry after a backoff for this attempt number, or dead-letter it."""
        s = self.settings
        row = self._inflight[row_id]
        attempt = row.attempts + 1
        self.refused += 1
        if attempt >= s.publish_max_attempts:
            self.dead += 1
            metrics.OUTBOX_DEAD_LETTERED.inc()
            log.error(
                "publish dead-lettered outbox_id=%d message_id=%s event_id=%s attempts=%d error=%r",
                row.id,
                row.message_id,
                row.event_id,
                attempt,
                error,
            )
            return PublishFailure(row.id, error, None)
        delay = Backoff(s.publish_retry_min, max(s.publish_retry_min, s.publish_retry_max)).delay(attempt - 1)
        metrics.OUTBOX_RETRIES.inc()
        log.warning(
            "publish refused outbox_id=%d message_id=%s event_id=%s attempt=%d/%d error=%r retry_in=%.2fs",
            row.id,
            row.message_id,
            row.event_id,
            attempt,
            s.publish_max_attempts,
            error,
            delay,
        )
        return PublishFailure(row.id, error, datetime.now(UTC) + timedelta(seconds=delay))

    # ---------------------------------------------------------------------------- housekeeping

    async def _renew_loop(self) -> None:
        """Keep the leases of rows waiting for a PUBACK (e.g. through a broker outage)."""
        while True:
            await trio.sleep(self.settings.publish_lease / 3)
            if self._inflight:
                try:
                    await self._store.renew_outbox(self.owner, self.settings.publish_lease)
                except StoreUnavailable as exc:
                    log.warning("outbox leases not renewed error=%r", str(exc))

    async def _stats_loop(self) -> None:
        while True:
            try:
                stats = await self._store.outbox_stats()
            except StoreUnavailable:
                pass
            else:
                age = (datetime.now(UTC) - stats.oldest).total_seconds() if stats.oldest else 0.0
                metrics.OUTBOX_PENDING.set(stats.pending)
                metrics.OUTBOX_DEAD.set(stats.dead)
                metrics.OUTBOX_OLDEST.set(max(0.0, age))
                self._health.detail.update(
                    pending=stats.pending,
                    dead=stats.dead,
                    oldest_seconds=round(max(0.0, age), 3),
                    inflight=len(self._inflight),
                    published=self.published,
                    refused=self.refused,
                )
            await trio.sleep(self._stats_every)
