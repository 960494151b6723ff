"""SSE clients (httpx streaming under Trio) that record when each event arrives.

``python -m bench.sse_client --url URL --key KEY --clients N --duration S [--expect E] --record FILE
--ready-file F`` opens N concurrent ``GET /api/v1/events`` streams, creates F once every stream has
its response headers, and writes ``device_id seq receive_time_ns`` per received ``packet`` event.
Prints one JSON line: ``connected``, ``events``, ``errors``. Stops after S seconds, or once every
client saw E events.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import httpx
import trio

_DEV = re.compile(r'"device_id":\s*"([^"]+)"')
_SEQ = re.compile(r'"seq":\s*(\d+)')


async def client(
    http: httpx.AsyncClient,
    url: str,
    key: str,
    out: list[str],
    state: dict[str, Any],
    expect: int,
    finished: trio.Event,
    all_connected: trio.Event,
    total: int,
) -> None:
    seen = 0
    try:
        async with http.stream("GET", url, headers={"X-API-Key": key, "Accept": "text/event-stream"}) as resp:
            if resp.status_code != 200:
                state["errors"] += 1
                state["connected"] += 1
                if state["connected"] >= total:
                    all_connected.set()
                return
            state["connected"] += 1
            if state["connected"] >= total:
                all_connected.set()
            event = ""
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("packet", ""):
                    now = time.time_ns()
                    dev, seq = _DEV.search(line), _SEQ.search(line)
                    if dev and seq:
                        out.append(f"{dev.group(1)} {seq.group(1)} {now}\n")
                        state["events"] += 1
                        seen += 1
                        if expect and seen >= expect:
                            state["finished"] += 1
                            if state["finished"] >= total:
                                finished.set()
                            return
                elif not line:
                    event = ""
    except httpx.HTTPError:
        state["errors"] += 1
        if state["connected"] < total:
            state["connected"] += 1
            if state["connected"] >= total:
                all_connected.set()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: list[str] = []
    state: dict[str, Any] = {"connected": 0, "events": 0, "errors": 0, "finished": 0}
    finished = trio.Event()
    all_connected = trio.Event()
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=0)
    timeout = httpx.Timeout(10.0, read=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http, trio.open_nursery() as nursery:
        for _ in range(args.clients):
            nursery.start_soon(
                client,
                http,
                args.url,
                args.key,
                out,
                state,
                args.expect,
                finished,
                all_connected,
                args.clients,
            )
        with trio.move_on_after(60):
            await all_connected.wait()
        with open(args.ready_file, "w") as fh:  # noqa: ASYNC230 - a one-line marker file
            fh.write("ready\n")
        with trio.move_on_after(args.duration):
            await finished.wait()
        nursery.cancel_scope.cancel()
    with open(args.record, "w") as fh:  # noqa: ASYNC230 - after the measurement
        fh.writelines(out)
    return {k: state[k] for k in ("connected", "events", "errors")}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sse_client")
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--record", required=True)
    p.add_argument("--ready-file", required=True)
    args = p.parse_args()
    print(json.dumps(trio.run(run, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
