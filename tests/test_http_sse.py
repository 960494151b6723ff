"""``GET /api/v1/events`` over a real socket with httpx streaming (quart's test client deadlocks on
streams): retry first, heartbeats, replay after Last-Event-ID, filters, reset, and fast shutdown."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing

from gateway import metrics
from gateway.http.sse import SseStreams
from gateway.hub import Hub
from gateway.store.base import NewEvent, Store
from tests.support.http import ApiServer
from tests.test_http_api import assert_problem

Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]


async def frames(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Parse an SSE stream into frames ({"id", "event", "data", "retry", "comment"} as present)."""
    frame: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if frame:
                yield frame
            frame = {}
            continue
        field, _, value = line.partition(":")
        frame["comment" if field == "" else field] = value.removeprefix(" ")


async def add_events(server: ApiServer, *specs: tuple[str, str | None]) -> list[int]:
    events = await server.store.append_events(
        [NewEvent(type=t, data={"n": i, "device_id": d}, device_id=d) for i, (t, d) in enumerate(specs)]
    )
    server.hub.notify()
    return [e.id for e in events]


async def collect(
    server: ApiServer,
    n: int,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    role: str | None = "read",
    during: Callable[[], Awaitable[Any]] | None = None,
) -> list[dict[str, str]]:
    """Open a stream, start ``during`` once the ``retry`` frame arrived, read until ``n`` data frames."""
    out: list[dict[str, str]] = []
    async with (
        trio.open_nursery() as nursery,
        server.client(role) as c,
        c.stream("GET", "/api/v1/events", params=params, headers=headers) as r,
    ):
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        with trio.fail_after(10):
            async for frame in frames(r):
                out.append(frame)
                if len(out) == 1:
                    assert "retry" in frame, frame  # retry comes first
                    if during is not None:
                        nursery.start_soon(during)
                if sum("data" in f for f in out) >= n:
                    break
    return out


def later(server: ApiServer, *specs: tuple[str, str | None]) -> Callable[[], Awaitable[None]]:
    """A task that appends events half a second later (after the stream went live)."""

    async def go() -> None:
        await trio.sleep(0.5)
        await add_events(server, *specs)

    return go


async def test_retry_first_then_live_events_and_heartbeat(api_factory: Factory) -> None:
    async with api_factory(heartbeat=0.2) as server:
        got = await collect(server, 2, during=later(server, ("packet", "d1"), ("alert", "d2")))
        assert got[0]["retry"] == "3000"
        data = [f for f in got if "data" in f]
        assert [f["event"] for f in data] == ["packet", "alert"]
        assert int(data[0]["id"]) < int(data[1]["id"])
        assert any("comment" in f for f in got), got  # a heartbeat before the events arrived


async def test_replay_after_last_event_id_then_live(api: ApiServer) -> None:
    ids = await add_events(api, *[("packet", "d1")] * 5)
    got = await collect(api, 4, headers={"Last-Event-ID": str(ids[1])}, during=later(api, ("packet", "d1")))
    data_ids = [int(f["id"]) for f in got if "data" in f]
    assert data_ids == [*ids[2:], ids[-1] + 1]
    # The query parameter works the same (EventSource cannot set headers on the first connect).
    got = await collect(api, 2, params={"last_event_id": str(ids[3])})
    assert [int(f["id"]) for f in got if "data" in f] == [ids[4], ids[4] + 1]


async def test_filters_by_type_and_device(api: ApiServer) -> None:
    await add_events(api, ("packet", "d1"), ("alert", "d1"), ("packet", "d2"), ("alert", "d2"), ("packet", "d1"))
    got = await collect(api, 2, params={"last_event_id": "0", "types": "alert"})
    assert [f["event"] for f in got if "data" in f] == ["alert", "alert"]
    got = await collect(api, 2, params={"last_event_id": "0", "device_id": "d1", "types": "packet,alert"})
    data = [f for f in got if "data" in f]
    assert [f["event"] for f in data] == ["packet", "alert"] and all('"d1"' in f["data"] for f in data)


