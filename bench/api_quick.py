"""Quick API benchmark: requests/s and p50/p95/p99 for ``/api/v1/ping`` and ``/api/v1/messages?limit=100``
on the gateway's HTTP server (quart-trio on hypercorn's trio worker, real SQLite store, 1,000 messages/s
being ingested meanwhile), and, in the same run, a bare hypercorn trio-worker ASGI hello-world.

Needs ``wrk`` (``apt-get install wrk``). Each server runs in its own process; wrk in a third.

    python bench/api_quick.py [--duration 8] [--connections 50] [--threads 2] [--ingest-rate 1000] [--rate 200]

Prints one line per target and the ratios to the hello-world; the last line offers ``--rate`` requests/s
of ``/messages`` on 10 connections (latency at that load, not at saturation). Never a pass/fail gate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

_LUA = """
done = function(summary, latency, requests)
  io.write(string.format('{"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, '
    .. '"p50": %d, "p95": %d, "p99": %d}\\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


# ---- child: bare hello-world -------------------------------------------------------------------


async def _hello_app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b'{"status":"ok"}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve_hello() -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def main() -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve(_hello_app, config, task_status=task_status)
            )
            print(json.dumps({"url": binds[0]}), flush=True)

    trio.run(main)


# ---- child: the gateway's HTTP server with ingest load ------------------------------------------


def serve_gateway(workdir: Path, ingest_rate: int) -> None:
    import logging

    import trio

    from gateway.health import Health
    from gateway.http import AppContext, serve
    from gateway.hub import Hub
    from gateway.settings import load_settings
    from gateway.store import open_store
    from gateway.store.base import NewMessage

    logging.basicConfig(level=logging.WARNING)
    key = "bench-key"
    import hashlib

    env = {
        "DATABASE_URL": f"sqlite:///{workdir / 'bench.db'}",
        "HTTP_PORT": "0",
        "API_KEYS": f"bench:admin:{hashlib.sha256(key.encode()).hexdigest()}",
        "RATE_LIMIT": "100000000/second",
        "LOG_FILE": "",
    }
    settings = load_settings(None, environ=env)

    class NullPublisher:
        async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
            return None

        def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
            return None

    seq = 0

    def batch(n: int) -> list[NewMessage]:
        nonlocal seq
        now = datetime.now(UTC)
        out = []
        for _ in range(n):
            seq += 1
            out.append(
                NewMessage(
                    device_id=f"dev-{seq % 50}",
                    device_ts=now,
                    seq=seq,
                    dedupe_key=f"seq:{seq}",
                    measurements={"temperature": 20 + seq % 10, "humidity": 40.5},
                    status="ok",
                    battery=80.0,
                    source="mqtt",
                    received_at=now,
                )
            )
        return out

    async def main() -> None:
        async with open_store(settings.database) as store, trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for _ in range(20):
                await store.write_batch(batch(500), [])  # 10,000 readings to page through
            hub = Hub(store)
            await nursery.start(hub.run)

            async def reload() -> dict[str, object]:
                return {"changed": [], "restarted": []}

            ctx = AppContext(
                settings=settings,
                store=store,
                hub=hub,
                publisher=NullPublisher(),
                health=Health(),
                on_commit=lambda: None,
                reload=reload,
                version="bench",
            )
            port = await nursery.start(lambda task_status: serve(ctx, task_status=task_status))

            async def ingest() -> None:
                # Like the ingest stage: batches every 20 ms, and each commit invalidates the page cache.
                per_tick = max(1, ingest_rate // 50)
                next_tick = trio.current_time()
                while True:
                    await store.write_batch(batch(per_tick), [])
                    ctx.pages.invalidate()
                    next_tick += 0.02
                    await trio.sleep_until(next_tick)

            if ingest_rate > 0:
                nursery.start_soon(ingest)
            print(json.dumps({"url": f"http://127.0.0.1:{port}", "key": key}), flush=True)

    trio.run(main)


# ---- parent: orchestrate ----------------------------------------------------------------------


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit(f"server {args} failed to start")
    return proc, json.loads(line)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (``/proc``), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _background_cpu(pid: int, seconds: float = 2.0) -> float:
    """CPU seconds per second ``pid`` spends without HTTP load (its ingest), to subtract."""
    before = _cpu_seconds(pid)
    time.sleep(seconds)
    return (_cpu_seconds(pid) - before) / seconds


def _wrk(
    url: str,
    headers: list[str],
    opts: argparse.Namespace,
    lua: Path,
    rate: float | None = None,
    *,
    pid: int,
    background: float = 0.0,
) -> dict[str, float]:
    connections = min(opts.connections, 10) if rate else opts.connections
    if rate:  # wrk's delay() hook paces each connection: connections / rate seconds per request
        paced = lua.with_name("paced.lua")
        paced.write_text(f"delay = function() return {connections * 1000 / rate:.3f} end\n" + _LUA)
        lua = paced
    cmd = ["wrk", f"-t{opts.threads}", f"-c{connections}", f"-d{opts.duration}s", "-s", str(lua)]
    for h in headers:
        cmd += ["-H", h]
    cpu_before, wall_before = _cpu_seconds(pid), time.monotonic()
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    cpu = _cpu_seconds(pid) - cpu_before - background * (time.monotonic() - wall_before)
    stats = json.loads(out.strip().splitlines()[-1])
    seconds = stats["duration_us"] / 1e6
    return {
        # The server's CPU per request (its ingest's share taken off): stable on a shared machine.
        "cpu_us": cpu / max(1, stats["requests"]) * 1e6,
        "rps": stats["requests"] / seconds,
        "p50": stats["p50"] / 1000,
        "p95": stats["p95"] / 1000,
        "p99": stats["p99"] / 1000,
        "errors": stats["errors"],
        "non2xx": stats["non2xx"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ingest-rate", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=200, help="requests/s offered in the paced /messages run")
    parser.add_argument("--child", choices=["hello", "gateway"])
    parser.add_argument("--workdir")
    opts = parser.parse_args()
    if opts.child == "hello":
        return serve_hello()
    if opts.child == "gateway":
        return serve_gateway(Path(opts.workdir), opts.ingest_rate)

    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "pct.lua"
        lua.write_text(_LUA)
        hello, h_info = _spawn(["--child", "hello"])
        gw, g_info = _spawn(["--child", "gateway", "--workdir", tmp, "--ingest-rate", str(opts.ingest_rate)])
        try:
            time.sleep(1.0)
            key = [f"X-API-Key: {g_info['key']}"]
            gw_cpu = {"pid": gw.pid, "background": _background_cpu(gw.pid)}
            messages = g_info["url"] + "/api/v1/messages?limit=100"
            results = {
                "hello-world (bare ASGI, hypercorn trio)": _wrk(h_info["url"] + "/", [], opts, lua, pid=hello.pid),
                "GET /api/v1/ping (no key)": _wrk(g_info["url"] + "/api/v1/ping", [], opts, lua, **gw_cpu),
                "GET /api/v1/ping (with key)": _wrk(g_info["url"] + "/api/v1/ping", key, opts, lua, **gw_cpu),
                "GET /api/v1/messages?limit=100": _wrk(messages, key, opts, lua, **gw_cpu),
                f"GET /api/v1/messages?limit=100 @{opts.rate}/s": _wrk(messages, key, opts, lua, opts.rate, **gw_cpu),
            }
        finally:
            for proc in (hello, gw):
                proc.terminate()
                proc.wait(5)
    base = results["hello-world (bare ASGI, hypercorn trio)"]["rps"]
    print(
        f"wrk -t{opts.threads} -c{opts.connections} -d{opts.duration}s; gateway ingesting "
        f"{opts.ingest_rate} msg/s (SQLite) meanwhile; 2 cores shared by all processes"
    )
    print("(server CPU per request, ingest's share taken off: hello-world vs each target as 'cpu vs hello')")
    print(
        f"{'target':42} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'vs hello':>9} {'errors':>7}"
        f" {'CPU us/req':>10} {'cpu vs hello':>12}"
    )
    base_cpu = results["hello-world (bare ASGI, hypercorn trio)"]["cpu_us"]
    for name, r in results.items():
        print(
            f"{name:42} {r['rps']:9.0f} {r['p50']:8.1f} {r['p95']:8.1f} {r['p99']:8.1f} "
            f"{r['rps'] / base:9.2f} {int(r['errors'] + r['non2xx']):7d} {r['cpu_us']:10.0f} "
            f"{base_cpu / r['cpu_us'] if r['cpu_us'] > 0 else float('nan'):12.2f}"
        )


if __name__ == "__main__":
    main()
