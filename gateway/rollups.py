"""Rollups and time buckets: the bucket maths and the SQL both stores run for them. Pure, no I/O.

A rollup row holds ``count``, ``sum``, ``min`` and ``max`` of one measurement of one device over
one bucket of ``interval_s`` seconds. Buckets are aligned to the Unix epoch in UTC (an hourly
bucket starts on the hour, a daily one at 00:00 UTC) by the reading's own ``device_ts``.

Rollups are maintained in the processor's commit (:meth:`Store.complete`): the statement that
marks a batch processed also adds the batch's readings to their buckets, so a reading is counted
exactly once, when its ``processed_at`` is set (it is set once). Which intervals are kept is the
``rollup_intervals`` table: :func:`sync_plan` compares it with ``ROLLUP_INTERVALS`` at start-up;
a new interval is backfilled from the processed readings in the same transaction that lists it
(PostgreSQL: under a lock that holds off concurrent commits, so nothing is counted twice).

An aggregate over ``[start, end)`` is answered from the rollups when a kept interval divides the
bucket and no reading in the range still waits for the processor (or is dead-lettered); otherwise
from the raw rows (``GROUP BY`` on the same bucket expression). Both give the same count, min and
max; sums (hence averages) agree to float rounding (the order of additions differs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Agg = Literal["avg", "min", "max", "count"]
AGGS: tuple[Agg, ...] = ("avg", "min", "max", "count")
AggSource = Literal["rollup", "raw"]

MAX_BUCKETS = 10_000  # per answer: a week of 1-minute buckets
MAX_INTERVAL = 366 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
BUCKET_PATTERN = r"^[1-9][0-9]{0,6}[smhdw]$"  # a duration as the API and ROLLUP_INTERVALS spell it
_INTERVAL_RE = re.compile(r"([1-9][0-9]{0,6})([smhdw])")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_interval(text: str) -> int:
    """``"15m"``, ``"1h"``, ``"1d"`` … as seconds (units s, m, h, d, w; at most 366 days).

    Raises ValueError for anything else."""
    match = _INTERVAL_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 1h (a number and one of s, m, h, d, w)")
    seconds = int(match[1]) * _UNITS[match[2]]
    if seconds > MAX_INTERVAL:
        raise ValueError(f"{text!r} is longer than 366 days")
    return seconds


def parse_intervals(text: str) -> tuple[int, ...]:
    """A comma-separated list of durations (``"1h,1d"``) as sorted, distinct seconds; ``""`` none."""
    return tuple(sorted({parse_interval(part) for part in text.split(",") if part.strip()}))


def format_interval(seconds: int) -> str:
    """The shortest spelling of ``seconds`` in the largest whole unit (3600 → ``"1h"``)."""
    for unit, size in sorted(_UNITS.items(), key=lambda u: -u[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise AssertionError("unreachable: 1 s divides everything")


def floor_bucket(ts: datetime, seconds: int) -> datetime:
    """The start of the epoch-aligned bucket of ``seconds`` that holds ``ts``."""
    offset = ts - _EPOCH
    whole = offset // timedelta(seconds=seconds)
    return _EPOCH + whole * timedelta(seconds=seconds)


def ceil_bucket(ts: datetime, seconds: int) -> datetime:
    """``ts`` when it starts a bucket, else the start of the next one."""
    start = floor_bucket(ts, seconds)
    return start if start == ts else start + timedelta(seconds=seconds)


def rollup_interval(bucket: int, intervals: tuple[int, ...]) -> int | None:
    """The largest kept interval that divides ``bucket`` (its buckets nest in ours), or None."""
    fitting = [i for i in intervals if bucket % i == 0]
    return max(fitting) if fitting else None


@dataclass(frozen=True, slots=True)
class AggregateQuery:
    """``GET /messages/aggregate``: one measurement of one device in buckets of ``bucket`` seconds.

    The range is ``[start, end)`` widened to whole buckets (see :meth:`span`). ``source`` "raw"
    skips the rollups (benchmarks and the tests that compare both)."""

    device_id: str
    measurement: str
    bucket: int
    start: datetime
    end: datetime
    source: Literal["auto", "raw"] = "auto"

    def span(self) -> tuple[datetime, datetime]:
        """``start`` rounded down and ``end`` rounded up to the bucket size.

        Raises ValueError when the range is empty or holds more than :data:`MAX_BUCKETS` buckets."""
        if self.bucket < 1:
            raise ValueError("bucket must be at least 1 s")
        if self.end <= self.start:
            raise ValueError("end_time must be after start_time")
        start, end = floor_bucket(self.start, self.bucket), ceil_bucket(self.end, self.bucket)
        if (end - start) // timedelta(seconds=self.bucket) > MAX_BUCKETS:
            raise ValueError(f"more than {MAX_BUCKETS} buckets: widen the bucket or narrow the range")
        return start, end


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket's figures (``start``: UTC)."""

    start: datetime
    count: int
    sum: float
    min: float
    max: float

    def value(self, agg: Agg) -> float | int:
        """The figure ``agg`` asks for."""
        if agg == "count":
            return self.count
        if agg == "min":
            return self.min
        if agg == "max":
            return self.max
        return self.sum / self.count


