"""A bare MQTT receiver (paho with its own network loop, auto-ack, nothing else): the baseline and
the latency probe.

``python -m bench.receiver --url U --topic T [--client-id ID --prime] [--expect N] [--duration S]
[--record FILE]`` prints one JSON line: ``received``, ``first_ns``, ``last_ns``, ``rate``.

- ``--prime`` only creates a persistent session (subscribe, disconnect), so a backlog can be queued
  for it; a later run with the same ``--client-id`` drains that backlog as fast as paho can read.
- ``--record`` writes ``device_id seq receive_time_ns`` for every JSON payload carrying both.

It is plain paho on purpose (not the gateway's bridge, whose decoder is what is being compared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.harness import find_key


def receive(args: argparse.Namespace) -> dict[str, Any]:
    state: dict[str, Any] = {"n": 0, "first": 0, "last": 0, "subscribed": False}
    records: list[str] = []
    persistent = bool(args.client_id)
    v5 = args.protocol == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id or f"rx-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
    )
    client.max_inflight_messages_set(0)
    url = urlsplit(args.url)
    if url.scheme == "mqtts":
        client.tls_set()

    def on_connect(c: Any, _u: Any, _flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            raise SystemExit(f"broker refused the connection: {rc}")
        c.subscribe(args.topic, qos=1)

    def on_subscribe(*_a: Any) -> None:
        state["subscribed"] = True

    def on_message(c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
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

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    kwargs: dict[str, Any] = {}
    if v5:
        kwargs["clean_start"] = not persistent
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kwargs["properties"] = props
    client.connect(url.hostname or "127.0.0.1", url.port or (8883 if url.scheme == "mqtts" else 1883), **kwargs)
    deadline = time.monotonic() + 10
    while not state["subscribed"]:
        if time.monotonic() > deadline:
            raise SystemExit("no SUBACK within 10 s")
        client.loop(0.1)
    if args.ready_file:
        Path(args.ready_file).write_text("ready\n")
    if not args.prime:
        end = time.monotonic() + args.duration
        while time.monotonic() < end and not (args.expect and state["n"] >= args.expect):
            client.loop(0.05)
    client.disconnect()
    client.loop(0.1)
    if args.record:
        Path(args.record).write_text("".join(records))
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
    print(json.dumps(receive(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
