"""The baseline beside the pipeline: a bare paho MQTT 3.1.1 client that only receives (QoS 1, auto-ack).

``python -m bench.bare_sub --host H --port P --topic T --expect N --ready-file F [--protocol 5]``

paho's own ``loop_forever``; ``on_message`` only counts. Creates ``F`` after the SUBACK, prints one
JSON line (``received``, ``first``, ``last``: monotonic seconds) once ``N`` arrived, then idles until
stdin closes, so the parent can read this process's CPU time from ``/proc`` with it still alive.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", default="sensors/+/data")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1")
    args = parser.parse_args()
    state = {"n": 0, "first": 0.0, "last": 0.0}

    def on_subscribe(c: Any, u: Any, mid: int, rcs: Any, props: Any) -> None:
        args.ready_file.touch()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        now = time.monotonic()
        if not state["n"]:
            state["first"] = now
        state["n"] += 1
        state["last"] = now
        if state["n"] == args.expect:
            print(json.dumps({"received": state["n"], "first": state["first"], "last": now}), flush=True)

    protocol = paho.MQTTv5 if args.protocol == "5" else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=protocol)
    client.max_inflight_messages_set(1000)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(args.topic, qos=1)
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port, keepalive=60)
    # stdin closing (the parent is done with us) ends the loop.
    threading.Thread(target=lambda: (sys.stdin.read(), client.disconnect()), daemon=True).start()
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
