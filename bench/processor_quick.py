"""Processor throughput: a backlog of N messages claimed, processed (default rules: a `packet` event
and an MQTT publish each) and completed, on SQLite and PostgreSQL; and the same with one hub
subscriber that must receive every event (the SSE path minus HTTP).

    .venv/bin/python -m bench.processor_quick [--messages 20000] [--batch 500] [--pg-url URL]

PostgreSQL: a fresh database is created on --pg-url's server (default: the local server on
127.0.0.1:5432, durable settings as configured there) and dropped afterwards. Publishes are written
to the outbox with each commit, as in the gateway; nothing drains it (the broker is measured
elsewhere). Prints messages/s and the gateway process's CPU time per message (steadier than wall
time on a shared machine); never asserts on times.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import trio

from gateway.health import ComponentHealth
from gateway.hub import Hub
from gateway.processor import Processor
from gateway.settings import DatabaseSettings, ProcessorSettings
from gateway.store import open_store
from gateway.store.base import NewMessage, Store
from gateway.wake import Nudge


def _messages(n: int, start: int) -> list[NewMessage]:
    now = datetime.now(UTC)
    return [
        NewMessage(
            device_id=f"dev-{i % 50}", device_ts=now, seq=i, dedupe_key=f"seq:{i}",
            measurements={"temperature": 20.0 + i % 10, "humidity": 40.0}, status="ok", battery=80.0,
            source="mqtt", received_at=now,
        )
        for i in range(start, start + n)
    ]


async def _fill(store: Store, total: int) -> None:
    for start in range(0, total, 2000):
        await store.write_batch(_messages(min(2000, total - start), start), [])


async def _run_once(
    url: str, total: int, batch: int, with_subscriber: bool
) -> tuple[float, float | None, float]:
    settings = DatabaseSettings.model_validate({"DATABASE_URL": url, "DATABASE_QUERY_TIMEOUT": 60})
    proc_settings = ProcessorSettings.model_validate(
        {"PROCESSOR_BATCH_SIZE": batch, "PROCESSOR_INTERVAL": 0.5}
    )
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await _fill(store, total)
        hub = Hub(store, poll_interval=0.5)
        await nursery.start(hub.run)
        proc = Processor(
            proc_settings, store, Nudge(), ComponentHealth("processor"),
            instance_id="bench", on_committed=hub.committed,
        )
        received = 0
        done_sse = trio.Event()
        sse_elapsed: float | None = None

        async def consume() -> None:
            nonlocal received, sse_elapsed
            async with hub.subscribe(last_event_id=None, types=None, device_id=None) as sub:
                async for _ in sub:
                    received += 1
                    if received == total:
                        sse_elapsed = time.perf_counter() - start
                        done_sse.set()
                        return

        start = time.perf_counter()
        cpu = time.process_time()
        if with_subscriber:
            nursery.start_soon(consume)
            while hub.clients == 0:
                await trio.sleep(0.001)
            start = time.perf_counter()
        await nursery.start(proc.run)
        while (await store.backlog()).count:
            await trio.sleep(0.02)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        if with_subscriber:
            with trio.fail_after(60):
                await done_sse.wait()
        outbox = await store.outbox_stats()
        assert outbox.pending == total, (outbox.pending, total)
        nursery.cancel_scope.cancel()
    return elapsed, sse_elapsed, cpu


def _pg_database(server_url: str) -> tuple[str, str]:
    name = f"gw_bench_{uuid.uuid4().hex[:8]}"
    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    subprocess.run(["psql", "-X", "-q", "-d", admin, "-c", f"CREATE DATABASE {name}"], check=True)
    return urlunsplit(parts._replace(path=f"/{name}")), admin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()
    import tempfile

    targets: list[tuple[str, str, str | None]] = []
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    targets.append(("sqlite", f"sqlite:///{tmp}/a.db", None))
    targets.append(("sqlite+sse", f"sqlite:///{tmp}/b.db", None))
    if not args.skip_pg:
        for label in ("postgres", "postgres+sse"):
            url, admin = _pg_database(args.pg_url)
            targets.append((label, url, admin))
    print(f"backlog {args.messages} messages, batch {args.batch}, default rules (packet event + publish)")
    for label, url, admin in targets:
        try:
            elapsed, sse, cpu = trio.run(_run_once, url, args.messages, args.batch, label.endswith("+sse"))
            line = (
                f"{label:14s} processed {args.messages / elapsed:7.0f} msg/s ({elapsed:.2f} s;"
                f" gateway CPU {1000 * cpu / args.messages:.2f} ms/msg)"
            )
            if sse is not None:
                rate = args.messages / sse
                line += f"; all delivered to one hub subscriber after {sse:.2f} s ({rate:.0f} ev/s)"
            print(line, flush=True)
        finally:
            if admin is not None:
                name = urlsplit(url).path.strip("/")
                subprocess.run(["psql", "-X", "-q", "-d", admin, "-c", f"DROP DATABASE {name}"], check=False)


if __name__ == "__main__":
    main()
