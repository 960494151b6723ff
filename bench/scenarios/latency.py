"""End-to-end latency: publish → SSE event at a real SSE client, and → the gateway's MQTT publish.

The simulator records the wall-clock time of every publish per (device_id, seq); an httpx SSE client
and a bare MQTT subscriber on ``gateway/events/#`` (each its own process) record when that reading
arrives. All three run on this host, so one clock serves them all.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from bench.common import delays_ms, json_process, quiesce, wait_file
from bench.harness import (
    PY,
    Gateway,
    Mosquitto,
    Options,
    Result,
    read_record,
    run_simulator,
    summarize,
    table,
    workdir,
)


async def _one_rate(
    gw: Gateway,
    broker: Mosquitto,
    rate: int,
    duration: float,
    d: Any,
    wait: float,
) -> dict[str, Any]:
    """One offered rate; receivers give up ``wait`` s after publishing ends (what is late is missing)."""
    expect = round(rate * duration)
    sse_rec, mqtt_rec, pub_rec = d / f"sse-{rate}.txt", d / f"mqtt-{rate}.txt", d / f"pub-{rate}.txt"
    sse_ready, mqtt_ready = d / f"sse-{rate}.ready", d / f"mqtt-{rate}.ready"
    out: dict[str, Any] = {}
    slack = duration + wait
    # The previous rate's backlog must not count against this one.
    async with httpx.AsyncClient() as http:
        out["settle_wait_s"] = await quiesce(http, gw, 4 * wait)

    async def sse() -> None:
        out["sse"] = await json_process(
            [
                PY,
                "-m",
                "bench.sse_client",
                "--url",
                gw.url + "/api/v1/events",
                "--key",
                gw.key,
                "--clients",
                "1",
                "--expect",
                str(expect),
                "--duration",
                str(slack),
                "--record",
                str(sse_rec),
                "--ready-file",
                str(sse_ready),
            ],
            name="sse client",
        )

    async def mqtt() -> None:
        out["mqtt"] = await json_process(
            [
                PY,
                "-m",
                "bench.receiver",
                "--url",
                broker.url,
                "--topic",
                "gateway/events/#",
                "--expect",
                str(expect),
                "--duration",
                str(slack),
                "--record",
                str(mqtt_rec),
                "--ready-file",
                str(mqtt_ready),
            ],
            name="mqtt receiver",
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sse)
        nursery.start_soon(mqtt)
        await wait_file(sse_ready, 30)
        await wait_file(mqtt_ready, 30)
        out["sim"] = await run_simulator(
            broker.url,
            rate=rate,
            duration=duration,
            devices=100,
            processes=2 if rate > 4000 else 1,
            record=pub_rec,
        )
    published = read_record(pub_rec)
    sse_d, mqtt_d = delays_ms(published, sse_rec), delays_ms(published, mqtt_rec)
    return {
        "offered": rate,
        "settle_wait_s": out["settle_wait_s"],
        "published_rate": out["sim"]["achieved_rate"],
        "sent": out["sim"]["sent"],
        "sse": {**summarize(sse_d), "received": len(sse_d)},
        "mqtt": {**summarize(mqtt_d), "received": len(mqtt_d)},
    }


async def run(opts: Options) -> Result:
    res = Result("latency")
    duration = 2.0 if opts.quick else 10.0
    runs = []
    with (
        workdir("latency") as d,
        Mosquitto(d) as broker,
        Gateway(d, database_url=f"sqlite:///{d}/latency.db", mqtt_url=broker.url) as gw,
    ):
        for rate in (1000, 5000):
            runs.append(await _one_rate(gw, broker, rate, duration, d, 6.0 if opts.quick else 60.0))
    res.data = {"duration_s": duration, "database": "sqlite", "runs": runs}
    rows = []
    for r in runs:
        for path in ("sse", "mqtt"):
            s = r[path]
            rows.append(
                [
                    f"{r['offered']:,}/s → {path}",
                    r["published_rate"],
                    f"{s['received']:,}/{r['sent']:,}",
                    s["p50"],
                    s["p95"],
                    s["p99"],
                    s["max"],
                ]
            )
    res.tables.append(
        table(
            f"latency: publish → SSE event / MQTT publish, ms ({duration:.0f} s, SQLite)",
            ["path", "published/s", "received", "p50", "p95", "p99", "max"],
            rows,
        )
    )
    return res