@dataclass(frozen=True, slots=True)
class Aggregate:
    """An answer: buckets with readings, oldest first, and which source answered."""

    source: AggSource
    buckets: list[Bucket]
    interval: int | None = None  # the rollup interval used (None: raw rows)


# ---- SQL: PostgreSQL ----------------------------------------------------------------------------
# Buckets: date_bin(stride, ts, epoch) (PostgreSQL 14+) floors to epoch-aligned strides.

_PG_BUCKET = "date_bin(make_interval(secs => {s}), {ts}, timestamptz '1970-01-01 00:00:00+00')"

# Rolled-up readings of a set of rows ``{src}`` (device_id, device_ts, measurements), for every
# kept interval, aggregated per key; ordered by key so concurrent upserts lock rows in one order.
_PG_ROLLUP_SELECT = f"""
SELECT i.interval_s, r.device_id, m.key, {_PG_BUCKET.format(s="i.interval_s", ts="r.device_ts")} AS b,
       count(*), sum(m.v), min(m.v), max(m.v)
FROM {{src}} r
CROSS JOIN rollup_intervals i
CROSS JOIN LATERAL (SELECT e.key, e.value::float8 AS v FROM jsonb_each(r.measurements) e
                    WHERE jsonb_typeof(e.value) = 'number') m
{{where}}
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""
_PG_UPSERT = """
INSERT INTO rollups AS o (interval_s, device_id, measurement, bucket_start, count, sum, min, max)
{select}
ON CONFLICT (interval_s, device_id, measurement, bucket_start) DO UPDATE
SET count = o.count + excluded.count, sum = o.sum + excluded.sum,
    min = least(o.min, excluded.min), max = greatest(o.max, excluded.max)
"""
PG_ROLLUP_CTE = (
    "rolled AS ("
    + _PG_UPSERT.format(select=_PG_ROLLUP_SELECT.format(src="done", where="")).strip()
    + "\n    RETURNING 1\n)"
)
"""A CTE for the processor's commit: rolls up the rows of the ``done`` CTE (the messages just
marked processed; it must return device_id, device_ts and measurements)."""

PG_BACKFILL = _PG_UPSERT.format(
    select=_PG_ROLLUP_SELECT.format(src="messages", where="WHERE r.processed_at IS NOT NULL AND i.interval_s = $1")
)
"""Adds every processed reading to the buckets of interval ``$1`` (a new interval)."""

PG_ROLLUP_READ = f"""
SELECT {_PG_BUCKET.format(s="$1::int", ts="bucket_start")} AS b, sum(count)::bigint, sum(sum), min(min), max(max)
FROM rollups
WHERE interval_s = $2 AND device_id = $3 AND measurement = $4 AND bucket_start >= $5 AND bucket_start < $6
GROUP BY b ORDER BY b
"""
PG_RAW_READ = f"""
SELECT {_PG_BUCKET.format(s="$1::int", ts="device_ts")} AS b, count(v), sum(v), min(v), max(v)
FROM (SELECT device_ts, (measurements ->> $4::text)::float8 AS v FROM messages
      WHERE device_id = $2 AND device_ts >= $3 AND device_ts < $5
        AND jsonb_typeof(measurements -> $4::text) = 'number') s
GROUP BY b ORDER BY b
"""
# Readings in range not rolled up yet (waiting or dead): each test uses its partial index.
PG_PENDING = """
SELECT EXISTS (SELECT 1 FROM messages WHERE processed_at IS NULL AND dead_at IS NULL
               AND device_id = $1 AND device_ts >= $2 AND device_ts < $3)
    OR EXISTS (SELECT 1 FROM messages WHERE dead_at IS NOT NULL
               AND device_id = $1 AND device_ts >= $2 AND device_ts < $3)
