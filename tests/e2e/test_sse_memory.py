"""200 SSE clients that never read, each replaying 100,000 stored events, against the gateway as a
process: its memory stays bounded (issue 10, item 5)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest
import trio

from gateway.settings import DatabaseSettings
from gateway.store import open_store
from gateway.store.base import NewEvent
from tests.e2e.harness import GatewayProcess, api_key

EVENTS = 100_000
CLIENTS = 200
BUDGET_MB = 50


async def _fill(url: str) -> None:
    async with open_store(DatabaseSettings(DATABASE_URL=url)) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for start in range(0, EVENTS, 10_000):
            await store.append_events(
                [
                    NewEvent(
                        type="packet",
                        data={
                            "id": i,
                            "device_id": f"esp32-{i % 50:02d}",
                            "device_ts": "2026-11-27T09:00:00Z",
                            "measurements": {"temperature": 21.5, "humidity": 40.2},
                            "status": "ok",
                            "battery": 87,
                        },
                        device_id=f"esp32-{i % 50:02d}",
                    )
                    for i in range(start, start + 10_000)
                ]
            )
        nursery.cancel_scope.cancel()


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_200_stuck_replaying_clients_grow_rss_by_at_most_50mb(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gateway.db'}"
    trio.run(_fill, db)
    key, entry = api_key("mem", "read")
    gw = GatewayProcess(
        tmp_path,
        {
            "DATABASE_URL": db,
            "API_KEYS": entry,
            "MQTT_CLIENT_ID": f"e2e-sse-mem-{tmp_path.name}",
            "SSE_MAX_STREAMS": "1000",
            "SSE_MAX_STREAMS_PER_KEY": "1000",
            "SSE_SEND_TIMEOUT": "600",
            "RATE_LIMIT": "100000/second",
            "LOG_LEVEL": "WARNING",
        },
    )
    gw.start()
    sockets: list[socket.socket] = []
    try:
        assert gw.proc is not None
        pid = gw.proc.pid
        time.sleep(1.0)
        base = _status(pid)["VmRSS"]
        request = (
            f"GET /api/v1/events?last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n\r\n"
        ).encode()
        for _ in range(CLIENTS):
            s = socket.create_connection(("127.0.0.1", gw.port))
            s.sendall(request)  # and never read
            sockets.append(s)
        # Wait until every stream is open and the gateway has stopped working (all writes blocked).
        deadline = time.monotonic() + 300
        ping: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                ping = httpx.get(gw.url + "/api/v1/ping", headers={"X-API-Key": key}, timeout=10).json()
            except httpx.HTTPError:
                continue  # busy replaying: ask again
            if ping.get("sse_clients") == CLIENTS:
                break
            time.sleep(0.5)
        assert ping.get("sse_clients") == CLIENTS, ping
        idle = 0
        last = _cpu(pid)
        while time.monotonic() < deadline and idle < 3:
            time.sleep(1.0)
            now = _cpu(pid)
            idle = idle + 1 if now - last < 0.05 else 0
            last = now
        assert idle >= 3, "the gateway kept working: some client is not stuck yet"
        peak = _status(pid)["VmHWM"]
        grown = (peak - base) / 2**20
        print(
            f"\nRSS before {base / 2**20:.1f} MB, peak with {CLIENTS} stuck replaying clients "
            f"{peak / 2**20:.1f} MB: +{grown:.1f} MB"
        )
        assert grown <= BUDGET_MB
        # Still serving.
        assert httpx.get(gw.url + "/api/v1/ping", timeout=10).status_code == 200
    finally:
        for s in sockets:
            s.close()
        gw.stop()
