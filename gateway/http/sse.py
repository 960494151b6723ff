"""Server-Sent Events: the per-client pump from the hub to the response.

Each stream has a pump task (in a nursery owned by :class:`SseStreams`, which :func:`serve` runs)
that holds the hub subscription and forwards events into a small channel; the response generator
reads that channel with a timeout, so it can send heartbeat comments without ever cancelling the
hub's iterator mid-item. On server stop :meth:`SseStreams.close` ends every pump, each channel
closes, every generator returns, and hypercorn's graceful shutdown finishes in milliseconds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import trio

from gateway.sse import encode_comment, encode_event, encode_retry
from gateway.store.base import Event

log = logging.getLogger("gateway.http")

HEARTBEAT = encode_comment("keepalive")
_BUFFER = 64
_CHUNK_EVENTS = 256


class SseStreams:
    """Owns the pump tasks of all open streams. Runs until cancelled (inside :func:`serve`)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self.open = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery the pumps run in. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def close(self) -> None:
        """End every stream (server stopping); new streams end at once too."""
        self._closing.set()

    @property
    def ready(self) -> bool:
        """Whether streams can be opened (the server is running and not stopping)."""
        return self._nursery is not None and not self._closing.is_set()

    async def stream(
        self, hub: Any, subscribe: dict[str, Any], *, heartbeat: float, retry_ms: int
    ) -> AsyncIterator[bytes]:
        """The response body: ``retry:`` first, then events and heartbeat comments until the hub
        ends the subscription, the client leaves, or the server stops."""
        nursery = self._nursery
        if nursery is None or self._closing.is_set():
            return
        send, recv = trio.open_memory_channel[Event](_BUFFER)
        pump_scope: trio.CancelScope = await nursery.start(self._pump, hub, subscribe, send)
        self.open += 1
        try:
            yield encode_retry(retry_ms)
            # A comment every ``heartbeat`` seconds whether or not events flow, so proxies and
            # clients can rely on hearing from the server that often.
            next_beat = trio.current_time() + heartbeat
            while True:
                item: Event | None = None
                with trio.move_on_after(max(0.0, next_beat - trio.current_time())):
                    try:
                        item = await recv.receive()
                    except trio.EndOfChannel:
                        break
                # Yield outside the cancel scope: a generator must not suspend inside one.
                if item is None:
                    next_beat = trio.current_time() + heartbeat
                    yield HEARTBEAT
                else:
                    # Send what is already waiting in the same chunk: one write per burst (the
                    # processor commits events in batches) instead of one per event.
                    chunk = [encode_event(item)]
                    while len(chunk) < _CHUNK_EVENTS:
                        try:
                            chunk.append(encode_event(recv.receive_nowait()))
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    yield b"".join(chunk)
        finally:
            self.open -= 1
            pump_scope.cancel()
            recv.close()

    async def _pump(
        self,
        hub: Any,
        subscribe: dict[str, Any],
        send: trio.MemorySendChannel[Event],
        *,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with send:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._cancel_on_close, nursery.cancel_scope)
                    try:
                        async with hub.subscribe(**subscribe) as events:
                            async for event in events:
                                await send.send(event)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the client went away
                    except Exception:
                        # A failing replay (e.g. database down) ends this stream, never the server;
                        # the client reconnects with Last-Event-ID and resumes.
                        log.warning("event stream ended by an error", exc_info=True)
                    nursery.cancel_scope.cancel()

    async def _cancel_on_close(self, scope: trio.CancelScope) -> None:
        await self._closing.wait()
        scope.cancel()
