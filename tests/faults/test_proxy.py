"""The fault proxy itself: forwards, delays, cuts, blackholes, restores."""

from __future__ import annotations

import time

import trio

from tests.faults.proxy import FaultProxy


async def _echo_server(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(echo, listeners, handler_nursery=nursery)


async def _roundtrip(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        got += chunk
    return got


async def test_proxy_forwards_delays_cuts_blackholes_and_restores() -> None:
    async with trio.open_nursery() as nursery:
        target = await nursery.start(_echo_server)
        proxy = FaultProxy(target)
        port = await nursery.start(proxy.run)

        stream = await trio.open_tcp_stream("127.0.0.1", port)
        big = bytes(range(256)) * 4096  # 1 MiB, many chunks, order kept
        assert await _roundtrip(stream, big) == big

        proxy.set_delay(0.2)
        t0 = time.monotonic()
        assert await _roundtrip(stream, b"ping") == b"ping"
        assert 0.38 <= time.monotonic() - t0 < 2.0  # 0.2 s each way
        proxy.restore()

        assert proxy.cut() == 1
        with trio.fail_after(5):
            try:
                got = await _roundtrip(stream, b"after cut")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                got = b""
        assert got == b""
        await stream.aclose()

        proxy.blackhole()
        silent = await trio.open_tcp_stream("127.0.0.1", port)  # accepted ...
        await silent.send_all(b"hello")
        with trio.move_on_after(0.5) as waited:
            await silent.receive_some(10)  # ... but nothing comes back
        assert waited.cancelled_caught

        proxy.restore()
        fresh = await trio.open_tcp_stream("127.0.0.1", port)
        assert await _roundtrip(fresh, b"back") == b"back"
        await fresh.aclose()
        await silent.aclose()
        nursery.cancel_scope.cancel()
