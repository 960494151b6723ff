"""Rollups and time buckets: the bucket maths, and the contract on both stores (the processor's
commit maintains the rollups; aggregates from rollups and from raw rows agree, and both dialects
give the same answer for the same input)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.rollups import (
    MAX_BUCKETS,
    Aggregate,
    AggregateQuery,
    ceil_bucket,
    floor_bucket,
    format_interval,
    parse_interval,
    parse_intervals,
    rollup_interval,
    sync_plan,
)
from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import Failure, NewMessage, Store
from tests.support.pg import db_settings

T0 = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)  # a Monday, 00:00 UTC
HOUR = 3600
# Float sums: the stores add in different orders, so sums and averages agree to this relative
# tolerance; counts, minima and maxima agree exactly.
REL = 1e-9


# ---- pure ----------------------------------------------------------------------------------------


def test_parse_intervals() -> None:
    assert parse_interval("1h") == 3600
    assert parse_interval(" 15m ") == 900
    assert parse_interval("2d") == 172800
    assert parse_interval("1w") == 604800
    assert parse_intervals("1d,1h,60m,") == (3600, 86400)
    assert parse_intervals("") == ()
    for bad in ("0h", "1y", "h", "1.5h", "-1h", "367d", "1 h"):
        with pytest.raises(ValueError):
            parse_interval(bad)
    assert [format_interval(s) for s in (3600, 86400, 90, 7200, 604800)] == ["1h", "1d", "90s", "2h", "1w"]


def test_buckets_are_epoch_aligned() -> None:
    ts = datetime(2026, 11, 27, 9, 42, 13, 500, tzinfo=UTC)
    assert floor_bucket(ts, HOUR) == datetime(2026, 11, 27, 9, tzinfo=UTC)
    assert ceil_bucket(ts, HOUR) == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert floor_bucket(ts, 86400) == datetime(2026, 11, 27, tzinfo=UTC)
    on = datetime(2026, 11, 27, 9, tzinfo=UTC)
    assert floor_bucket(on, HOUR) == ceil_bucket(on, HOUR) == on
    before = datetime(1969, 12, 31, 23, 30, tzinfo=UTC)  # floor, not truncation, before 1970
    assert floor_bucket(before, HOUR) == datetime(1969, 12, 31, 23, tzinfo=UTC)


def test_rollup_interval_divides_the_bucket() -> None:
    assert rollup_interval(HOUR, (HOUR, 86400)) == HOUR
    assert rollup_interval(86400, (HOUR, 86400)) == 86400
    assert rollup_interval(2 * HOUR, (HOUR, 86400)) == HOUR
    assert rollup_interval(900, (HOUR,)) is None
    assert rollup_interval(HOUR, ()) is None


def test_span_widens_to_whole_buckets_and_is_bounded() -> None:
    q = AggregateQuery("d", "t", HOUR, T0 + timedelta(minutes=5), T0 + timedelta(hours=2, minutes=1))
    assert q.span() == (T0, T0 + timedelta(hours=3))
    with pytest.raises(ValueError, match="after"):
        AggregateQuery("d", "t", HOUR, T0, T0).span()
    with pytest.raises(ValueError, match="buckets"):
        AggregateQuery("d", "t", 1, T0, T0 + timedelta(seconds=MAX_BUCKETS + 1)).span()


def test_sync_plan() -> None:
    plan = sync_plan((HOUR, 86400), {86400, 900})
    assert (plan.add, plan.drop) == ((HOUR,), (900,))


# ---- the contract on both stores -----------------------------------------------------------------


def reading(device: str, seconds: float, values: dict[str, float | int], n: int) -> NewMessage:
    ts = T0 + timedelta(seconds=seconds)
    return NewMessage(device, ts, n, f"seq:{n}", values, "ok", None, "mqtt", ts)


def fleet() -> list[NewMessage]:
    """Three devices over 26 hours, irregular times across hour and day boundaries, ints and floats,
    a measurement some readings lack."""
    out = []
    for n in range(600):
        device = f"dev-{n % 3}"
        seconds = n * 157.3 + (n % 7) * 11
        values: dict[str, float | int] = {"temperature": 20 + (n % 13) * 0.37 - (n % 5), "count": n % 9}
        if n % 4 == 0:
            values["humidity"] = 40.5 + n % 3
        out.append(reading(device, seconds, values, n))
    return out


async def process_all(store: Store, owner: str = "p1") -> int:
    """Claim and complete every waiting message; returns how many."""
    total = 0
    while batch := await store.claim(owner, 137, 60.0):
        await store.complete(owner, [m.id for m in batch], [], [])
        total += len(batch)
    return total


def expected(messages: list[NewMessage], device: str, measurement: str, bucket: int) -> dict[datetime, list[float]]:
    out: dict[datetime, list[float]] = {}
    for m in messages:
        if m.device_id == device and measurement in m.measurements:
            out.setdefault(floor_bucket(m.device_ts, bucket), []).append(float(m.measurements[measurement]))
    return out


def figures(agg: Aggregate) -> list[tuple[datetime, int, float, float, float]]:
    return [(b.start, b.count, b.sum, b.min, b.max) for b in agg.buckets]


def assert_same(a: Aggregate, b: Aggregate) -> None:
    """Same buckets, counts, minima and maxima; sums within REL."""
    assert [(x[0], x[1], x[3], x[4]) for x in figures(a)] == [(x[0], x[1], x[3], x[4]) for x in figures(b)]
    for x, y in zip(a.buckets, b.buckets, strict=True):
        assert math.isclose(x.sum, y.sum, rel_tol=REL)


def assert_matches(agg: Aggregate, want: dict[datetime, list[float]]) -> None:
    assert [b.start for b in agg.buckets] == sorted(want)
    for b in agg.buckets:
        values = want[b.start]
        assert (b.count, b.min, b.max) == (len(values), min(values), max(values))
        assert math.isclose(b.sum, math.fsum(values), rel_tol=REL)
        assert math.isclose(b.value("avg"), math.fsum(values) / len(values), rel_tol=REL)
        assert b.value("count") == len(values)


@asynccontextmanager
async def running(settings: DatabaseSettings) -> AsyncIterator[Store]:
    async with open_store(settings) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)
        yield st
        nursery.cancel_scope.cancel()


def with_rollups(settings: DatabaseSettings, intervals: str = "1h,1d") -> DatabaseSettings:
    return settings.model_copy(update={"rollup_intervals": parse_intervals(intervals)})


WEEK = AggregateQuery("dev-1", "temperature", HOUR, T0 - timedelta(days=1), T0 + timedelta(days=2))


async def test_rollups_match_raw_and_the_readings(store_settings: DatabaseSettings) -> None:
    messages = fleet()
    async with running(with_rollups(store_settings)) as store:
        await store.write_batch(messages, [])
        # Nothing processed yet: the rollups do not cover the range, raw rows answer.
        before = await store.aggregate(WEEK)
        assert before.source == "raw"
        assert_matches(before, expected(messages, "dev-1", "temperature", HOUR))

        assert await process_all(store) == len(messages)
        for measurement in ("temperature", "count", "humidity"):
            for bucket in (HOUR, 2 * HOUR, 86400):
                q = AggregateQuery("dev-1", measurement, bucket, WEEK.start, WEEK.end)
                rolled = await store.aggregate(q)
                raw = await store.aggregate(_raw(q))
                assert (rolled.source, raw.source) == ("rollup", "raw")
                assert rolled.interval == (86400 if bucket == 86400 else HOUR)
                assert_same(rolled, raw)
                assert_matches(rolled, expected(messages, "dev-1", measurement, bucket))
        # A bucket no interval divides is answered from raw rows, correctly.
        q15 = AggregateQuery("dev-2", "temperature", 900, T0, T0 + timedelta(hours=5))
        fifteen = await store.aggregate(q15)
        assert fifteen.source == "raw"
        want = expected([m for m in messages if m.device_ts < T0 + timedelta(hours=5)], "dev-2", "temperature", 900)
        assert_matches(fifteen, want)
        # Unknown device or measurement: no buckets.
        assert (await store.aggregate(AggregateQuery("nobody", "temperature", HOUR, T0, WEEK.end))).buckets == []
        assert (await store.aggregate(AggregateQuery("dev-1", "nothing", HOUR, T0, WEEK.end))).buckets == []


def _raw(q: AggregateQuery) -> AggregateQuery:
    return AggregateQuery(q.device_id, q.measurement, q.bucket, q.start, q.end, source="raw")


async def test_a_reading_waiting_in_the_range_means_raw(store_settings: DatabaseSettings) -> None:
    messages = fleet()
    async with running(with_rollups(store_settings)) as store:
        await store.write_batch(messages, [])
        await process_all(store)
        late = reading("dev-1", 5 * HOUR + 1, {"temperature": 99.0}, 10_000)
        await store.write_batch([late], [])
        agg = await store.aggregate(WEEK)
        assert agg.source == "raw"
        assert_matches(agg, expected([*messages, late], "dev-1", "temperature", HOUR))
        # A range without the waiting reading is still covered.
        early = await store.aggregate(AggregateQuery("dev-1", "temperature", HOUR, T0, T0 + timedelta(hours=4)))
        assert early.source == "rollup"
        await process_all(store)
        after = await store.aggregate(WEEK)
        assert after.source == "rollup"
        assert_matches(after, expected([*messages, late], "dev-1", "temperature", HOUR))


async def test_failed_and_lost_leases_are_not_counted(store_settings: DatabaseSettings) -> None:
    """A failed attempt adds nothing (the retry that succeeds does, once); a commit for a lease
    another processor took over adds nothing; a dead-lettered reading keeps its range raw."""
    async with running(with_rollups(store_settings, "1h")) as store:
        outs = await store.write_batch([reading("d", 60 * n, {"t": n}, n) for n in range(6)], [])
        ids = [o.id for o in outs]
        batch = await store.claim("p1", 10, 60.0)
        retry = datetime.now(UTC) - timedelta(seconds=1)
        await store.complete("p1", ids[:3], [Failure(ids[3], "boom", retry), Failure(ids[4], "dead", None)], [], None)
        assert len(batch) == 6
        await store.complete("someone-else", [ids[5]], [], [])  # not its lease: ignored
        q = AggregateQuery("d", "t", HOUR, T0, T0 + timedelta(hours=1))
        assert (await store.aggregate(q)).source == "raw"  # 3, 5 wait; 4 is dead
        # 3 is due again (another processor takes it); 5 is still p1's.
        again = await store.claim("p2", 10, 60.0)
        assert [m.id for m in again] == [ids[3]]
        await store.complete("p2", [ids[3]], [], [])
        await store.complete("p1", [ids[5]], [], [])
        agg = await store.aggregate(q)
        assert agg.source == "raw"  # the dead reading stays in range
        assert [(b.count, b.sum) for b in agg.buckets] == [(6, 15.0)]
        # The rollup itself holds exactly the five processed readings, once each.
        assert await _rollup_rows(store) == [("d", "t", T0, 5, 11.0, 0.0, 5.0)]


async def _rollup_rows(store: Store) -> list[tuple[Any, ...]]:
    """Every hourly rollup row (device, measurement, bucket, count, sum, min, max)."""
    sql = (
        "SELECT device_id, measurement, bucket_start, count, sum, min, max FROM rollups"
        " WHERE interval_s = 3600 ORDER BY 1, 2, 3"
    )
    if store.kind == "postgres":
        rows = await store._run(lambda conn: conn.fetch(sql))  # type: ignore[attr-defined]
        return [tuple(r) for r in rows]
    from gateway.store._common import ts_parse

    rows = await store._call(lambda conn: conn.execute(sql).fetchall())  # type: ignore[attr-defined]
    return [(r[0], r[1], ts_parse(r[2]), r[3], float(r[4]), float(r[5]), float(r[6])) for r in rows]


async def test_enabling_backfills_and_disabling_drops(store_settings: DatabaseSettings) -> None:
    messages = fleet()
    async with running(store_settings) as store:  # rollups off
        await store.write_batch(messages, [])
        await process_all(store)
        assert (await store.aggregate(WEEK)).source == "raw"
    async with running(with_rollups(store_settings, "1h")) as store:
        agg = await store.aggregate(WEEK)
        assert agg.source == "rollup"
        assert_matches(agg, expected(messages, "dev-1", "temperature", HOUR))
        # More readings after the backfill are added once, not twice.
        more = [reading("dev-1", 40 * HOUR + n, {"temperature": n}, 20_000 + n) for n in range(5)]
        await store.write_batch(more, [])
        await process_all(store)
        assert_matches(await store.aggregate(WEEK), expected([*messages, *more], "dev-1", "temperature", HOUR))
    async with running(store_settings) as store:  # off again: the rows go
        assert await _rollup_rows(store) == []


async def test_both_dialects_give_the_same_answer(tmp_path: Path, pg_url: str) -> None:
    messages = fleet()
    answers: list[list[Aggregate]] = []
    for url in (f"sqlite:///{tmp_path}/gateway.db", pg_url):
        async with running(with_rollups(db_settings(url))) as store:
            await store.write_batch(messages, [])
            await process_all(store)
            got = []
            for device in ("dev-0", "dev-1", "dev-2"):
                for measurement in ("temperature", "count", "humidity"):
                    for bucket in (900, HOUR, 86400):
                        q = AggregateQuery(device, measurement, bucket, WEEK.start, WEEK.end)
                        got += [await store.aggregate(q), await store.aggregate(_raw(q))]
            answers.append(got)
    sqlite_answers, pg_answers = answers
    for a, b in zip(sqlite_answers, pg_answers, strict=True):
        assert a.source == b.source
        assert_same(a, b)
