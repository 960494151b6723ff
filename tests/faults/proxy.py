"""A small Trio TCP fault proxy: put it between the gateway and the broker or the database.

``FaultProxy(target_port)`` listens on a free port of 127.0.0.1 (``proxy.port``) and forwards each
connection to the target. While it runs a test can switch its mode at any time:

- :meth:`FaultProxy.set_delay` adds latency: every chunk is held ``seconds`` before it is sent on,
  in both directions (so a round trip gains twice that), without capping throughput;
- :meth:`FaultProxy.cut` closes every open connection at once (with a RST, as a crash would);
- :meth:`FaultProxy.blackhole` keeps accepting and keeps connections open, but drops every byte
  (a frozen peer or a dead route: only timeouts notice);
- :meth:`FaultProxy.restore` forwards again (no delay; blackholed connections stay dead, as a
  real peer would see them).

Run it in a nursery: ``port = await nursery.start(proxy.run)``. Runs until cancelled.
"""

from __future__ import annotations

import math
import socket
import struct

import trio

_CHUNK = 65536


class FaultProxy:
    """A forwarding TCP proxy with delay, cut and blackhole switches (see the module docstring)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        self.blackholed = False
        self.accepted = 0
        self._conns: set[_Conn] = set()

    @property
    def open_connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._conns)

    def set_delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` (each direction) from now on."""
        self.delay = seconds

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut. New ones are still accepted."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    def blackhole(self) -> None:
        """Accept, keep open, forward nothing (existing connections go silent too)."""
        self.blackholed = True
        for conn in self._conns:
            conn.blackholed = True

    def restore(self) -> None:
        """Forward normally again, without delay."""
        self.blackholed = False
        self.delay = 0.0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and forward. Calls ``task_status.started(port)``. Runs until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        conn = _Conn(self, client)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)


class _Conn:
    """One proxied connection: two pumps, each with a delay line."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.blackholed = proxy.blackholed
        self._scope = trio.CancelScope()

    def abort(self) -> None:
        for stream in (self.client, self.upstream):
            if stream is not None:
                # SO_LINGER 0: close() sends a RST, so the peer sees a reset, not an orderly FIN.
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            try:
                if self.blackholed:
                    await self._drain(self.client)
                    return
                try:
                    self.upstream = await trio.open_tcp_stream(*self.proxy.target)
                except OSError:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, self.client, self.upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, self.upstream, self.client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            for stream in (self.client, self.upstream):
                if stream is not None:
                    await stream.aclose()

    async def _drain(self, src: trio.SocketStream) -> None:
        while await src.receive_some(_CHUNK):
            pass

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](math.inf)

        async def writer() -> None:
            async for due, data in recv:
                await trio.sleep_until(due)
                if not self.blackholed:
                    await dst.send_all(data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                async with send:
                    while data := await src.receive_some(_CHUNK):
                        if self.proxy.blackholed:
                            self.blackholed = True
                        if not self.blackholed:
                            send.send_nowait((trio.current_time() + self.proxy.delay, data))
                # EOF: the writer flushes what is due, then the half-close is passed on.
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            done.cancel()  # a reset on either side ends the whole connection