"""

# ---- SQL: SQLite --------------------------------------------------------------------------------
# Times are fixed-width UTC text; a bucket is computed on epoch seconds (floor division that is
# also right before 1970) and written back in the same text form.

_SQLITE_EPOCH = "CAST(strftime('%s', {ts}) AS INTEGER)"
_SQLITE_FLOOR = "({e} - ((({e}) % {s}) + {s}) % {s})"
_SQLITE_TEXT = "strftime('%Y-%m-%dT%H:%M:%S.000000Z', {x}, 'unixepoch')"


def _sqlite_bucket(ts: str, s: str) -> str:
    return _SQLITE_TEXT.format(x=_SQLITE_FLOOR.format(e=_SQLITE_EPOCH.format(ts=ts), s=s))


_SQLITE_ROLLUP_SELECT = f"""
SELECT i.interval_s, r.device_id, m.key, {_sqlite_bucket("r.device_ts", "i.interval_s")} AS b,
       count(*), sum(m.value), min(m.value), max(m.value)
FROM messages r
CROSS JOIN json_each(r.measurements) m  -- CROSS JOIN keeps this order: each row's JSON parsed once
CROSS JOIN rollup_intervals i
WHERE m.type IN ('integer', 'real') AND {{where}}
GROUP BY 1, 2, 3, 4
"""
_SQLITE_UPSERT = """
INSERT INTO rollups (interval_s, device_id, measurement, bucket_start, count, sum, min, max)
{select}
ON CONFLICT (interval_s, device_id, measurement, bucket_start) DO UPDATE
SET count = count + excluded.count, sum = sum + excluded.sum,
    min = min(min, excluded.min), max = max(max, excluded.max)
"""
_PROCESSED_NOW = "r.id IN (SELECT value FROM json_each(?))"
SQLITE_ROLLUP = _SQLITE_UPSERT.format(select=_SQLITE_ROLLUP_SELECT.format(where=_PROCESSED_NOW))
"""Rolls up the messages whose ids are the JSON array ``?`` (just marked processed)."""

SQLITE_BACKFILL = _SQLITE_UPSERT.format(
    select=_SQLITE_ROLLUP_SELECT.format(where="r.processed_at IS NOT NULL AND i.interval_s = ?")
)
"""Adds every processed reading to the buckets of interval ``?`` (a new interval)."""

SQLITE_ROLLUP_READ = f"""
SELECT {_sqlite_bucket("bucket_start", ":bucket")} AS b, sum(count), sum(sum), min(min), max(max)
FROM rollups
WHERE interval_s = :interval AND device_id = :device AND measurement = :m
  AND bucket_start >= :start AND bucket_start < :end
GROUP BY b ORDER BY b
"""
SQLITE_RAW_READ = f"""
SELECT {_sqlite_bucket("device_ts", ":bucket")} AS b, count(v), sum(v), min(v), max(v)
FROM (SELECT r.device_ts, m.value AS v FROM messages r CROSS JOIN json_each(r.measurements) m
      WHERE r.device_id = :device AND r.device_ts >= :start AND r.device_ts < :end
        AND m.key = :m AND m.type IN ('integer', 'real')) s
GROUP BY b ORDER BY b
"""
# json_each rather than json_extract: a key is matched as it is, with no JSON path to escape.
# INDEXED BY: SQLite's planner would rather walk (device_id, device_ts) over the whole range.
SQLITE_PENDING = """
SELECT EXISTS (SELECT 1 FROM messages INDEXED BY messages_backlog WHERE processed_at IS NULL AND dead_at IS NULL
               AND device_id = :device AND device_ts >= :start AND device_ts < :end)
    OR EXISTS (SELECT 1 FROM messages INDEXED BY messages_dead WHERE dead_at IS NOT NULL
               AND device_id = :device AND device_ts >= :start AND device_ts < :end)
"""


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What start-up changes in ``rollup_intervals``: intervals to add (and backfill), to drop."""

    add: tuple[int, ...]
    drop: tuple[int, ...]


def sync_plan(wanted: tuple[int, ...], kept: set[int]) -> SyncPlan:
    """Make the kept intervals those of ``ROLLUP_INTERVALS``."""
    return SyncPlan(tuple(sorted(set(wanted) - kept)), tuple(sorted(kept - set(wanted))))
