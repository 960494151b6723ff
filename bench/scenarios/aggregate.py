"""Aggregate: hourly buckets of one device over a week, from the rollups and from the raw rows.

One week of readings (full run: 100 devices at one reading per 10 s, 6,048,000 rows; quick: 20
devices at one per 60 s) is written straight into a fresh database with bulk SQL (a
``generate_series`` / recursive CTE ``INSERT … SELECT``, secondary indexes built afterwards), as
already processed. The store then starts with ``ROLLUP_INTERVALS=1h,1d``, which backfills the
rollups (timed). Then ``Store.aggregate`` is called for hourly averages of one measurement of one
device over the whole week, rotating over the devices, from the rollups and from the raw rows
(``source="raw"``): p50/p99 per store (in process: the store's own cost, no HTTP). Target: p99 ≤ 50 ms.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from bench.harness import PG_BIN, Options, Postgres, Result, pct, table, workdir
from gateway.rollups import AggregateQuery
from gateway.settings import DatabaseSettings
from gateway.store import open_store

START = datetime(2026, 11, 16, tzinfo=UTC)  # a Monday
WEEK = timedelta(days=7)
_START_EPOCH = int(START.timestamp())
_INDEXES = ("messages_backlog", "messages_dead", "messages_device_ts", "messages_ts", "messages_measurements")

# Readings n = 0 … N-1 (time-major, as they would arrive) x devices d = 0 … D-1, every STEP s.
_PG_LOAD = """
INSERT INTO messages (device_id, dedupe_key, device_ts, received_at, seq, measurements, status, battery,
                      source, processed_at)
SELECT 'agg-' || lpad(d::text, 3, '0'), 'seq:' || n, t, t, n,
       jsonb_build_object('temperature', round((20 + ((n * 7 + d * 13) % 100) / 20.0)::numeric, 2),
                          'humidity', round((40 + ((n * 3 + d) % 50) / 5.0)::numeric, 1)),
       'ok', 87, 'mqtt', t
FROM generate_series(0, {n} - 1) n
CROSS JOIN generate_series(0, {d} - 1) d
CROSS JOIN LATERAL (SELECT to_timestamp({start} + n * {step}) AS t) ts
"""
_SQLITE_LOAD = """
WITH RECURSIVE r(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM r WHERE n + 1 < {n}),
     dev(d) AS (SELECT 0 UNION ALL SELECT d + 1 FROM dev WHERE d + 1 < {d})
INSERT INTO messages (device_id, dedupe_key, device_ts, received_at, seq, measurements, status, battery,
                      source, processed_at)
SELECT 'agg-' || printf('%03d', d), 'seq:' || n, t, t, n,
       json_object('temperature', round(20 + ((n * 7 + d * 13) % 100) / 20.0, 2),
                   'humidity', round(40 + ((n * 3 + d) % 50) / 5.0, 1)),
       'ok', 87, 'mqtt', t
FROM (SELECT n, d, strftime('%Y-%m-%dT%H:%M:%S.000000Z', {start} + n * {step}, 'unixepoch') AS t
      FROM r CROSS JOIN dev ORDER BY n, d)
