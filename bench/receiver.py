"""A bare MQTT receiver (the gateway's bridge, nothing else): the baseline and the latency probe.

``python -m bench.receiver --url U --topic T [--client-id ID --prime] [--expect N] [--duration S]
[--record FILE]`` prints one JSON line: ``received``, ``first_ns``, ``last_ns``, ``rate``.

- ``--prime`` only creates a persistent session (subscribe, disconnect), so a backlog can be queued
  for it; a later run with the same ``--client-id`` drains that backlog as fast as paho can read.
- ``--record`` writes ``device_id seq receive_time_ns`` for every JSON payload carrying both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from bench.harness import find_key
from gateway.mqtt import Inbound
from gateway.simulate import LinkOptions, open_link


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = {"n": 0, "first": 0, "last": 0}
    records: list[str] = []
    done = trio.Event()

    def on_message(msg: Inbound) -> None:
        now = time.time_ns()
        if state["n"] == 0:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if args.record:
            try:
                key = find_key(json.loads(msg.payload))
            except ValueError:
                key = None
            if key is not None:
                records.append(f"{key[0]} {key[1]} {now}\n")
        if args.expect and state["n"] >= args.expect:
            done.set()

    persistent = bool(args.client_id)
    link_opts = LinkOptions(
        url=args.url,
        client_id=args.client_id or "",
        clean_start=not persistent,
        session_expiry=3600 if persistent else 0,
        protocol=args.protocol,
        subscribe=args.topic,
    )
    async with open_link(link_opts, on_message=on_message):
        if args.ready_file:
            await trio.Path(args.ready_file).write_text("ready\n")
        if not args.prime:
            with trio.move_on_after(args.duration):
                await done.wait()
    if args.record:
        await trio.Path(args.record).write_text("".join(records))
    n, first, last = state["n"], state["first"], state["last"]
    rate = (n - 1) / ((last - first) / 1e9) if n > 1 and last > first else 0.0
    return {"received": n, "first_ns": first, "last_ns": last, "rate": rate}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.receiver")
    p.add_argument("--url", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--client-id", default="")
    p.add_argument("--prime", action="store_true")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--record", default="")
    p.add_argument("--ready-file", default="")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    args = p.parse_args()
    print(json.dumps(trio.run(receive, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
