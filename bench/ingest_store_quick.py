"""Ingest and store without MQTT: CPU microseconds per message of ``Ingest.run`` storing N readings
(batches of 500, one receive time per batch, as the bridge hands them) into a real store.

    .venv/bin/python -m bench.ingest_store_quick sqlite|pg [--count 20000] [--rounds 4] [--pg-url URL]

This is the slice between the MQTT bridge and the database (validation, rows, write_batch, acks,
metrics): ``bench/ingest_quick.py`` adds the broker and the bridge. PostgreSQL: a fresh database
on the server of ``--pg-url`` (default the local one), dropped afterwards. Prints the best round
and every round (CPU time: steadier than wall time on a shared machine). Never asserts on times.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import trio

from gateway.health import ComponentHealth
from gateway.ingest import Ingest
from gateway.mqtt import Inbound
from gateway.settings import DatabaseSettings, IngestSettings
from gateway.store import open_store
from tests.support.mqtt import packet

BATCH = 500


async def _run(url: str, count: int, rounds: int) -> list[float]:
    out = []
    async with open_store(DatabaseSettings.model_validate({"DATABASE_URL": url})) as store, trio.open_nursery() as n:
        await n.start(store.run)
        for r in range(rounds):
            now = datetime.now(UTC)
            batches = [
                [Inbound(f"sensors/d{i % 50}/data", packet(f"d{i % 50}-{r}", i), now, i, 1, False, 1) for i in
                 range(start, min(start + BATCH, count))]
                for start in range(0, count, BATCH)
            ]  # fmt: skip
            acked: list[Inbound] = []
            ingest = Ingest(IngestSettings(), store, acked.extend, lambda: None, ComponentHealth("ingest"))
            send, recv = trio.open_memory_channel[list[Inbound]](len(batches) + 1)
            cpu = time.process_time()
            for batch in batches:
                send.send_nowait(batch)
            await send.aclose()
            await ingest.run(recv)  # returns once the closed channel is drained and stored
            out.append((time.process_time() - cpu) / count * 1e6)
            assert len(acked) == count
        n.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sqlite", "pg"])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    if args.kind == "pg":
        name = f"bench_{uuid.uuid4().hex[:10]}"
        psql = ["psql", "-X", "-q", "-d", args.pg_url, "-c"]
        subprocess.run([*psql, f"CREATE DATABASE {name}"], check=True)
        try:
            res = trio.run(_run, urlunsplit(urlsplit(args.pg_url)._replace(path=f"/{name}")), args.count, args.rounds)
        finally:
            subprocess.run([*psql, f"DROP DATABASE {name} WITH (FORCE)"], check=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = trio.run(_run, f"sqlite:///{tmp}/bench.db", args.count, args.rounds)
    rounds = " ".join(f"{x:.1f}" for x in res)
    print(f"{args.kind}: ingest + store CPU us/msg, best {min(res):.2f}  (rounds: {rounds})")


if __name__ == "__main__":
    main()