"""


def _settings(url: str, rollups: str = "") -> DatabaseSettings:
    return DatabaseSettings.model_validate(
        {"DATABASE_URL": url, "DATABASE_QUERY_TIMEOUT": 120.0, "API_QUERY_TIMEOUT": 30.0, "ROLLUP_INTERVALS": rollups}
    )


async def _migrate(url: str) -> None:
    async with open_store(_settings(url)) as store:
        await store.migrate()


def _index_ddl_pg(port: int) -> list[str]:
    names = ",".join(f"'{i}'" for i in _INDEXES)  # fixed names
    out = _psql(port, f"SELECT indexdef FROM pg_indexes WHERE indexname IN ({names})")
    return [line.strip() for line in out.splitlines() if line.strip()]


def _psql(port: int, sql: str) -> str:
    cmd = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "bench"]
    done = subprocess.run([*cmd, "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace"))
    return done.stdout.decode()


def _load_pg(port: int, devices: int, readings: int, step: int) -> None:
    ddl = _index_ddl_pg(port)
    _psql(port, "; ".join(f"DROP INDEX {i}" for i in _INDEXES))
    _psql(port, _PG_LOAD.format(n=readings, d=devices, start=_START_EPOCH, step=step))
    _psql(port, "SET maintenance_work_mem = '256MB'; " + "; ".join(ddl) + "; ANALYZE messages")


def _load_sqlite(path: Path, devices: int, readings: int, step: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        ddl = [
            r[0]
            for r in conn.execute(
                f"SELECT sql FROM sqlite_master WHERE type = 'index' AND name IN ({','.join('?' * len(_INDEXES))})",
                _INDEXES,
            )
        ]
        conn.execute("BEGIN")
        for name in _INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        conn.execute(_SQLITE_LOAD.format(n=readings, d=devices, start=_START_EPOCH, step=step))
        for statement in ddl:
            conn.execute(statement)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def _measure(backend: str, url: str, load: Any, devices: int, queries: int) -> dict[str, Any]:
    await _migrate(url)
    t0 = time.monotonic()
    await trio.to_thread.run_sync(load)
    load_s = time.monotonic() - t0
    out: dict[str, Any] = {"backend": backend, "load_s": load_s}
    async with open_store(_settings(url, "1h,1d")) as store:
        t0 = time.monotonic()
        await store.migrate()  # adds 1h and 1d, backfilled from the processed rows
        out["rollup_build_s"] = time.monotonic() - t0
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for source in ("auto", "raw"):
                times = []
                answered = set()
                buckets = 0
                for i in range(queries):
                    q = AggregateQuery(f"agg-{i % devices:03d}", "temperature", 3600, START, START + WEEK, source)
                    t = time.perf_counter()
                    agg = await store.aggregate(q)
                    times.append((time.perf_counter() - t) * 1000)
                    answered.add(agg.source)
                    buckets = len(agg.buckets)
                key = "rollup" if source == "auto" else "raw"
                out[key] = {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99), "sources": sorted(answered)}
                out["buckets"] = buckets
            nursery.cancel_scope.cancel()
    return out


async def run(opts: Options) -> Result:
    res = Result("aggregate")
    devices, step = (20, 60) if opts.quick else (100, 10)
    readings = int(WEEK.total_seconds()) // step
    queries = 50 if opts.quick else 200
    runs = []
    with workdir("aggregate") as d:
        path = d / "aggregate.db"
        runs.append(
            await _measure(
                "sqlite", f"sqlite:///{path}", lambda: _load_sqlite(path, devices, readings, step), devices, queries
            )
        )
        with Postgres(d) as pg:
            runs.append(
                await _measure("postgres", pg.dsn, lambda: _load_pg(pg.port, devices, readings, step), devices, queries)
            )
    rows = devices * readings
    res.data = {"rows": rows, "devices": devices, "step_s": step, "queries": queries, "runs": runs}
    res.tables.append(
        table(
            f"aggregate: hourly avg of one device over a week ({rows:,} rows, {devices} devices, 1 per {step} s;"
            f" {queries} queries each; target p99 <= 50 ms)",
            [
                "backend",
                "load s",
                "rollups built s",
                "buckets",
                "rollup p50 ms",
                "rollup p99 ms",
                "raw p50 ms",
                "raw p99 ms",
            ],
            [
                [
                    r["backend"],
                    r["load_s"],
                    r["rollup_build_s"],
                    r["buckets"],
                    r["rollup"]["p50_ms"],
                    r["rollup"]["p99_ms"],
                    r["raw"]["p50_ms"],
                    r["raw"]["p99_ms"],
                ]
                for r in runs
            ],
        )
    )
    for r in runs:
        if r["rollup"]["sources"] != ["rollup"] or r["raw"]["sources"] != ["raw"]:
            raise RuntimeError(f"{r['backend']}: unexpected sources {r['rollup']['sources']} / {r['raw']['sources']}")
    return res
