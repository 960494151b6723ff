"""Time partitions of ``messages`` (PostgreSQL, migration 0004): periods, names and the plan.

Pure functions; :class:`~gateway.store.postgres.PostgresStore` runs the plan. Ranges are in UTC,
``[lower, upper)`` on ``received_at``, one day or one calendar month (``MESSAGE_PARTITION``). The
partitions are contiguous: each new one starts where the newest ends (the first after migration
0004 starts at the day boundary that ends ``messages_legacy``), so a change of period length
applies from the next partition on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Period = Literal["day", "month"]

AHEAD = 2  # periods created beyond the current one
DEFAULT_PARTITION = "messages_default"


@dataclass(frozen=True, slots=True)
class RangePartition:
    """One partition as the catalog describes it; ``lower`` None: MINVALUE."""

    name: str
    lower: datetime | None
    upper: datetime


def period_start(t: datetime, period: Period) -> datetime:
    """The start (UTC) of the period holding ``t``."""
    t = t.astimezone(UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def next_boundary(t: datetime, period: Period) -> datetime:
    """The first period boundary strictly after ``t``."""
    start = period_start(t, period)
    if period == "day":
        return start + timedelta(days=1)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def partition_name(lower: datetime) -> str:
    """``messages_pYYYYMMDD``: named by the (UTC) day it starts."""
    return f"messages_p{lower.astimezone(UTC):%Y%m%d}"


def missing(existing: list[RangePartition], now: datetime, period: Period) -> list[tuple[datetime, datetime]]:
    """The ranges to create so that partitions cover up to the end of the period ``AHEAD`` after
    the current one: each starts where the newest existing one ends (or at the current period's
    start when there is none) and ends at the next period boundary."""
    end = period_start(now, period)
    for _ in range(AHEAD + 1):
        end = next_boundary(end, period)
    start = max((p.upper for p in existing), default=period_start(now, period))
    out = []
    while start < end:
        upper = next_boundary(start, period)
        out.append((start, upper))
        start = upper
    return out


def expired(existing: list[RangePartition], older_than: datetime) -> list[RangePartition]:
    """Partitions whose whole range is before ``older_than``, oldest first."""
    return sorted((p for p in existing if p.upper <= older_than), key=lambda p: p.upper)
