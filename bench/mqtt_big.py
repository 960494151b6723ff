"""RSS cost of oversized publishes: five 30 MB QoS 1 messages through MqttBridge → to_records → ack.

The publisher is ``mosquitto_pub -f`` in its own process, so only the bridge's memory is measured.
Prints the RSS before, the peak (``ru_maxrss``) and the RSS after, per protocol.

    PYTHONPATH=. .venv/bin/python bench/mqtt_big.py [--size-mb 30] [--count 5] [--protocol 5|3.1.1]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.health import ComponentHealth  # noqa: E402
from gateway.ingest import to_records  # noqa: E402
from gateway.mqtt import Inbound, MqttBridge  # noqa: E402
from gateway.settings import MqttSettings  # noqa: E402
from tests.support.mqtt import MosquittoServer  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def main(size_mb: int, count: int, protocol: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = MosquittoServer(Path(tmp) / "broker")
        server.start()
        try:
            big = Path(tmp) / "big.bin"
            with big.open("wb") as fh:  # in chunks: the peak RSS must not include the file
                for _ in range(size_mb):
                    fh.write(b"x" * (1024 * 1024))
            settings = MqttSettings(url=server.url, client_id=f"bench-big-{protocol}", protocol=protocol)
            bridge = MqttBridge(settings, ComponentHealth("mqtt"))
            send, recv = trio.open_memory_channel[list[Inbound]](64)
            got = 0
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.run, send)
                before = rss_mb()
                for _ in range(count):
                    args = ["mosquitto_pub", "-p", str(server.port), "-q", "1", "-t", "sensors/big/data"]
                    await trio.run_process([*args, "-f", str(big)])
                # A small message after them: it arrives once the big ones were read (or dropped).
                await trio.run_process(
                    ["mosquitto_pub", "-p", str(server.port), "-q", "1", "-t", "sensors/big/data", "-m", "{}"]
                )
                with trio.move_on_after(120):
                    while True:
                        batch = await recv.receive()
                        got += len(batch)
                        to_records(batch, 65536)
                        bridge.ack(batch)
                        if any(m.payload == b"{}" for m in batch):
                            break
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                after = rss_mb()
                nursery.cancel_scope.cancel()
            print(
                f"protocol={protocol} {count}x{size_mb}MB: messages received={got} rss before={before:.0f}MB "
                f"peak={peak:.0f}MB after={after:.0f}MB (peak - before = {peak - before:.0f}MB)"
            )
        finally:
            server.kill()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=30)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--protocol", default="3.1.1", choices=["5", "3.1.1"])
    a = p.parse_args()
    trio.run(main, a.size_mb, a.count, a.protocol)