async def test_types_are_those_the_gateway_emits(api: ApiServer) -> None:
    async with api.client("read") as c:
        r = await c.get("/api/v1/events", params={"types": "packet,overheat,alrt"})
    detail = assert_problem(r, 400, "query_invalid")["detail"]
    assert detail == "types: unknown event type alrt, overheat (known: alert, packet, reset)"
    api.ctx.event_types = lambda: frozenset({"packet", "overheat"})  # as the rules in force say
    await add_events(api, ("overheat", "d1"), ("packet", "d1"))
    got = await collect(api, 1, params={"last_event_id": "0", "types": "overheat"})
    assert [f["event"] for f in got if "data" in f] == ["overheat"]


async def test_unknown_last_event_id_gets_reset_first(api: ApiServer) -> None:
    await add_events(api, ("packet", "d1"))
    got = await collect(api, 1, headers={"Last-Event-ID": "999999"})
    first = next(f for f in got if "data" in f)
    assert first["event"] == "reset"


async def test_access_token_query_and_kept_out_of_logs(api: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    await add_events(api, ("packet", "d1"))
    with caplog.at_level(logging.INFO, logger="gateway.http"):
        got = await collect(api, 1, role=None, params={"access_token": api.keys["read"], "last_event_id": "0"})
    assert [f["event"] for f in got if "data" in f] == ["packet"]
    assert api.keys["read"] not in caplog.text
    assert re.search(r"access_token=(\*+|(%2A)+)&", caplog.text) and "key=test-read" in caplog.text


@pytest.mark.parametrize(
    ("params", "headers", "parameter"),
    [
        ({"last_event_id": "-1"}, {}, "last_event_id"),
        ({}, {"Last-Event-ID": "abc"}, "Last-Event-ID"),
        ({"types": "a b"}, {}, "types"),
        ({"types": "packet,nope"}, {}, "types"),  # a type the gateway never emits
        ({"device_id": "bad id"}, {}, "device_id"),
    ],
)
async def test_bad_parameters(api: ApiServer, params: dict[str, str], headers: dict[str, str], parameter: str) -> None:
    async with api.client("read") as c:
        r = await c.get("/api/v1/events", params=params, headers=headers)
    assert assert_problem(r, 400, "query_invalid")["parameter"] == parameter


async def test_stream_ends_promptly_on_server_stop(api: ApiServer) -> None:
    async with api.client("read") as c, c.stream("GET", "/api/v1/events") as r:
        assert r.status_code == 200
        stream = frames(r)
        first = await stream.__anext__()
        assert "retry" in first
        started = trio.current_time()
        api.stop.set()
        with trio.fail_after(3):
            async for _ in stream:
                pass
        assert trio.current_time() - started < 1.0


async def test_stream_waiting_for_a_hub_not_ready_ends_on_stop() -> None:
    """The hub may not be ready yet (its database down at start-up): a stream waiting for it still
    ends at once when the server stops."""
    streams = SseStreams()
    hub = Hub(cast(Store, None))  # never run, so never ready
    ended = trio.Event()

    async def respond() -> None:
        body = streams.stream(hub, {"last_event_id": None, "types": None, "device_id": None}, heartbeat=1, retry_ms=1)
        assert [chunk async for chunk in body] == []
        ended.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        nursery.start_soon(respond)
        await trio.testing.wait_all_tasks_blocked()
        assert not ended.is_set()
        streams.close()
        with trio.fail_after(1):
            await ended.wait()
        nursery.cancel_scope.cancel()


async def test_stream_ends_when_hub_drops_the_subscriber(api: ApiServer) -> None:
    async with api.client("read") as c, c.stream("GET", "/api/v1/events") as r:
        stream = frames(r)
        assert "retry" in await stream.__anext__()
        await add_events(api, ("packet", "d1"))
        assert (await stream.__anext__())["event"] == "packet"
        assert api.hub.clients == 1
        for member in list(api.hub._members):
            api.hub._drop(member)  # what the hub does to a subscriber too slow to keep up
        with trio.fail_after(3):
            rest = [f async for f in stream]
        assert rest == []
    with trio.fail_after(3):
        while api.hub.clients:
            await trio.sleep(0.01)


async def test_heartbeat_also_while_events_flow(api_factory: Factory) -> None:
    async with api_factory(heartbeat=0.3) as server:

        async def trickle() -> None:
            for _ in range(12):
                await add_events(server, ("packet", "d1"))
                await trio.sleep(0.1)

        got = await collect(server, 12, during=trickle)
        assert sum("comment" in f for f in got) >= 2, got


async def _open_stream(stack: AsyncExitStack, server: ApiServer, role: str) -> httpx.Response:
    client = await stack.enter_async_context(server.client(role))
    r = await stack.enter_async_context(client.stream("GET", "/api/v1/events"))
    return r


async def test_stream_limits_per_key_and_in_total(api_factory: Factory) -> None:
    """Past SSE_MAX_STREAMS_PER_KEY a key gets 429 ``too_many_streams``, past SSE_MAX_STREAMS anyone
    gets 503 ``streams_exhausted``, both with Retry-After; a closed stream frees its slot."""
    refused = metrics.SSE_REFUSED.labels("per_key")._value.get(), metrics.SSE_REFUSED.labels("total")._value.get()
    env = {"SSE_MAX_STREAMS_PER_KEY": "2", "SSE_MAX_STREAMS": "3"}
    async with api_factory(env=env) as server, AsyncExitStack() as outer:
        async with AsyncExitStack() as first:
            assert (await _open_stream(first, server, "read")).status_code == 200
            for role in ("read", "write"):
                assert (await _open_stream(outer, server, role)).status_code == 200
            async with server.client("read") as c:
                r = await c.get("/api/v1/events")
            body = assert_problem(r, 429, "too_many_streams")
            assert r.headers["Retry-After"] == "5" and body["limit"] == 2
            async with server.client("admin") as c:
                r = await c.get("/api/v1/events")
            body = assert_problem(r, 503, "streams_exhausted")
            assert r.headers["Retry-After"] == "5" and body["limit"] == 3
        # The first read stream closed: its slot is free again (once the server noticed).
        with trio.fail_after(5):
            while True:
                async with server.client("read") as c, c.stream("GET", "/api/v1/events") as r:
                    if r.status_code == 200:
                        break
                    assert r.status_code in (429, 503)
                await trio.sleep(0.05)
    assert metrics.SSE_REFUSED.labels("per_key")._value.get() - refused[0] >= 1
    assert metrics.SSE_REFUSED.labels("total")._value.get() - refused[1] >= 1


async def stuck_client(url: str, key: str, last_event_id: int = 0) -> trio.SocketStream:
    """A raw connection that asks for a replay and then never reads (a tiny receive buffer, so the
    kernel holds little for it and the server's writes block soon)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET /api/v1/events?last_event_id={last_event_id} HTTP/1.1\r\nHost: {host}\r\n"
        f"X-API-Key: {key}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return stream


async def test_client_that_stops_reading_is_cut_and_frees_its_slot(api_factory: Factory) -> None:
    """A client that never reads its socket: after SSE_SEND_TIMEOUT its subscription ends (counted
    in gateway_sse_stuck_total) and its connection is aborted, so its key may open a stream again."""
    stuck_before = metrics.SSE_STUCK._value.get()
    env = {"SSE_MAX_STREAMS_PER_KEY": "1", "SSE_SEND_TIMEOUT": "1"}
    async with api_factory(env=env) as server:
        await server.store.append_events(
            [NewEvent(type="packet", data={"n": i, "pad": "x" * 400}) for i in range(3000)]
        )
        stream = await stuck_client(server.url, server.keys["read"])
        try:
            with trio.fail_after(5):
                while server.hub.clients == 0:
                    await trio.sleep(0.02)
            async with server.client("read") as c:
                assert_problem(await c.get("/api/v1/events"), 429, "too_many_streams")
            with trio.fail_after(15):
                while metrics.SSE_STUCK._value.get() == stuck_before:
                    await trio.sleep(0.05)
                assert server.hub.clients == 0, "the hub subscription ended"
                while True:  # the kernel aborts the blocked write, the response ends, the slot frees
                    async with server.client("read") as c, c.stream("GET", "/api/v1/events") as r:
                        if r.status_code == 200:
                            break
                    await trio.sleep(0.1)
        finally:
            await stream.aclose()
    assert metrics.SSE_STUCK._value.get() - stuck_before == 1
