"""Reject replay: stored rejects validated again against today's packet schema.

Serves ``POST /api/v1/rejects/replay`` and ``gateway rejects replay`` alike (:func:`replay`). The
validation is ingest's own (:func:`gateway.ingest.to_records`, ``MQTT_DEVICE_FROM_TOPIC`` as it
applied on arrival), so a replayed reject passes exactly when the same packet arriving now would.

- A reject that passes becomes a reading with ``source`` ``replay`` and ``received_at`` the time
  of the replay (the original arrival stays on the reject), stored idempotently by its dedupe
  key: replaying it again, or a packet the device sent again meanwhile, is a duplicate. Its
  reject row is kept, marked ``replayed_at`` and ``message_id``, as the audit trail (deleting it
  would lose the raw payload and the time the gateway first saw it; reject retention removes it
  in time). The reading is unprocessed, so the processor picks it up: woken by the caller
  (``on_stored``), by NOTIFY on PostgreSQL, or at its next interval.
- A reject that still fails keeps its row with the fresh reason, errors and schema version.

Bounded work: at most :data:`MAX_PER_REQUEST` rejects per call, in chunks of :data:`CHUNK` by id,
each chunk one transaction; the result carries the cursor to continue from when more remain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.errors import StoreRefused
from gateway.ingest import Replayed, count_outcomes, to_records, unstorable_reject
from gateway.store._query import encode_cursor
from gateway.store.base import (
    InsertOutcome,
    NewMessage,
    RefusedReject,
    RejectSelection,
    ReplayedReject,
    Store,
    StoredReject,
)

log = logging.getLogger("gateway.replay")

MAX_PER_REQUEST = 10_000
"""Rejects one call examines at most (a request, or one CLI run without ``--all``)."""
CHUNK = 500
"""Rejects per transaction."""

OnStored = Callable[[list[NewMessage], list[InsertOutcome]], None]
"""Told of every committed chunk's readings and outcomes (the API wakes the processor with it)."""


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """Which rejects to replay: by ``ids``, or received in ``[start_time, end_time)`` with an
    optional ``reason``; at most ``limit``, ids above ``after_id`` (a previous ``next_cursor``).
    ``dry_run``: validate and count, change nothing."""

    ids: tuple[int, ...] | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    reason: str | None = None
    limit: int = MAX_PER_REQUEST
    after_id: int = 0
    dry_run: bool = False


@dataclass(slots=True)
class ReplayResult:
    """What a replay did. ``examined`` = ``passed`` + ``still_rejected``; ``passed`` = ``stored``
    + ``duplicates`` (a dry run stores nothing: both stay 0). ``next_cursor``: more remain."""

    examined: int = 0
    passed: int = 0
    stored: int = 0
    duplicates: int = 0
    still_rejected: int = 0
    next_cursor: str | None = None
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        """The API's response body."""
        return {
            "examined": self.examined,
            "passed": self.passed,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "still_rejected": self.still_rejected,
            "next_cursor": self.next_cursor,
            "dry_run": self.dry_run,
        }


async def replay(
    store: Store,
    request: ReplayRequest,
    *,
    max_payload: int,
    device_level: int | None,
    on_stored: OnStored | None = None,
) -> ReplayResult:
    """Replay the rejects ``request`` selects (see the module docstring); returns the counts.

    ``max_payload`` and ``device_level`` are ingest's (``INGEST_MAX_PAYLOAD``, the topic level
    ``MQTT_DEVICE_FROM_TOPIC`` checks). Raises ValueError for a request out of bounds, and what
    the store raises (StoreUnavailable: chunks committed before stay committed; the counts so far
    are lost with the exception, but replaying again is safe).
    """
    if not 1 <= request.limit <= MAX_PER_REQUEST:
        raise ValueError(f"limit must be from 1 to {MAX_PER_REQUEST}")
    if request.ids is not None and request.start_time is not None:
        raise ValueError("select by ids or by time window, not both")
    result = ReplayResult(dry_run=request.dry_run)
    after = request.after_id
    while result.examined < request.limit:
        want = min(CHUNK, request.limit - result.examined)
        chunk = await store.select_rejects(_selection(request, after), want)
        if not chunk:
            return result
        after = chunk[-1].id
        await _replay_chunk(store, chunk, request.dry_run, max_payload, device_level, on_stored, result)
        if len(chunk) < want:
            return result
    if await store.select_rejects(_selection(request, after), 1):
        result.next_cursor = encode_cursor(after)
    return result


def _selection(request: ReplayRequest, after_id: int) -> RejectSelection:
    return RejectSelection(request.ids, request.start_time, request.end_time, request.reason, after_id)


async def _replay_chunk(
    store: Store,
    chunk: list[StoredReject],
    dry_run: bool,
    max_payload: int,
    device_level: int | None,
    on_stored: OnStored | None,
    result: ReplayResult,
) -> None:
    replayed, refused = judge(chunk, max_payload, device_level, datetime.now(UTC))
    result.examined += len(chunk)
    result.passed += len(replayed)
    result.still_rejected += len(refused)
    if dry_run:
        return
    try:
        outcomes = await store.replay_rejects(replayed, refused)
    except StoreRefused:
        # A value the database cannot store (as in ingest): one reject at a time finds it.
        each = await _one_by_one(store, replayed, refused, result)
        replayed = [r for r, o in zip(replayed, each, strict=True) if o is not None]
        outcomes = [o for o in each if o is not None]
    dup = sum(o.duplicate for o in outcomes)
    result.stored += len(outcomes) - dup
    result.duplicates += dup
    count_outcomes(outcomes, "replay")
    if on_stored is not None and outcomes:
        on_stored([r.message for r in replayed], outcomes)


async def _one_by_one(
    store: Store, replayed: list[ReplayedReject], refused: list[RefusedReject], result: ReplayResult
) -> list[InsertOutcome | None]:
    """Each reading in its own transaction; one the database refuses stays an ``unstorable``
    reject (None in the result)."""
    await store.replay_rejects([], refused)
    out: list[InsertOutcome | None] = []
    for r in replayed:
        try:
            [outcome] = await store.replay_rejects([r], [])
        except StoreRefused as exc:
            log.warning("replay: the database refuses reject %d as a reading: %s", r.reject_id, exc)
            m = r.message
            await store.replay_rejects(
                [], [RefusedReject(r.reject_id, unstorable_reject(m.received_at, "replay", m.topic, b""))]
            )
            result.passed -= 1
            result.still_rejected += 1
            out.append(None)
            continue
        out.append(outcome)
    return out


def judge(
    rejects: list[StoredReject], max_payload: int, device_level: int | None, now: datetime
) -> tuple[list[ReplayedReject], list[RefusedReject]]:
    """Validate each reject as ingest would a packet arriving ``now``. Pure."""
    replayed: list[ReplayedReject] = []
    refused: list[RefusedReject] = []
    for r in rejects:
        device = topic_device(r.topic, device_level) if r.source == "mqtt" else None
        messages, again = to_records([Replayed(r.payload, now, r.topic, device)], max_payload, "replay")
        if messages:
            replayed.append(ReplayedReject(r.id, messages[0]))
        else:
            refused.append(RefusedReject(r.id, again[0]))
    return replayed, refused


def topic_device(topic: str | None, level: int | None) -> str | None:
    """The device a topic names at ``level`` (as :mod:`gateway.mqtt` reads it on arrival), or None."""
    if topic is None or level is None:
        return None
    levels = topic.split("/")
    return levels[level] if len(levels) > level else ""
