"""API: requests/s and latency of /api/v1/ping and /api/v1/messages?limit=100 under ingest load.

The gateway (SQLite) is measured idle and while the simulator publishes 1,000 msg/s into it; a bare
ASGI hello-world on the same hypercorn Trio worker is measured the same way beside it, and the ratio
gateway / bare says what the framework and our handlers cost on top of the server.
"""

from __future__ import annotations

import subprocess
from typing import Any

import trio

from bench import load
from bench.harness import (
    PY,
    ROOT,
    Gateway,
    Mosquitto,
    Options,
    Result,
    free_port,
    run_simulator,
    table,
    wait_port,
    workdir,
)


async def run(opts: Options) -> Result:
    res = Result("api")
    duration = 2.0 if opts.quick else 10.0
    rows: list[dict[str, Any]] = []
    with workdir("api") as d, Mosquitto(d) as broker:
        port = free_port()
        bare = subprocess.Popen([PY, "-m", "bench.bare_http", "--port", str(port)], cwd=ROOT)  # noqa: ASYNC220
        try:
            wait_port(port, proc=bare)
            r = await load.load(f"http://127.0.0.1:{port}/api/v1/ping", duration=duration, workdir=d)
            rows.append({"target": "bare hypercorn trio (hello world)", "load": "idle", **r})
        finally:
            bare.terminate()
            bare.wait()
        with Gateway(d, database_url=f"sqlite:///{d}/api.db", mqtt_url=broker.url) as gw:
            # Some rows to page through first.
            await run_simulator(broker.url, rate=2000, duration=1.0, devices=50)
            r = await load.load(gw.url + "/api/v1/ping", duration=duration, workdir=d)
            rows.append({"target": "gateway /api/v1/ping", "load": "idle", **r})
            async with trio.open_nursery() as nursery:
                ingest_time = 3 * duration + 4
                nursery.start_soon(lambda: run_simulator(broker.url, rate=1000, duration=ingest_time, devices=100))
                await trio.sleep(1.0)
                r = await load.load(gw.url + "/api/v1/ping", duration=duration, workdir=d)
                rows.append({"target": "gateway /api/v1/ping", "load": "1,000 msg/s ingest", **r})
                r = await load.load(
                    gw.url + "/api/v1/messages?limit=100", duration=duration, workdir=d, headers=gw.headers
                )
                rows.append({"target": "gateway /api/v1/messages?limit=100", "load": "1,000 msg/s ingest", **r})
                # The latency target is set at an offered 200 req/s (10 connections), not at saturation.
                r = await load.load(
                    gw.url + "/api/v1/messages?limit=100",
                    duration=duration,
                    connections=10,
                    rate=200,
                    workdir=d,
                    headers=gw.headers,
                )
                rows.append({"target": "gateway /api/v1/messages?limit=100", "load": "ingest, 200 req/s offered", **r})
    bare_rps = rows[0]["rps"]
    for row in rows:
        row["ratio_to_bare"] = row["rps"] / bare_rps if bare_rps else None
    res.data = {"duration_s": duration, "tool": load.tool(), "runs": rows}
    res.tables.append(
        table(
            f"api: {load.tool()}, 50 connections (200 req/s offered: 10), {duration:.0f} s each (latency ms)",
            ["target", "while", "req/s", "p50", "p95", "p99", "max", "errors", "non-2xx", "ratio to bare"],
            [
                [
                    r["target"],
                    r["load"],
                    r["rps"],
                    r["p50"],
                    r["p95"],
                    r["p99"],
                    r["max"],
                    r["errors"],
                    r["non2xx"],
                    r["ratio_to_bare"],
                ]
                for r in rows
            ],
        )
    )
    return res
