"""The ``Store`` protocol: everything the gateway asks of a database, in one small interface.

Two real implementations: :mod:`gateway.store.sqlite` (stdlib sqlite3 in a worker thread, the
embedded default) and :mod:`gateway.store.postgres` (asyncpg through trio-asyncio). The same
contract test suite runs against both.

Failure model: an operation that cannot reach the database raises
:class:`~gateway.errors.StoreUnavailable` (temporary: retry with backoff); nothing else about
connection loss leaks out. Every operation runs under the query timeout from settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

import trio

from gateway.health import ComponentHealth
from gateway.rollups import Aggregate, AggregateQuery

Source = Literal["mqtt", "api", "replay"]
# ``replay``: a reject stored as a reading by ``POST /rejects/replay`` (gateway.replay).
# Tables with a retention period (messages: only processed ones are removed).
PruneTable = Literal["events", "rejects", "messages"]
DEFAULT_SCHEMA_VERSION = 1
"""``gateway.packets.SCHEMA_VERSION`` (which imports this package, so it cannot be imported here):
ingest names the version of every row it builds; this default serves rows built by hand."""


@dataclass(frozen=True)
class Partitions:
    """What :meth:`Store.maintain_partitions` found and did (PostgreSQL; SQLite has none)."""

    count: int = 0  # partitions of messages, the DEFAULT one included
    oldest: str | None = None  # name of the oldest range partition
    oldest_ends: datetime | None = None  # its upper bound: it can be dropped once that has expired
    created: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    dropped_rows: int = 0  # readings that went with the dropped partitions


class NewMessage(NamedTuple):
    """A validated reading to store. ``(device_id, dedupe_key)`` is unique: a second insert is a duplicate.

    A named tuple, not a dataclass: ingest builds one per reading and hands it straight to the
    store as its row (building a tuple costs a fifth of a frozen dataclass)."""

    device_id: str
    device_ts: datetime
    seq: int | None
    dedupe_key: str
    measurements: dict[str, float | int]
    status: str
    battery: float | None
    source: Source
    received_at: datetime
    topic: str | None = None
    schema_version: int = DEFAULT_SCHEMA_VERSION

    def to_json(self, message_id: int) -> dict[str, Any]:
        """The reading as the API shows it, once stored under ``message_id``."""
        return {
            "id": message_id,
            "device_id": self.device_id,
            "timestamp": _iso(self.device_ts),
            "received_at": _iso(self.received_at),
            "seq": self.seq,
            "measurements": self.measurements,
            "status": self.status,
            "battery": self.battery,
            "source": self.source,
            "schema_version": self.schema_version,
        }


@dataclass(frozen=True, slots=True)
class NewReject:
    """A refused packet, kept with its reason, field errors and the schema version that refused it."""

    received_at: datetime
    source: Source
    topic: str | None
    payload: bytes
    reason: str
    errors: list[dict[str, Any]]
    schema_version: int = DEFAULT_SCHEMA_VERSION


class InsertOutcome(NamedTuple):
    """What happened to one :class:`NewMessage`: its row id, and whether it was already there."""

    id: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A row of ``messages``."""

    id: int
    device_id: str
    device_ts: datetime
    received_at: datetime
    seq: int | None
    measurements: dict[str, float | int]
    status: str
    battery: float | None
    source: str
    processed_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    dead: bool = False
    schema_version: int = DEFAULT_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (times in RFC 3339 UTC) as the API returns it."""
        return {
            "id": self.id,
            "device_id": self.device_id,
            "timestamp": _iso(self.device_ts),
            "received_at": _iso(self.received_at),
            "seq": self.seq,
            "measurements": self.measurements,
            "status": self.status,
            "battery": self.battery,
            "source": self.source,
            "processed_at": _iso(self.processed_at) if self.processed_at else None,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "dead": self.dead,
            "schema_version": self.schema_version,
        }


@dataclass(frozen=True, slots=True)
class StoredReject:
    """A row of ``rejects``. ``payload`` is the raw bytes as received. A reject a replay stored as
    a reading keeps its row: ``replayed_at`` (the last replay that passed it) and ``message_id``."""

    id: int
    received_at: datetime
    source: str
    topic: str | None
    payload: bytes
    reason: str
    errors: list[dict[str, Any]]
    schema_version: int = DEFAULT_SCHEMA_VERSION
    replayed_at: datetime | None = None
    message_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; the payload as text (invalid UTF-8 replaced)."""
        return {
            "id": self.id,
            "received_at": _iso(self.received_at),
            "source": self.source,
            "topic": self.topic,
            "payload": self.payload.decode("utf-8", "replace"),
            "reason": self.reason,
            "errors": self.errors,
            "schema_version": self.schema_version,
            "replayed_at": _iso(self.replayed_at) if self.replayed_at else None,
            "message_id": self.message_id,
        }


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append for SSE replay. ``message_id`` ties it to the message that produced it.

    ``json``: ``data`` already encoded (:func:`gateway.jsonenc.dumps`), when the caller has it; the
    store writes these bytes and hands them on with the stored event, so nothing encodes it again.
    """

    type: str
    data: dict[str, Any]
    message_id: int | None = None
    device_id: str | None = None
    json: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event. ``id`` only grows, in commit order, across every instance.

    ``json``: ``data`` as compact JSON when known (as stored); ``frame``: the whole SSE frame,
    when the hub built it once for all its subscribers (:func:`gateway.sse.framed`);
    ``message_id``: the message whose processing appended it (None for alerts and the like).
    The stores build events positionally: on the hot path a keyword costs ~0.3 µs per event.
    """

    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime
    device_id: str | None = None
    json: bytes | None = field(default=None, compare=False, repr=False)
    frame: bytes | None = field(default=None, compare=False, repr=False)
    message_id: int | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A message whose actions failed: retry at ``retry_at``, or dead-letter when ``retry_at`` is None."""

    message_id: int
    error: str
    retry_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewPublish:
    """An MQTT publish for the outbox, written in the transaction that commits its message.

    ``subtopic`` None is ``MQTT_PUBLISH_TOPIC`` itself. ``message_id`` ties it to the message whose
    processing produced it (dropped with that message's events when the lease was lost).
    """

    payload: bytes
    subtopic: str | None = None
    message_id: int | None = None
    event_id: int | None = None


EventsByMessage = dict[int, list[Event]]
"""What :meth:`Store.complete` stored: every message still leased to the owner (processed, then
failed, in the order given) → the events appended for it, in the order given (an empty list when
it had none). Messages whose lease was lost are absent."""

PublishBuilder = Callable[[list[Event]], list[NewPublish]]
"""Builds the outbox rows of :meth:`Store.append_events` from the events it appended (so payloads
carry their ids).

Called inside the store's transaction (a worker thread on SQLite, the asyncio side on PostgreSQL):
it must be pure and quick, and must not raise for one bad payload.
"""

CompletionPublishes = Callable[[EventsByMessage], list[NewPublish]]
"""Builds the outbox rows of :meth:`Store.complete` from what it stored, keyed by message (same
rules as :data:`PublishBuilder`); rows of a message absent from it are dropped."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A pending row of ``outbox``, leased to the publisher that claimed it."""

    id: int
    payload: bytes
    subtopic: str | None
    attempts: int
    created_at: datetime
    message_id: int | None = None
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class PublishFailure:
    """A refused publish: retry at ``retry_at``, or dead-letter when ``retry_at`` is None."""

    id: int
    error: str
    retry_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Publishes waiting (and the oldest's creation time) and dead-lettered ones."""

    pending: int
    oldest: datetime | None
    dead: int


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """Filters for :meth:`Store.query_messages`. ``key``/``value``: a measurement or a top-level field.

    ``value`` is compared as a number when it parses as one (and the stored value is a number),
    otherwise as text. ``cursor`` is the opaque string from a previous page's ``next_cursor``.
    Results are newest first (by id).
    """

    limit: int = 100
    start_time: datetime | None = None
    end_time: datetime | None = None
    device_id: str | None = None
    key: str | None = None
    value: str | None = None
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class RejectSelection:
    """Which rejects a replay examines: by ``ids``, or received in ``[start_time, end_time)`` and
    (optionally) of one ``reason``. Either way only ids above ``after_id``, in id order."""

    ids: tuple[int, ...] | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    reason: str | None = None
    after_id: int = 0


class ReplayedReject(NamedTuple):
    """A reject that passed today's schema: its id and the reading it becomes."""

    reject_id: int
    message: NewMessage


class RefusedReject(NamedTuple):
    """A reject that still fails: its id and its fresh reason, errors and schema version."""

    reject_id: int
    reject: NewReject


@dataclass(frozen=True, slots=True)
class Page:
    """One page of results. ``total`` counts the matches up to ``API_TOTAL_LIMIT``; when there are
    more, ``total_capped`` is True and ``total`` is a lower bound (counting further is the cost)."""

    items: list[Any]
    total: int
    next_cursor: str | None
    total_capped: bool = False


@dataclass(frozen=True, slots=True)
class Backlog:
    """Unprocessed work: how many messages wait, and when the oldest arrived."""

    count: int
    oldest: datetime | None
    dead: int = 0


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file and whether (and when) it was applied."""

    version: int
    name: str
    applied_at: datetime | None = None


class Store(Protocol):
    """What the gateway needs from a database. All methods may raise StoreUnavailable."""

    kind: str
    health: ComponentHealth
    """The store's own record (``database``): it sets it itself (``reconnects`` in ``detail``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying with backoff), apply migrations, report started, keep the connection
        healthy, and close it on cancel. Runs until cancelled."""
        ...

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations in order, each in a transaction; returns those applied now."""
        ...

    async def migration_status(self) -> list[Migration]:
        """Every known migration, with ``applied_at`` for the applied ones."""
        ...

    async def ping(self) -> None:
        """A round trip to the database; raises StoreUnavailable when it fails."""
        ...

    async def write_batch(self, messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        """Insert messages (idempotently) and rejects in ONE transaction.

        Returns one outcome per message, in order; duplicates (same device + dedupe key, also within
        the batch) report the existing id with ``duplicate=True``. On PostgreSQL also NOTIFYs
        ``gateway_messages`` when something new was stored.
        """
        ...

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        """Lease up to ``limit`` unprocessed, not dead, due messages (oldest first) to ``owner``.

        A message leased to someone else is skipped until its lease expires. Concurrent claimers
        never get the same message (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
        """
        ...

    async def complete(
        self,
        owner: str,
        processed: list[int],
        failed: list[Failure],
        events: list[NewEvent],
        publishes: CompletionPublishes | None = None,
    ) -> EventsByMessage:
        """In ONE transaction: mark ``processed`` done, record ``failed`` (attempts+1, last_error,
        retry time or dead), append ``events`` and the outbox rows ``publishes`` builds from the
        appended events — only for messages still leased to ``owner`` (outbox rows with
        ``message_id=None`` always). Event ids grow in commit order across instances, and follow
        the order of ``events``.

        Returns every message still leased to ``owner`` → its appended events with their ids
        (:data:`EventsByMessage`). Raises ValueError for an event without a ``message_id``
        (those go through :meth:`append_events`).
        """
        ...

    async def append_events(self, events: list[NewEvent], publishes: PublishBuilder | None = None) -> list[Event]:
        """Append events not tied to a message (alerts), and their outbox rows, in one transaction.
        Returns the events with ids."""
        ...

    async def read_events(
        self,
        after_id: int,
        limit: int,
        types: frozenset[str] | None = None,
        device_id: str | None = None,
    ) -> list[Event]:
        """Events with ``id > after_id`` in id order, optionally filtered."""
        ...

    async def event_bounds(self) -> tuple[int, int]:
        """(oldest kept id, newest id); (0, 0) when there are none."""
        ...

    async def prune_events(self, older_than: datetime) -> int:
        """Delete events created before ``older_than``; returns how many."""
        ...

    async def prune(self, table: PruneTable, older_than: datetime, limit: int) -> int:
        """Delete at most ``limit`` of the oldest rows of ``table`` from before ``older_than``
        (messages: processed ones only), in one short transaction; returns how many."""
        ...

    async def maintain_partitions(self, now: datetime, older_than: datetime | None, limit: int) -> Partitions:
        """PostgreSQL: create the partitions of messages ahead (the current and next periods of
        ``MESSAGE_PARTITION``) and, when ``older_than`` is given, drop each whose whole range is
        before it and that holds no unprocessed or dead-lettered reading (deleting its dedupe keys
        first, ``limit`` per transaction). SQLite: nothing (``Partitions()``)."""
        ...

    async def query_messages(self, query: MessageQuery) -> Page:
        """A page of :class:`StoredMessage` (newest first), the total matching, and the next cursor.

        API reads (this, :meth:`get_message`, :meth:`query_rejects`) run beside the writer, never
        in front of it, and each is stopped after ``API_QUERY_TIMEOUT`` (QueryTimeout).
        Raises ValueError for a malformed cursor.
        """
        ...

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """One message by id."""
        ...

    async def latest_per_device(self, limit: int) -> list[StoredMessage]:
        """Each device's newest message (latest ``device_ts``, then highest id), for at most
        ``limit`` devices: those with the newest readings, newest first.

        Runs under the query timeout. Cost grows with the number of devices, not of rows: both
        stores walk the ``(device_id, device_ts)`` index once per device (a loose index scan).
        """
        ...

    async def query_rejects(self, limit: int, cursor: str | None = None) -> Page:
        """A page of :class:`StoredReject`, newest first."""
        ...

    async def aggregate(self, query: AggregateQuery) -> Aggregate:
        """Buckets of one measurement of one device (:mod:`gateway.rollups`), oldest first, from
        the rollups when they cover the range, else from the raw rows; an API read (see
        :meth:`query_messages`). Raises ValueError for an empty or too long range."""
        ...

    async def backlog(self) -> Backlog:
        """How much work waits for the processor."""
        ...

    async def select_rejects(self, selection: RejectSelection, limit: int) -> list[StoredReject]:
        """Up to ``limit`` rejects of ``selection``, oldest id first (a replay's chunk)."""
        ...

    async def replay_rejects(self, replayed: list[ReplayedReject], refused: list[RefusedReject]) -> list[InsertOutcome]:
        """In ONE transaction: store the readings of ``replayed`` as :meth:`write_batch` does
        (idempotently, NOTIFY included) and mark each reject replayed (``replayed_at``, the
        reading's ``message_id``, the new schema version); give each of ``refused`` its fresh
        reason, errors and schema version. Returns one outcome per reading, in order. Raises
        StoreRefused (nothing changed) when a reading's value cannot be stored.
        """
        ...

    async def watch(
        self,
        on_message: Callable[[], None],
        on_event: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_message`` when any instance stores new messages and ``on_event`` when any
        instance appends events (PostgreSQL LISTEN/NOTIFY; also called once after every
        (re)connect, since notifications may have been missed). SQLite: only this process
        writes, so it reports started and waits. Runs until cancelled; callbacks must not block.
        """
        ...

    async def claim_outbox(self, owner: str, limit: int, lease_seconds: float) -> list[OutboxItem]:
        """Lease up to ``limit`` due, not dead outbox rows (oldest first) to ``owner``; rows leased
        to anyone are skipped until the lease expires (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""
        ...

    async def renew_outbox(self, owner: str, lease_seconds: float) -> int:
        """Extend every lease ``owner`` holds (rows still waiting for a PUBACK); returns how many."""
        ...

    async def release_outbox(self, owner: str) -> int:
        """Drop every lease ``owner`` holds (a restart under the same owner retakes them at once)."""
        ...

    async def outbox_done(self, ids: list[int]) -> None:
        """Delete rows the broker confirmed."""
        ...

    async def outbox_failed(self, failures: list[PublishFailure]) -> None:
        """Record refusals: attempts+1, last_error, and a retry time or ``dead_at``; releases the lease."""
        ...

    async def outbox_stats(self) -> OutboxStats:
        """How many publishes wait (and since when) and how many are dead-lettered."""
        ...


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")
