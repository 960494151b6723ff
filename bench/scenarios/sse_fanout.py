"""SSE fan-out: many concurrent SSE clients receiving ~100 events/s; delivery delay and gateway memory.

The simulator publishes 100 msg/s (each becomes one ``packet`` event under the default rules); C
clients, spread over a few client processes, each record when every event arrives. Delay is
publish → arrival at each client, so it includes ingest and the processor; the idle-pipeline
latency scenario tells how much of it is fan-out. The gateway's RSS is sampled throughout.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from bench import profile
from bench.common import delays_ms, json_process, wait_file
from bench.cpu import cpu_seconds
from bench.harness import (
    PY,
    Gateway,
    Mosquitto,
    Options,
    Result,
    read_record,
    run_simulator,
    scrape,
    summarize,
    table,
    workdir,
)

RATES = (10, 100)
"""Events per second in each round: 10/s is issue 11's target shape, 100/s the harder one."""


async def run(opts: Options) -> Result:
    """One round per rate (the quick run: 100/s only); ``data`` holds the last, ``rounds`` all."""
    res = Result("sse_fanout")
    rounds: list[dict[str, Any]] = []
    for rate in RATES[1:] if opts.quick else RATES:
        one = await _round(opts, rate)
        rounds.append(one.data)
        res.tables.extend(one.tables)
    res.data = dict(rounds[-1], rounds=rounds)
    return res


async def _round(opts: Options, rate: int) -> Result:
    res = Result("sse_fanout")
    clients = 100 if opts.quick else 1000
    procs = 2 if clients <= 100 else 4
    duration = 3.0 if opts.quick else 10.0
    expect = round(rate * duration)
    with (
        workdir("sse") as d,
        Mosquitto(d) as broker,
        # All clients use the bench's one key: lift the per-key and total stream caps above them.
        Gateway(
            d,
            database_url=f"sqlite:///{d}/sse.db",
            mqtt_url=broker.url,
            SSE_MAX_STREAMS=str(clients + 100),
            SSE_MAX_STREAMS_PER_KEY=str(clients + 100),
        ) as gw,
    ):
        rss_idle = gw.rss_kib()
        rss: list[int] = []
        results: list[dict[str, Any]] = []
        sim: dict[str, Any] = {}
        prof: dict[str, Any] = {}

        async def client_proc(i: int, n: int) -> None:
            results.append(
                await json_process(
                    [
                        PY,
                        "-m",
                        "bench.sse_client",
                        "--url",
                        gw.url + "/api/v1/events",
                        "--key",
                        gw.key,
                        "--clients",
                        str(n),
                        "--expect",
                        str(expect),
                        "--duration",
                        str(duration + (6 if opts.quick else 60)),
                        "--record",
                        str(d / f"sse-{i}.txt"),
                        "--ready-file",
                        str(d / f"sse-{i}.ready"),
                    ],
                    name="sse clients",
                )
            )

        async def sample_rss() -> None:
            while True:
                rss.append(gw.rss_kib())
                await trio.sleep(0.25)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            async with trio.open_nursery() as clients_nursery:
                for i in range(procs):
                    clients_nursery.start_soon(client_proc, i, clients // procs)
                for i in range(procs):
                    await wait_file(d / f"sse-{i}.ready", 90)
                async with httpx.AsyncClient() as http:
                    connected = (await scrape(http, gw)).get("gateway_sse_clients", 0.0)
                if opts.profile:
                    assert gw.proc is not None
                    pid = gw.proc.pid

                    async def sample() -> None:
                        prof.update(await profile.sample(pid, duration, d / "profile.txt"))

                    clients_nursery.start_soon(sample)
                assert gw.proc is not None
                cpu0 = cpu_seconds(gw.proc.pid) or 0.0
                sim.update(
                    await run_simulator(broker.url, rate=rate, duration=duration, devices=20, record=d / "pub.txt")
                )
                gw_cpu = (cpu_seconds(gw.proc.pid) or 0.0) - cpu0
            async with httpx.AsyncClient() as http:
                m = await scrape(http, gw)
            nursery.cancel_scope.cancel()
        published = read_record(d / "pub.txt")
        delays: list[float] = []
        for i in range(procs):
            delays.extend(delays_ms(published, d / f"sse-{i}.txt"))
    stats = summarize(delays)
    data = {
        "clients": clients,
        "client_processes": procs,
        "events_per_s": rate,
        "duration_s": duration,
        "connected_at_start": connected,
        "expected_deliveries": clients * sim["valid"],
        "deliveries": len(delays),
        "client_errors": sum(r["errors"] for r in results),
        "dropped_by_gateway": m.get("gateway_sse_dropped_total", 0.0),
        "delay_ms": stats,
        "gateway_cpu_s": round(gw_cpu, 2),
        "gateway_cpu_pct": round(100 * gw_cpu / duration, 1),
        "client_cpu_s": round(sum(r.get("cpu_s", 0.0) for r in results), 2),
        "rss_idle_kib": rss_idle,
        "rss_peak_kib": max(rss or [0]),
    }
    res.data = data
    res.tables.append(
        table(
            f"sse_fanout: {clients:,} clients, {rate} events/s for {duration:.0f} s (delay publish → client, ms)",
            [
                "clients",
                "delivered",
                "dropped",
                "p50",
                "p95",
                "p99",
                "max",
                "gateway CPU %",
                "clients CPU s",
                "RSS idle MiB",
                "RSS peak MiB",
            ],
            [
                [
                    f"{int(connected):,}/{clients:,}",
                    f"{len(delays):,}/{data['expected_deliveries']:,}",
                    int(data["dropped_by_gateway"]),
                    stats["p50"],
                    stats["p95"],
                    stats["p99"],
                    stats["max"],
                    data["gateway_cpu_pct"],
                    data["client_cpu_s"],
                    rss_idle / 1024,
                    max(rss or [0]) / 1024,
                ]
            ],
        )
    )
    if opts.profile:
        res.data["profile"] = prof
        res.tables.extend(profile.tables(f"profile: gateway fanning out to {clients:,} SSE clients", prof))
    return res
