"""Retention: expired events, rejects and (optionally) processed readings are deleted, oldest first.

One mechanism for every table: :func:`prune_expired` deletes in batches of ``batch`` rows, one
short transaction each, and yields between batches, so a large backlog of expired rows never
holds the writer (SQLite) or many row locks (PostgreSQL) for long: ingest's commits interleave.
The processor calls it every few minutes (``PROCESSOR`` housekeeping). Rows removed are counted
in ``gateway_retention_deleted_total{table}``.

On PostgreSQL ``messages`` is partitioned by ``received_at`` (migration 0004): each run first has
the store create the coming partitions and drop every partition wholly older than the retention
whose readings are all processed (:meth:`Store.maintain_partitions`); the batched delete then
takes the processed rows of partly expired ones. What was done is kept in the store's health
detail (``retention``: the settings, the last run, rows deleted, partitions), shown by ``/ping``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import trio

from gateway import metrics
from gateway.settings import DatabaseSettings
from gateway.store.base import Partitions, PruneTable, Store

log = logging.getLogger("gateway.retention")

BATCH = 500  # rows per DELETE transaction
KEY_BATCH_FACTOR = 10  # dedupe keys (narrow rows, deleted by primary key) per transaction: BATCH times this


@dataclass(frozen=True)
class RetentionPolicy:
    """Seconds each table's rows are kept; None keeps them forever. ``messages``: processed only."""

    events: float | None = 7 * 86400.0
    rejects: float | None = 30 * 86400.0
    messages: float | None = None
    batch: int = BATCH

    @classmethod
    def from_settings(cls, s: DatabaseSettings) -> RetentionPolicy:
        """``EVENT_RETENTION``, ``REJECT_RETENTION`` and ``MESSAGE_RETENTION``."""
        return cls(events=s.event_retention, rejects=s.reject_retention, messages=s.message_retention)

    def periods(self) -> dict[PruneTable, float | None]:
        """Retention per table, in pruning order."""
        return {"events": self.events, "rejects": self.rejects, "messages": self.messages}


async def prune_expired(store: Store, policy: RetentionPolicy, now: datetime) -> dict[PruneTable, int]:
    """Delete every row older than its table's retention (as of ``now``), in batches; returns how
    many rows went per table (tables with a retention only). Creates the coming partitions of
    messages (PostgreSQL) whether or not messages expire. Raises what the store raises
    (StoreUnavailable: try again later)."""
    out: dict[PruneTable, int] = {}
    message_cutoff = now - timedelta(seconds=policy.messages) if policy.messages is not None else None
    parts = await store.maintain_partitions(now, message_cutoff, policy.batch * KEY_BATCH_FACTOR)
    metrics.RETENTION_DELETED.labels("messages").inc(parts.dropped_rows)
    for table, seconds in policy.periods().items():
        if seconds is None:
            continue
        cutoff = now - timedelta(seconds=seconds)
        total = parts.dropped_rows if table == "messages" else 0
        while True:
            removed = await store.prune(table, cutoff, policy.batch)
            total += removed
            metrics.RETENTION_DELETED.labels(table).inc(removed)
            if removed < policy.batch:
                break
            await trio.lowlevel.checkpoint()  # waiting writes take the database between batches
        out[table] = total
        if total:
            log.info("retention removed table=%s count=%d retention_s=%g", table, total, seconds)
    _report(store, policy, now, out, parts)
    return out


def _report(
    store: Store, policy: RetentionPolicy, now: datetime, removed: dict[PruneTable, int], parts: Partitions
) -> None:
    """Keep this run's outcome in the store's health detail (``/ping`` shows it with a key)."""
    previous: dict[str, Any] = store.health.detail.get("retention") or {}
    totals: dict[str, int] = dict(previous.get("deleted_total") or {})
    for table, count in removed.items():
        totals[table] = totals.get(table, 0) + count
    detail: dict[str, Any] = {
        "retention_seconds": {t: s for t, s in policy.periods().items()},
        "last_run": now.isoformat(),
        "deleted_last_run": dict(removed),
        "deleted_total": totals,
    }
    if store.kind == "postgres":
        detail["partitions"] = {
            "count": parts.count,
            "oldest": parts.oldest,
            "oldest_ends": parts.oldest_ends.isoformat() if parts.oldest_ends else None,
            "dropped_last_run": list(parts.dropped),
        }
    store.health.detail["retention"] = detail


DEFAULT_POLICY = RetentionPolicy()
