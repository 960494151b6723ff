"""Ingest: QoS 1 messages/s from the broker to committed rows, SQLite and PostgreSQL, vs bare paho.

Two measurements, each against the bare-paho baseline of the same run:

- **backlog drain**: N messages queued at the broker for a persistent session while the consumer is
  down; then the consumer starts and we time how fast the rows land. This is the pure consume rate
  (no publisher competing for the CPU while it runs). The bare paho client drains the same N.
- **rising offered rate**: the simulator publishes at R msg/s for D s; we poll the gateway's stored
  counter. The gateway keeps pace when every message is committed within 1 s (+10 %) of the last
  publish; the steps stop at the first loss of pace.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import trio

from bench import profile
from bench.common import STORED, counter, quiesce, receiver, slope, wait_counter
from bench.harness import Gateway, Mosquitto, Options, Postgres, Result, run_simulator, table, workdir


async def _backlog_bare(broker: Mosquitto, n: int, protocol: str = "5") -> dict[str, Any]:
    cid = "bench-bare-" + secrets.token_hex(4)
    base = ["--url", broker.url, "--topic", "sensors/+/data", "--client-id", cid, "--protocol", protocol]
    await receiver([*base, "--prime"])
    sim = await run_simulator(broker.url, rate=1e6, duration=n / 1e6, devices=100, processes=2)
    got = await receiver([*base, "--expect", str(sim["sent"]), "--duration", "120"])
    return {"messages": sim["sent"], "received": got["received"], "rate": got["rate"]}


async def _backlog_gateway(gw: Gateway, broker: Mosquitto, n: int) -> dict[str, Any]:
    # The gateway's session exists (it ran once); stop it, queue N at the broker, start it, time the drain.
    await trio.to_thread.run_sync(gw.stop)
    sim = await run_simulator(broker.url, rate=1e6, duration=n / 1e6, devices=100, processes=2)
    await trio.to_thread.run_sync(gw.start)
    async with httpx.AsyncClient() as client:
        samples = await wait_counter(client, gw, STORED, sim["sent"], limit=300)
    stored = samples[-1][1] if samples else 0.0
    return {"messages": sim["sent"], "stored": stored, "rate": slope(samples, 0.0, sim["sent"])}


async def _step(gw: Gateway, broker: Mosquitto, rate: float, duration: float, settle: float) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        settled = await quiesce(client, gw, settle)
        before = await counter(client, gw, STORED)
        processes = 2 if rate > 4000 else 1
        sim = await run_simulator(broker.url, rate=rate, duration=duration, devices=200, processes=processes)
        pub_end = time.monotonic()
        pub_start = pub_end - sim["elapsed"]
        target = before + sim["sent"]
        samples = await wait_counter(client, gw, STORED, target, limit=max(10.0, duration * 2))
    stored = samples[-1][1] - before
    done_at = samples[-1][0] if samples[-1][1] >= target else None
    lag = (done_at - pub_end) if done_at is not None else None
    committed_rate = stored / ((done_at or samples[-1][0]) - pub_start)
    kept = lag is not None and lag <= 1.0 + 0.1 * duration
    # When the simulator itself could not offer the rate, the host is saturated: not the gateway's verdict.
    load_short = sim["achieved_rate"] < 0.9 * rate
    return {
        "offered": rate,
        "published_rate": sim["achieved_rate"],
        "sent": sim["sent"],
        "stored": stored,
        "committed_rate": committed_rate,
        "lag_after_publish_s": lag,
        "kept_pace": kept and not load_short,
        "load_short": load_short,
        "puback_p99_ms": sim["puback_p99_ms"],
        "settle_wait_s": settled,
    }


async def _profile(gw: Gateway, broker: Mosquitto, rate: int, duration: float, d: Any) -> dict[str, Any]:
    """py-spy the gateway while the simulator offers ``rate`` msg/s."""
    assert gw.proc is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_simulator(broker.url, rate=rate, duration=duration + 3, devices=200))
        await trio.sleep(1.5)
        return await profile.sample(gw.proc.pid, duration, d / "profile.txt")


async def run(opts: Options) -> Result:
    res = Result("ingest")
    prof: dict[str, Any] = {}
    n = 5_000 if opts.quick else 50_000
    rates = [1000, 3000] if opts.quick else [1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000]
    duration = 2.0 if opts.quick else 8.0
    settle = 3.0 if opts.quick else 60.0
    with workdir("ingest") as d, Mosquitto(d) as broker, Postgres(d) as pg:
        bare = await _backlog_bare(broker, n)
        bare311 = await _backlog_bare(broker, n, "3.1.1")
        backends: dict[str, Any] = {}
        for backend, url in (("sqlite", f"sqlite:///{d}/ingest.db"), ("postgres", pg.dsn)):
            gw = Gateway(d / backend, database_url=url, mqtt_url=broker.url)
            with gw:
                drain = await _backlog_gateway(gw, broker, n)
                steps = []
                # The quick pass measures PostgreSQL's drain only: its start-up already costs seconds.
                for rate in rates if backend == "sqlite" or not opts.quick else []:
                    step = await _step(gw, broker, rate, duration, settle)
                    steps.append(step)
                    if not step["kept_pace"]:
                        break
                if backend == "sqlite" and opts.profile:
                    prof = await _profile(gw, broker, 3000, duration, d)
            backends[backend] = {"backlog": drain, "steps": steps}
        # The same SQLite gateway speaking MQTT 3.1.1 (MQTT_PROTOCOL): what MQTT 5 decoding costs it.
        drain311: dict[str, Any] | None = None
        if not opts.quick:
            with Gateway(
                d / "sqlite311",
                database_url=f"sqlite:///{d}/ingest311.db",
                mqtt_url=broker.url,
                MQTT_PROTOCOL="3.1.1",
            ) as gw:
                drain311 = await _backlog_gateway(gw, broker, n)
    res.data = {
        "backlog_messages": n,
        "bare_paho": bare,
        "bare_paho_311": bare311,
        "backends": backends,
        "sqlite_mqtt311_backlog": drain311,
    }
    rows = [
        ["bare paho MQTT 5 (receive only)", bare["messages"], bare["rate"], 1.0],
        [
            "bare paho MQTT 3.1.1 (receive only)",
            bare311["messages"],
            bare311["rate"],
            bare311["rate"] / bare["rate"] if bare["rate"] else None,
        ],
    ]
    backlogs = [(f"gateway {b}", v["backlog"]) for b, v in backends.items()]
    if drain311 is not None:
        backlogs.append(("gateway sqlite, MQTT 3.1.1", drain311))
    for label, b in backlogs:
        rows.append(
            [
                f"{label} (to committed rows)",
                b["messages"],
                b["rate"],
                b["rate"] / bare["rate"] if bare["rate"] else None,
            ]
        )
    res.tables.append(
        table(
            "ingest: backlog drain (QoS 1, persistent session)",
            ["consumer", "messages", "msg/s", "ratio to bare"],
            rows,
        )
    )
    step_rows = []
    for backend, b in backends.items():
        for s in b["steps"]:
            step_rows.append(
                [
                    backend,
                    s["offered"],
                    s["published_rate"],
                    s["committed_rate"],
                    s["lag_after_publish_s"],
                    "load short" if s["load_short"] else "yes" if s["kept_pace"] else "NO",
                    s["committed_rate"] / bare["rate"] if bare["rate"] else None,
                ]
            )
    res.tables.append(
        table(
            f"ingest: rising offered rate ({duration:.0f} s per step)",
            ["backend", "offered/s", "published/s", "committed/s", "lag s", "pace", "share of bare"],
            step_rows,
        )
    )
    best = {b: max([s["committed_rate"] for s in v["steps"] if s["kept_pace"]] or [0.0]) for b, v in backends.items()}
    res.data["max_sustained"] = best
    if opts.profile:
        res.data["profile"] = prof
        res.tables.extend(profile.tables("profile: gateway (SQLite) at 3,000 msg/s offered", prof))
    return res
