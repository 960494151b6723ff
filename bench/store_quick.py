"""Store write throughput: ``write_batch`` of N new messages in batches, then the same messages
again (all duplicates), on SQLite and PostgreSQL; plus PostgreSQL without the GIN index on
``measurements`` to show what that index costs, and SQLite with ``synchronous=NORMAL`` instead of
the shipped ``FULL`` (at the batch size and one message per commit) to show what durability costs.

    .venv/bin/python -m bench.store_quick [--messages 20000] [--batch 500] [--pg-url URL]

PostgreSQL: a fresh database is created on --pg-url's server (default: the local server on
127.0.0.1:5432) and dropped afterwards. Prints rows/s; never asserts on times.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import trio

from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import NewMessage


def _messages(n: int) -> list[NewMessage]:
    t0 = datetime(2026, 11, 27, tzinfo=UTC)
    return [
        NewMessage(
            device_id=f"esp32-{i % 200:03d}",
            device_ts=t0 + timedelta(milliseconds=i),
            seq=i,
            dedupe_key=f"seq:{i}",
            measurements={"temperature": 20.0 + (i % 100) / 10, "humidity": 40.2, "pressure": 1013},
            status="ok",
            battery=87.0,
            source="mqtt",
            received_at=t0 + timedelta(milliseconds=i),
            topic=f"sensors/esp32-{i % 200:03d}/data",
        )
        for i in range(n)
    ]


async def _run(
    url: str, n: int, batch: int, drop_gin: bool = False, synchronous: str | None = None
) -> tuple[tuple[float, float], tuple[float, float]]:
    msgs = _messages(n)
    settings = DatabaseSettings.model_validate({"DATABASE_URL": url})
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        if synchronous is not None:  # SQLite only: override the shipped pragma on its connection
            await store._call(lambda conn: conn.execute(f"PRAGMA synchronous={synchronous}"))  # type: ignore[attr-defined]
        if drop_gin:
            drop = ["psql", "-X", "-q", "-d", url, "-c", "DROP INDEX messages_measurements"]
            await trio.run_process(drop)
        rates = []
        for _ in range(2):  # new rows, then the same rows again (duplicates)
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(0, n, batch):
                await store.write_batch(msgs[i : i + batch], [])
            rates.append((n / (time.perf_counter() - start), n / (time.process_time() - cpu)))
        nursery.cancel_scope.cancel()
    return rates[0], rates[1]


def _reference(url: str) -> float:
    """rows/s of a bare asyncpg ``executemany`` of 50k tiny rows on plain asyncio (FACTS.md:
    ~330k/s on an idle machine): the yardstick for how busy the machine is right now."""
    import asyncio

    import asyncpg

    async def run() -> float:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TEMP TABLE ref_t (id serial PRIMARY KEY, a int, b text)")
            rows = [(i, f"row-{i}") for i in range(50000)]
            start = time.perf_counter()
            await conn.executemany("INSERT INTO ref_t (a, b) VALUES ($1, $2)", rows)
            return len(rows) / (time.perf_counter() - start)
        finally:
            await conn.close()

    return asyncio.run(run())


def _pg_db(base: str) -> tuple[str, str]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    subprocess.run(["psql", "-X", "-q", "-d", base, "-c", f"CREATE DATABASE {name}"], check=True)
    return name, urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


def _show(label: str, new: tuple[float, float], dup: tuple[float, float]) -> None:
    # Wall-clock rows/s, and rows per CPU-second of this process (the database server's CPU is
    # not counted): on a shared 2-core machine the second is the steadier number.
    print(
        f"{label:<10} new {new[0]:8,.0f} rows/s ({new[1]:8,.0f}/cpu-s)"
        f"   duplicates {dup[0]:8,.0f} rows/s ({dup[1]:8,.0f}/cpu-s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and print each round")
    args = parser.parse_args()

    for _ in range(args.rounds):
        print(f"reference  bare asyncpg executemany {_reference(args.pg_url):9,.0f} rows/s")
        with tempfile.TemporaryDirectory() as tmp:
            new, dup = trio.run(_run, f"sqlite:///{tmp}/bench.db", args.messages, args.batch)
        _show("sqlite", new, dup)
        # The cost of synchronous=FULL (one more fsync per commit): at the batch size, and with one
        # message per commit (a trickle, where each commit holds a single reading).
        for label, n, size, sync in (
            ("sq NORMAL", args.messages, args.batch, "NORMAL"),
            ("sq FULL/1", 500, 1, None),
            ("sq NORM/1", 500, 1, "NORMAL"),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                new, dup = trio.run(_run, f"sqlite:///{tmp}/bench.db", n, size, False, sync)
            _show(label, new, dup)
        for label, drop_gin in (("postgres", False), ("pg no GIN", True)):
            name, url = _pg_db(args.pg_url)
            try:
                new, dup = trio.run(_run, url, args.messages, args.batch, drop_gin)
            finally:
                subprocess.run(
                    ["psql", "-X", "-q", "-d", args.pg_url, "-c", f"DROP DATABASE {name} WITH (FORCE)"],
                    check=True,
                )
            _show(label, new, dup)


if __name__ == "__main__":
    main()
