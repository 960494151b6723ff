"""Footprint: start-up time to READY (sd_notify on a socket we own) and to a 200 from ping; RSS idle,
under 1,000 msg/s of ingest, and after it; on SQLite (and PostgreSQL in the full run)."""

from __future__ import annotations

from typing import Any

import trio

from bench.harness import Gateway, Mosquitto, Options, Postgres, Result, run_simulator, table, workdir


async def _measure(gw: Gateway, broker: Mosquitto, duration: float) -> dict[str, Any]:
    await trio.sleep(2.0)
    idle = gw.rss_kib()
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(gw.rss_kib())
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        sim = await run_simulator(broker.url, rate=1000, duration=duration, devices=100)
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    return {
        "ready_s": gw.ready_seconds,
        "ping_s": gw.ping_seconds,
        "rss_idle_kib": idle,
        "rss_load_peak_kib": max(samples or [0]),
        "rss_after_kib": gw.rss_kib(),
        "sent": sim["sent"],
    }


async def run(opts: Options) -> Result:
    res = Result("footprint")
    duration = 2.0 if opts.quick else 15.0
    runs = []
    with workdir("footprint") as d, Mosquitto(d) as broker:
        with Gateway(d / "sqlite", database_url=f"sqlite:///{d}/fp.db", mqtt_url=broker.url) as gw:
            runs.append({"backend": "sqlite", **await _measure(gw, broker, duration)})
        if not opts.quick:
            with Postgres(d) as pg, Gateway(d / "pg", database_url=pg.dsn, mqtt_url=broker.url) as gw:
                runs.append({"backend": "postgres", **await _measure(gw, broker, duration)})
    res.data = {"load_duration_s": duration, "runs": runs}
    res.tables.append(
        table(
            f"footprint: start-up and resident memory (load: 1,000 msg/s for {duration:.0f} s)",
            ["backend", "to READY s", "to ping 200 s", "RSS idle MiB", "RSS load peak MiB", "RSS after MiB"],
            [
                [
                    r["backend"],
                    r["ready_s"],
                    r["ping_s"],
                    r["rss_idle_kib"] / 1024,
                    r["rss_load_peak_kib"] / 1024,
                    r["rss_after_kib"] / 1024,
                ]
                for r in runs
            ],
        )
    )
    return res
