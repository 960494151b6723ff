"""Scenario 8: SSE under faults.

- A client cut in the middle of a burst reconnects with ``Last-Event-ID`` [missed 0, repeated 0]:
  its events, before and after the cut, are compared with what was stored (the accounting's
  ``stored`` column is what that client saw, so ``lost`` is a missed event and ``duplicated`` a
  repeated one).
- A client that stops reading (a small receive buffer, never read) [it is cut, and memory stays
  bounded], while a reading client still gets every event.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio

from tests.faults.accounting import account, report
from tests.faults.harness import READ_KEY, Gateway, Publisher, SseRecorder, gateway_env, readings, stored, wait_stored
from tests.support.mqtt import MosquittoServer

pytestmark = pytest.mark.slow

MEMORY_BUDGET_MB = 50
SEND_TIMEOUT = 2


async def _until(predicate: object, limit: float) -> None:
    assert callable(predicate)
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.02)


async def test_cut_mid_burst_reconnects_with_last_event_id(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    gw = Gateway(
        tmp_path / "gw", gateway_env(tmp_path / "gw", mqtt_url=mosquitto.url, db_url=db_url, client_id="gw-sse-cut")
    )
    batch = readings("sse-cut", 6000, devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-sse-cut")
    await trio.to_thread.run_sync(gw.start)
    try:
        async with trio.open_nursery() as nursery:
            whole = SseRecorder(gw.url)  # never cut: the reference
            await nursery.start(whole.run)
            cut = SseRecorder(gw.url)
            async with trio.open_nursery() as inner:
                await inner.start(cut.run)
                nursery.start_soon(lambda: pub.arun(batch, rate=1500, ack_wait=60))
                await _until(lambda: len(cut.events) >= 1500, 60)
                inner.cancel_scope.cancel()  # the client goes away mid-burst
            seen_before, last_id = len(cut.events), cut.last_id
            await _until(lambda: len(whole.events) >= seen_before + 1000, 60)  # events go on meanwhile
            t0 = time.monotonic()
            resumed = SseRecorder(gw.url, last_event_id=last_id)
            await nursery.start(resumed.run)
            await wait_stored(db_url, [r.key for r in batch], limit=120)
            await _until(lambda: len(resumed.events) + seen_before >= len(batch), 60)
            caught_up = time.monotonic() - t0
            await trio.sleep(1.0)  # a repeat would show up now
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(gw.kill_safely)
    events = cut.events + resumed.events
    ids = [e.id for e in events]
    seen = cut.packet_keys() + resumed.packet_keys()
    acc = report(
        account(
            "8 SSE client cut mid-burst, resumed with Last-Event-ID",
            sent=pub.attempted,
            acked=pub.acked,
            stored=seen,
            recovery_s=caught_up,
            cut_after=seen_before,
            resumed_after_id=last_id,
            missed=len(set(stored(db_url)) - set(seen)),
            repeated=len(ids) - len(set(ids)),
        )
    )
    assert acc.lost == 0 and acc.duplicated == 0 and acc.unexpected == 0 and acc.acked == len(batch)
    assert ids == sorted(set(ids)), "ids must only grow, with no repeat"
    assert [e.id for e in whole.events] == ids  # the same events, with the same (stable) ids


def _rss(pid: int) -> tuple[int, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _stuck_client(port: int) -> socket.socket:
    """An SSE client with a 4 KiB receive buffer that never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {READ_KEY}\r\n\r\n".encode())
    return sock


def _closed_by_server(sock: socket.socket, limit: float = 30.0) -> bool:
    """Read what is buffered: True once the server has closed the stream."""
    sock.settimeout(limit)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


async def test_client_that_stops_reading_is_cut(mosquitto: MosquittoServer, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/gw.db"
    gw = Gateway(
        tmp_path / "gw",
        gateway_env(
            tmp_path / "gw",
            mqtt_url=mosquitto.url,
            db_url=db_url,
            client_id="gw-sse-stuck",
            SSE_SEND_TIMEOUT=str(SEND_TIMEOUT),
        ),
    )
    batch = readings("sse-stuck", 10_000, devices=10)
    pub = Publisher(mosquitto.host, mosquitto.port, client_id="pub-sse-stuck")
    await trio.to_thread.run_sync(gw.start)
    assert gw.proc is not None
    stuck = _stuck_client(gw.port)
    try:
        async with trio.open_nursery() as nursery:
            reader = SseRecorder(gw.url)
            await nursery.start(reader.run)
            await _until(lambda: gw.ping().get("sse_clients") == 2, 10)
            base, _ = _rss(gw.proc.pid)
            t0 = time.monotonic()
            await pub.arun(batch, ack_wait=60)
            await _until(lambda: len(reader.packet_keys()) >= len(batch), 120)
            await _until(lambda: gw.ping().get("sse_clients") == 1, 30)
            cut_after = time.monotonic() - t0
            _, peak = _rss(gw.proc.pid)
            stuck_total = await trio.to_thread.run_sync(gw.metric, "gateway_sse_stuck_total")
            nursery.cancel_scope.cancel()
        # The stream is over; the blocked write is ended by the kernel (TCP_USER_TIMEOUT, the send
        # timeout of zero window). Reading now would reopen the window, so give it time first.
        await trio.sleep(2 * SEND_TIMEOUT + 2)
        closed = await trio.to_thread.run_sync(_closed_by_server, stuck)
    finally:
        stuck.close()
        await trio.to_thread.run_sync(gw.kill_safely)
    grown = (peak - base) / 2**20
    acc = report(
        account(
            "8 SSE client that stops reading",
            sent=pub.attempted,
            acked=pub.acked,
            stored=reader.packet_keys(),
            recovery_s=cut_after,
            stuck_cut=closed,
            rss_growth_mb=round(grown, 1),
        )
    )
    assert closed, "the stuck client was not cut"
    assert stuck_total and stuck_total >= 1
    assert acc.lost == 0 and acc.duplicated == 0  # the reading client missed nothing meanwhile
    assert grown <= MEMORY_BUDGET_MB, f"RSS grew {grown:.1f} MB"
