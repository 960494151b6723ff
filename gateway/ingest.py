"""Ingest: validate → batch insert → ack in arrival order → wake the processor.

Overflow policy: ingest never drops. While the database is down the current batch is retried
(with backoff) and nothing new is read from the channel, so the MQTT reader blocks and the broker
stops sending once Receive Maximum messages are unacknowledged. A message is acknowledged only
after the transaction holding it (as a reading or as a reject) committed.

Data never stops ingest: a batch the database refuses for its data (:class:`StoreRefused`) is
split in halves until the refused messages are found, and each is stored as an ``unstorable``
reject, so no message is redelivered forever and the component never restarts for data.

Disk spool (PostgreSQL only, with ``SPOOL_AFTER`` set): once the database has been unavailable
for ``SPOOL_AFTER`` seconds, batches are committed to the :class:`~gateway.spool.Spool` and acked
there. While the spool holds rows every new batch goes to it too, behind them, and a drain task
stores its oldest rows in PostgreSQL (through :func:`store_batch`, so the same rows), then deletes
them: arrival order, and so per-device order, is kept, and a crash between the two re-sends rows
that the dedupe key makes duplicates. A full spool refuses: ingest stops acking (backpressure to
the broker, as without a spool) until the drain makes room.

One path for every source: :func:`store_batch` (validate, write, isolate refused messages) and
:func:`observe` (metrics) serve the MQTT stream here and ``POST /packets`` alike. Work is per
batch, not per message: one pydantic call and one row tuple (:class:`NewMessage`) per reading,
one store call per batch, metrics counted per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import trio
from prometheus_client import Histogram

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import PacketInvalid, StoreCorrupt, StoreRefused, StoreUnavailable
from gateway.health import ComponentHealth
from gateway.mqtt import Inbound
from gateway.packets import SCHEMA_VERSION, Packet, parse_packet
from gateway.settings import IngestSettings
from gateway.spool import Spool
from gateway.store.base import InsertOutcome, NewMessage, NewReject, Source, Store

log = logging.getLogger("gateway.ingest")

RETRY_MIN = 0.05
RETRY_MAX = 5.0


@dataclass(frozen=True, slots=True)
class Posted:
    """A packet sent to ``POST /packets``: like :class:`Inbound`, but with no topic."""

    payload: bytes
    received_at: datetime
    topic: None = None
    topic_device: None = None
    truncated_from: None = None


@dataclass(frozen=True, slots=True)
class Replayed:
    """A stored reject validated again (:mod:`gateway.replay`): its payload, topic and the topic's
    device (``MQTT_DEVICE_FROM_TOPIC`` applies as it did when it arrived)."""

    payload: bytes
    received_at: datetime
    topic: str | None
    topic_device: str | None
    truncated_from: None = None


Received = Inbound | Posted | Replayed
"""One packet to store, from any source."""

Write = Callable[[list[NewMessage], list[NewReject]], Awaitable[list[InsertOutcome]]]
"""``Store.write_batch``, or a wrapper of it (ingest's retries while the database is down)."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What one batch became, all committed: readings (one outcome each, in order) and rejects."""

    messages: list[NewMessage]
    outcomes: list[InsertOutcome]
    rejects: list[NewReject]


def message_from_packet(packet: Packet, source: Source, received_at: datetime, topic: str | None = None) -> NewMessage:
    """The row to store for a validated packet (the same for MQTT and API input)."""
    return NewMessage(
        packet.device_id,
        packet.timestamp,
        packet.seq,
        packet.dedupe_key(),
        packet.measurements,  # the packet is frozen and dropped: no copy needed
        packet.status,
        packet.battery,
        source,
        received_at,
        topic,
        SCHEMA_VERSION,
    )


def unstorable_reject(received_at: datetime, source: Source, topic: str | None, payload: bytes) -> NewReject:
    """The reject kept for a message the database refused to store (its raw bytes and a fixed
    error: the database's text may quote the value, so it goes to the log only)."""
    errors = [{"loc": [], "msg": "the database cannot store a value of this packet", "type": "unstorable"}]
    return NewReject(received_at, source, topic, payload, "unstorable", errors, SCHEMA_VERSION)


def to_records(
    batch: Sequence[Received], max_payload: int, source: Source = "mqtt"
) -> tuple[list[NewMessage], list[NewReject]]:
    """Validate each message: valid ones become :class:`NewMessage`, the rest :class:`NewReject`.

    Pure; never raises for a bad payload. A too-large payload is kept truncated to ``max_payload``
    bytes (its reason and size are in the errors).
    """
    messages: list[NewMessage] = []
    rejects: list[NewReject] = []
    for m in batch:
        try:
            if m.truncated_from is not None:
                raise _cut_short(m.truncated_from, len(m.payload))
            p = parse_packet(m.payload, max_bytes=max_payload)
            if m.topic_device is not None and p.device_id != m.topic_device:
                raise _topic_mismatch(p.device_id, m.topic_device)
        except PacketInvalid as exc:
            raw = m.payload[:max_payload]
            rejects.append(NewReject(m.received_at, source, m.topic, raw, exc.reason, exc.errors, SCHEMA_VERSION))
            continue
        except Exception as exc:  # a bug in validation must not stall the stream: keep it as a reject
            log.exception("validation crashed topic=%s", m.topic)
            errors = [{"loc": [], "msg": f"validation failed: {type(exc).__name__}", "type": "internal"}]
            raw = m.payload[:max_payload]
            rejects.append(NewReject(m.received_at, source, m.topic, raw, "internal", errors, SCHEMA_VERSION))
            continue
        messages.append(message_from_packet(p, source, m.received_at, m.topic))
    return messages, rejects


def _cut_short(size: int, kept: int) -> PacketInvalid:
    msg = f"packet is {size} bytes, over MQTT_MAX_PACKET_SIZE: only its first {kept} bytes were read"
    return PacketInvalid("too_large", [{"loc": [], "msg": msg, "type": "too_large"}])


def _topic_mismatch(device_id: str, topic_device: str) -> PacketInvalid:
    msg = f"device_id {device_id!r} differs from the topic's device {topic_device!r} (MQTT_DEVICE_FROM_TOPIC)"
    return PacketInvalid("topic_mismatch", [{"loc": ["device_id"], "msg": msg, "type": "topic_mismatch"}])


async def store_batch(write: Write, batch: Sequence[Received], source: Source, max_payload: int) -> Stored:
    """Validate ``batch`` and store it with ``write``: readings and rejects in one transaction.

    A batch the database refuses for its data (StoreRefused) is stored in halves, down to single
    messages, which become ``unstorable`` rejects (validation is pure, so each half is validated
    again rather than every batch keeping its positions). Raises StoreCorrupt when even such a
    reject is refused (then it is not the data), and whatever ``write`` raises otherwise
    (StoreUnavailable: nothing of the batch was stored).
    """
    messages, rejects = to_records(batch, max_payload, source)
    try:
        return Stored(messages, await write(messages, rejects), rejects)
    except StoreRefused as exc:
        if len(batch) > 1:
            half = len(batch) // 2
            a = await store_batch(write, batch[:half], source, max_payload)
            b = await store_batch(write, batch[half:], source, max_payload)
            return Stored(a.messages + b.messages, a.outcomes + b.outcomes, a.rejects + b.rejects)
        m = batch[0]
        log.warning("storing a message as a reject: the database refused it topic=%s error=%s", m.topic, exc)
        reject = unstorable_reject(m.received_at, source, m.topic, m.payload[:max_payload])
        try:
            await write([], [reject])
        except StoreRefused as again:
            raise StoreCorrupt(f"the database refuses even a reject: {again}") from again
        return Stored([], [], [reject])


def observe(batch: Sequence[Received], stored: Stored, source: Source) -> None:
    """Count a committed batch: readings stored and duplicate, rejects by reason, the batch size,
    and receive-to-commit latency, with one clock read and one observation per receive time (a
    read burst shares one) instead of one per message."""
    count_outcomes(stored.outcomes, source)
    for r in stored.rejects:
        metrics.INGEST_REJECTED.labels(r.reason).inc()
    metrics.INGEST_BATCH.observe(len(batch))
    now = datetime.now(UTC)
    last: datetime | None = None
    count = 0
    for m in batch:
        if m.received_at is not last:
            if last is not None:
                observe_many(metrics.INGEST_LATENCY, (now - last).total_seconds(), count)
            last, count = m.received_at, 0
        count += 1
    if last is not None:
        observe_many(metrics.INGEST_LATENCY, (now - last).total_seconds(), count)


def count_outcomes(outcomes: Sequence[InsertOutcome], source: Source) -> None:
    """Count readings stored and duplicate (also for a replay, which counts nothing else)."""
    dup = sum(o.duplicate for o in outcomes)
    if len(outcomes) - dup:
        metrics.INGEST_STORED.labels(source).inc(len(outcomes) - dup)
    if dup:
        metrics.INGEST_DUPLICATES.labels(source).inc(dup)


def observe_many(histogram: Histogram, amount: float, count: int) -> None:
    """``histogram.observe(amount)`` ``count`` times, at the cost of one (an unlabelled histogram;
    the same arithmetic as prometheus_client's own ``observe``, checked by a test)."""
    if count == 1:
        histogram.observe(amount)
        return
    histogram._sum.inc(amount * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(count)
            break


class Ingest:
    """Moves batches of :class:`Inbound` from the MQTT bridge into the store, exactly once."""

    def __init__(
        self,
        settings: IngestSettings,
        store: Store,
        ack: Callable[[Sequence[Inbound]], None],
        on_commit: Callable[[], None],
        health: ComponentHealth,
        *,
        on_stored: Callable[[list[NewMessage], list[InsertOutcome]], None] | None = None,
        spool: Spool | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._ack = ack
        self._on_commit = on_commit
        self._on_stored = on_stored
        self._health = health
        self._filling: trio.CancelScope | None = None
        self._spool = spool
        self._down_since: float | None = None  # when the current database outage began
        self.received = 0
        """Messages taken from the channel since start."""
        self.committed = 0
        """Messages committed (and acked) since start, whatever became of each: it is always
        ``stored + duplicates + rejected``."""
        self.stored = 0
        """Readings stored new since start."""
        self.duplicates = 0
        """Redeliveries of readings already stored (committed and acked, stored once)."""
        self.rejected = 0
        """Messages stored as rejects since start."""

    @property
    def held(self) -> int:
        """Messages received but not yet committed (nor acked): the batch being filled and any rest."""
        return self.received - self.committed

    def reconfigure(self, settings: IngestSettings) -> None:
        """Apply new batching settings at the next batch boundary, keeping every message held.

        ``batch_size``, ``flush_ms`` and ``max_payload`` take effect for the batch being filled: it
        is judged again by the new size and by its start time plus the new ``flush_ms``.
        ``channel_size`` belongs to the channel the app built; it applies when that is rebuilt.
        """
        self._settings = settings
        if self._filling is not None:
            self._filling.cancel()  # wake the fill wait; run() re-reads the settings

    async def run(
        self,
        inbound: trio.MemoryReceiveChannel[list[Inbound]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Batch, store and ack everything from ``inbound``.

        A batch is written when it holds ``batch_size`` messages or ``flush_ms`` after it started
        filling (both read at each batch boundary, see :meth:`reconfigure`). Returns when
        ``inbound`` is closed (after storing what it had); otherwise runs until cancelled. Raises
        what the store raises besides StoreUnavailable (a bug or a broken schema), leaving the
        batch unacked for redelivery.
        """
        if self._spool is None:
            self._health.set("ok")
            task_status.started()
            await self._intake(inbound)
            return
        await self._spool.open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, self._spool)
                self._health.set("ok")
                task_status.started()
                await self._intake(inbound)
                nursery.cancel_scope.cancel()
        finally:
            await self._spool.aclose()

    async def _intake(self, inbound: trio.MemoryReceiveChannel[list[Inbound]]) -> None:
        pending: list[Inbound] = []
        started = 0.0
        while True:
            if not pending:
                try:
                    pending.extend(await self._receive(inbound))
                except trio.EndOfChannel:
                    return
                started = trio.current_time()
            settings = self._settings
            size = settings.batch_size
            closed = False
            if len(pending) < size:
                with trio.CancelScope(deadline=started + settings.flush_ms / 1000.0) as filling:
                    self._filling = filling
                    try:
                        while len(pending) < size:
                            pending.extend(await self._receive(inbound))
                    except trio.EndOfChannel:
                        closed = True
                self._filling = None
                if self._settings is not settings and not closed:
                    continue  # reconfigured while filling: judge this batch by the new settings
            # A read burst may exceed batch_size: commit a full batch, keep the rest for the next.
            chunk, pending = pending[:size], pending[size:]
            await self._commit(chunk)
            started = trio.current_time()  # the rest, if any, starts the next batch
            if closed:
                while pending:
                    size = self._settings.batch_size
                    chunk, pending = pending[:size], pending[size:]
                    await self._commit(chunk)
                return

    async def _receive(self, inbound: trio.MemoryReceiveChannel[list[Inbound]]) -> list[Inbound]:
        batch = await inbound.receive()
        self.received += len(batch)
        return batch

    async def _commit(self, chunk: list[Inbound]) -> None:
        """Store one batch (retrying while the database is unavailable, or spooling it), then ack
        it in order."""
        if self._spool is not None and self._spool.active:
            return await self._to_spool(self._spool, chunk)
        try:
            stored = await store_batch(self._write, chunk, "mqtt", self._settings.max_payload)
        except StoreUnavailable:  # only with a spool: down for SPOOL_AFTER (see _write)
            assert self._spool is not None
            return await self._to_spool(self._spool, chunk)
        self._ack(chunk)
        self.committed += len(chunk)
        observe(chunk, stored, "mqtt")
        self._stored(stored)

    def _stored(self, stored: Stored) -> None:
        """Count what a commit stored (live or drained from the spool) and pass it on."""
        duplicates = sum(o.duplicate for o in stored.outcomes)
        self.stored += len(stored.outcomes) - duplicates
        self.duplicates += duplicates
        self.rejected += len(stored.rejects)
        self._health.detail.update(
            committed=self.committed, stored=self.stored, duplicates=self.duplicates, rejected=self.rejected
        )
        if self._on_stored is not None:
            self._on_stored(stored.messages, stored.outcomes)
        self._on_commit()

    async def _to_spool(self, spool: Spool, chunk: list[Inbound]) -> None:
        """Commit ``chunk`` to the spool and ack it; while the spool is full, wait (unacked)."""
        if not await spool.append(chunk):
            log.warning("spool full: not acking until it drains rows=%d bytes=%d", spool.rows, spool.bytes)
            while not await spool.append(chunk):
                await spool.changed()
        self._ack(chunk)
        self.committed += len(chunk)
        self._health.detail.update(committed=self.committed)

    async def _drain(self, spool: Spool) -> None:
        """Store the spool's oldest rows in the database and delete them, whenever it has rows.
        Runs until cancelled."""
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            if not spool.active:
                await spool.changed()
                continue
            upto, batch = await spool.head(self._settings.batch_size)
            try:
                stored = await store_batch(self._store.write_batch, batch, "mqtt", self._settings.max_payload)
            except StoreUnavailable:
                await trio.sleep(backoff.next())
                continue
            if backoff.attempt:
                log.info("draining the spool to the database rows=%d", spool.rows)
                backoff.reset()
            await spool.remove(upto)
            metrics.SPOOL_DRAINED.inc(len(batch))
            observe(batch, stored, "mqtt")
            self._stored(stored)
            if not spool.active:
                log.info("spool drained")

    def _spool_now(self) -> bool:
        """True once the current database outage has lasted ``SPOOL_AFTER`` (noting its start)."""
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = now
        after = self._settings.spool_after
        return after is not None and now - self._down_since >= after

    async def _write(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        """``write_batch``, retried with backoff while the database is unavailable; with a spool,
        only until ``SPOOL_AFTER`` from the outage's start (then raises StoreUnavailable)."""
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            try:
                outcomes = await self._store.write_batch(messages, rejects)
                break
            except StoreUnavailable as exc:
                if self._spool is not None and self._spool_now():
                    log.warning("database unavailable for SPOOL_AFTER: spooling batch=%d", len(messages) + len(rejects))
                    raise
                metrics.INGEST_DB_ERRORS.inc()
                self._health.set("degraded", f"database: {exc}")
                delay = backoff.next()
                size = len(messages) + len(rejects)
                log.warning("store unavailable batch=%d retry_in=%.2fs error=%s", size, delay, exc)
                await trio.sleep(delay)
        if self._health.state != "ok":
            size = len(messages) + len(rejects)
            log.info("store available again batch=%d attempts=%d", size, backoff.attempt + 1)
            self._health.set("ok")
            self._down_since = None
        return outcomes
