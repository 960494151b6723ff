"""Processor: messages/s claimed, run through the default rules and marked processed.

A backlog of N readings is written straight into a fresh database through the gateway's own
``Store.write_batch`` (so the rows are exactly what ingest would have stored), then the gateway
starts and we time how fast ``gateway_processor_processed_total`` climbs to N. The default rules
turn every message into a ``packet`` SSE event and an MQTT publish, so this includes event
storage and outbound QoS 1 publishing to the scenario's broker.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from bench import profile
from bench.common import PROCESSED, slope, wait_counter
from bench.harness import Gateway, Mosquitto, Options, Postgres, Result, table, workdir
from gateway.packets import parse_packet
from gateway.settings import DatabaseSettings
from gateway.simulate import Fleet
from gateway.store import open_store
from gateway.store.base import NewMessage


async def prestore(url: str, n: int) -> float:
    """Write ``n`` unprocessed readings; returns the rows/s of that bulk write (for reference)."""
    fleet = Fleet(200, seed=5, id_prefix="proc-")
    now = datetime.now(UTC)
    settings = DatabaseSettings.model_validate({"DATABASE_URL": url})
    t0 = time.monotonic()
    async with open_store(settings) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        done = 0
        while done < n:
            batch = []
            for _ in range(min(5000, n - done)):
                p = parse_packet(fleet.next_packet().payload)
                batch.append(
                    NewMessage(
                        device_id=p.device_id,
                        device_ts=p.timestamp,
                        seq=p.seq,
                        dedupe_key=p.dedupe_key(),
                        measurements=dict(p.measurements),
                        status=p.status,
                        battery=p.battery,
                        source="mqtt",
                        received_at=now,
                        topic=f"sensors/{p.device_id}/data",
                    )
                )
            await store.write_batch(batch, [])
            done += len(batch)
        nursery.cancel_scope.cancel()
    return n / (time.monotonic() - t0)


async def _measure(
    d: Any,
    broker: Mosquitto,
    backend: str,
    url: str,
    n: int,
    prof: dict[str, Any] | None,
) -> dict[str, Any]:
    write_rate = await prestore(url, n)
    gw = Gateway(d / backend, database_url=url, mqtt_url=broker.url)
    t_start = time.monotonic()
    with gw:
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            if prof is not None:
                assert gw.proc is not None
                pid = gw.proc.pid

                async def sample() -> None:
                    prof.update(await profile.sample(pid, 5, d / f"profile-{backend}.txt"))

                nursery.start_soon(sample)
            samples = await wait_counter(client, gw, PROCESSED, n, limit=600, interval=0.2)
    done = samples[-1][1] if samples else 0.0
    whole = done / (samples[-1][0] - t_start) if samples else 0.0
    return {
        "backend": backend,
        "backlog": n,
        "processed": done,
        "rate": slope(samples, 0.0, n),
        "rate_incl_startup": whole,
        "prestore_rows_per_s": write_rate,
    }


async def run(opts: Options) -> Result:
    res = Result("processor")
    n = 20_000 if opts.quick else 100_000
    runs = []
    prof: dict[str, Any] | None = {} if opts.profile else None
    with workdir("processor") as d, Mosquitto(d) as broker:
        runs.append(await _measure(d, broker, "sqlite", f"sqlite:///{d}/processor.db", n, prof))
        if not opts.quick:
            with Postgres(d) as pg:
                runs.append(await _measure(d, broker, "postgres", pg.dsn, n, None))
    res.data = {"runs": runs}
    res.tables.append(
        table(
            "processor: backlog through the default rules (packet SSE event + MQTT publish per message)",
            ["backend", "backlog", "processed", "msg/s", "msg/s incl. start-up", "bulk insert rows/s"],
            [
                [
                    r["backend"],
                    r["backlog"],
                    int(r["processed"]),
                    r["rate"],
                    r["rate_incl_startup"],
                    r["prestore_rows_per_s"],
                ]
                for r in runs
            ],
        )
    )
    if prof is not None:
        res.data["profile"] = prof
        res.tables.extend(profile.tables("profile: gateway (SQLite) draining the backlog", prof))
    return res
