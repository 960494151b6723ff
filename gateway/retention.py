"""Retention: expired events, rejects and (optionally) processed readings are deleted, oldest first.

One mechanism for every table: :func:`prune_expired` deletes in batches of ``batch`` rows, one
short transaction each, and yields between batches, so a large backlog of expired rows never
holds the writer (SQLite) or many row locks (PostgreSQL) for long: ingest's commits interleave.
The processor calls it every few minutes (``PROCESSOR`` housekeeping). Rows removed are counted
in ``gateway_retention_deleted_total{table}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import trio

from gateway import metrics
from gateway.settings import DatabaseSettings
from gateway.store.base import PruneTable, Store

log = logging.getLogger("gateway.retention")

BATCH = 500  # rows per DELETE transaction


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
    many rows went per table. Raises what the store raises (StoreUnavailable: try again later)."""
    out: dict[PruneTable, int] = {}
    for table, seconds in policy.periods().items():
        if seconds is None:
            continue
        cutoff = now - timedelta(seconds=seconds)
        total = 0
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
    return out


DEFAULT_POLICY = RetentionPolicy()
