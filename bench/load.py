"""HTTP load: wrk when installed (with a Lua ``done`` hook for exact percentiles), else an httpx client.

Both report requests/s, p50/p95/p99/max latency in ms, and errors (connect/read/timeouts + non-2xx).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.harness import BenchFailed, pct

_WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50":%d,"p95":%d,"p99":%d,"max":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def tool() -> str:
    """Which load generator this run uses."""
    return "wrk" if shutil.which("wrk") else "httpx"


async def load(
    url: str,
    *,
    duration: float,
    connections: int = 50,
    headers: dict[str, str] | None = None,
    workdir: Path,
    rate: float | None = None,
) -> dict[str, Any]:
    """Hammer ``url`` for ``duration`` seconds with ``connections`` concurrent keep-alive connections.

    ``rate``: offer at most that many requests/s in all (each connection waits ``connections / rate``
    seconds before each request) instead of as many as the server answers: latency at a given load.
    """
    pause = connections / rate if rate else 0.0
    if tool() == "wrk":
        return await _wrk(url, duration, connections, headers or {}, workdir, pause)
    return await _httpx(url, duration, connections, headers or {}, pause)


async def _wrk(
    url: str, duration: float, connections: int, headers: dict[str, str], d: Path, pause: float
) -> dict[str, Any]:
    script = d / "report.lua"
    # wrk's delay() hook: milliseconds a connection waits before its next request.
    paced = f"delay = function() return {pause * 1000:.3f} end\n" if pause else ""
    script.write_text(paced + _WRK_LUA)
    cmd = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    result = await trio.run_process([*cmd, url], capture_stdout=True, capture_stderr=True, check=False)
    line = next((ln for ln in result.stdout.decode().splitlines() if ln.startswith("JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchFailed(f"wrk failed: {result.stdout.decode()[-1000:]} {result.stderr.decode()[-1000:]}")
    raw = json.loads(line[5:])
    seconds = raw["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "p50": raw["p50"] / 1000,
        "p95": raw["p95"] / 1000,
        "p99": raw["p99"] / 1000,
        "max": raw["max"] / 1000,
        "errors": raw["errors"],
        "non2xx": raw["non2xx"],
    }


async def _httpx(url: str, duration: float, connections: int, headers: dict[str, str], pause: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = non2xx = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=10.0) as client:
        deadline = time.monotonic() + duration

        async def worker() -> None:
            nonlocal errors, non2xx
            while time.monotonic() < deadline:
                if pause:
                    await trio.sleep(pause)
                t0 = time.perf_counter()
                try:
                    resp = await client.get(url)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if resp.status_code >= 300:
                    non2xx += 1

        t_start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(worker)
        elapsed = time.monotonic() - t_start
    return {
        "tool": "httpx",
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": pct(latencies, 50),
        "p95": pct(latencies, 95),
        "p99": pct(latencies, 99),
        "max": max(latencies) if latencies else None,
        "errors": errors,
        "non2xx": non2xx,
    }
