"""Validation and rows: CPU microseconds per message of ``to_records`` (each packet validated and
turned into its row) over batches of 500, and of its parts; plus the per-batch metrics.

    .venv/bin/python -m bench.validate_quick [--batch 500] [--rounds 40]

Packets as the firmware sends them (``tests.support.mqtt.packet``: seq, epoch timestamp, two
measurements), the same with RFC 3339 timestamps, and a batch with one reject in ten. The best of
five repeats (CPU time, so other load on the machine matters little). Never asserts on times.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.ingest import Stored, message_from_packet, observe, to_records
from gateway.mqtt import Inbound
from gateway.packets import parse_packet
from tests.support.mqtt import packet


def _best(fn: Callable[[], Any], count: int, rounds: int) -> float:
    """The best of five: CPU microseconds per message of ``rounds`` calls of ``fn`` (``count`` each)."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            fn()
        best = min(best, (time.process_time() - start) / rounds / count * 1e6)
    return best


def _batch(size: int, *, rfc3339: bool = False, bad_every: int = 0) -> list[Inbound]:
    now = datetime.now(UTC)  # one receive time per read burst, as the bridge gives
    out = []
    for i in range(size):
        body = packet(f"esp32-{i % 50:03d}", i)
        if rfc3339:
            obj = json.loads(body)
            obj["timestamp"] = datetime.fromtimestamp(obj["timestamp"], UTC).isoformat().replace("+00:00", "Z")
            body = json.dumps(obj, separators=(",", ":")).encode()
        if bad_every and i % bad_every == 0:
            body = body.replace(b'"ok"', b'"fine"')
        out.append(Inbound(f"sensors/esp32-{i % 50:03d}/data", body, now, i, 1, False, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    n, rounds = args.batch, args.rounds

    epoch, rfc, mixed = _batch(n), _batch(n, rfc3339=True), _batch(n, bad_every=10)
    packets = [parse_packet(m.payload) for m in epoch]
    received = epoch[0].received_at
    messages, rejects = to_records(epoch, 65536)
    stored = Stored(messages, [], rejects)
    rows: list[tuple[str, float]] = [
        ("to_records: validation + rows (epoch ts)", _best(lambda: to_records(epoch, 65536), n, rounds)),
        ("to_records (RFC 3339 ts)", _best(lambda: to_records(rfc, 65536), n, rounds)),
        ("to_records, 1 reject in 10", _best(lambda: to_records(mixed, 65536), n, rounds)),
        ("  parse_packet alone", _best(lambda: [parse_packet(m.payload) for m in epoch], n, rounds)),
        (
            "  rows alone (message_from_packet)",
            _best(lambda: [message_from_packet(p, "mqtt", received, "t") for p in packets], n, rounds),
        ),
        ("observe: metrics of the batch", _best(lambda: observe(epoch, stored, "mqtt"), n, rounds)),
    ]
    print(f"batch {n}, CPU us per message (best of 5 x {rounds} batches)")
    for label, us in rows:
        print(f"  {label:<44} {us:6.2f}")


if __name__ == "__main__":
    main()
