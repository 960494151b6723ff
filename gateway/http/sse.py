"""Server-Sent Events: the per-client pump from the hub to the response.

Each stream has a pump task (in a nursery owned by :class:`SseStreams`, which :func:`serve` runs)
that holds the hub subscription and forwards events into a small channel; the response generator
reads that channel with a timeout, so it can send heartbeat comments without ever cancelling the
hub's iterator mid-item. On server stop :meth:`SseStreams.close` ends every pump, each channel
closes, every generator returns, and hypercorn's graceful shutdown finishes in milliseconds.

Resource bounds (a client must not be able to make the gateway hold memory for it without limit):

- Streams are counted per API key and in total; past either limit :meth:`SseStreams.reserve`
  refuses (429 ``too_many_streams`` / 503 ``streams_exhausted``, both with ``Retry-After``).
- Between the hub and the socket a stream holds the frames of at most ``_BATCH_EVENTS`` events
  in the pump (encoded as soon as it takes them: bytes, not event objects) and one write of about
  ``_CHUNK_BYTES`` (the hub holds at most one replay page more).
- A client that stops reading: its write blocks, the response stops taking events, and once the pump
  has waited ``send_timeout`` to hand one over it ends the subscription and counts
  ``gateway_sse_stuck_total``. Hypercorn shields its socket writes from cancellation, so the blocked
  write itself is ended by the kernel: :class:`SendTimeoutConfig` sets ``TCP_USER_TIMEOUT`` on the
  listening sockets (inherited by every accepted one), which aborts a connection whose peer has taken
  no data for that long.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import trio
from hypercorn.config import Config, Sockets

from gateway import metrics
from gateway.errors import ApiError, ProblemCode
from gateway.sse import encode_comment, encode_event, encode_retry

log = logging.getLogger("gateway.http")

HEARTBEAT = encode_comment("keepalive")
_BATCH_EVENTS = 100  # events the pump takes at once (a replay page; ~45 KB of frames)
_CHUNK_BYTES = 64 * 1024  # one write gathers the pump's waiting batches up to about this much
LIMIT_RETRY_AFTER = 5  # seconds; a stream slot frees when any client leaves, so soon is fine


class SendTimeoutConfig(Config):
    """A hypercorn :class:`~hypercorn.config.Config` whose listening sockets carry
    ``TCP_USER_TIMEOUT`` = ``send_timeout``: the kernel aborts a connection whose peer has taken
    no data (zero window, or unacknowledged data) for that long. Without it a client that never
    reads would hold its connection forever, since hypercorn shields its writes from cancellation.
    No effect where the platform lacks the option."""

    send_timeout: float | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if self.send_timeout is not None and option is not None:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(self.send_timeout * 1000)))
        return sockets


class StreamSlot:
    """One reserved stream: released exactly once, by the stream's end or, if its body never
    started (the client left first), when the response is dropped."""

    def __init__(self, streams: SseStreams, key: str) -> None:
        self._streams = streams
        self.key = key
        self._held = True

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if self._held:
            self._held = False
            self._streams._release(self.key)

    def __del__(self) -> None:
        self.release()


class SseStreams:
    """Owns the pump tasks of all open streams. Runs until cancelled (inside :func:`serve`)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self.open = 0
        self.reserved = 0
        self._per_key: Counter[str] = Counter()

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

    def reserve(self, key: str, *, max_total: int, max_per_key: int) -> StreamSlot:
        """Reserve a stream for ``key`` (an API key's name), or refuse.

        Raises :class:`ApiError` 429 ``too_many_streams`` when ``key`` already has ``max_per_key``
        streams, 503 ``streams_exhausted`` when the server has ``max_total``; both with
        ``Retry-After``. Synchronous, so concurrent requests cannot both take the last slot.
        """
        retry = {"Retry-After": str(LIMIT_RETRY_AFTER)}
        if self._per_key[key] >= max_per_key:
            metrics.SSE_REFUSED.labels("per_key").inc()
            raise ApiError(
                ProblemCode.TOO_MANY_STREAMS,
                f"this key already has {max_per_key} open event streams (SSE_MAX_STREAMS_PER_KEY)",
                headers=retry,
                limit=max_per_key,
            )
        if self.reserved >= max_total:
            metrics.SSE_REFUSED.labels("total").inc()
            raise ApiError(
                ProblemCode.STREAMS_EXHAUSTED,
                f"the server has {max_total} open event streams (SSE_MAX_STREAMS)",
                headers=retry,
                limit=max_total,
            )
        self._per_key[key] += 1
        self.reserved += 1
        return StreamSlot(self, key)

    def _release(self, key: str) -> None:
        self.reserved -= 1
        self._per_key[key] -= 1
        if self._per_key[key] <= 0:
            del self._per_key[key]

    async def stream(
        self,
        hub: Any,
        subscribe: dict[str, Any],
        *,
        heartbeat: float,
        retry_ms: int,
        slot: StreamSlot | None = None,
        send_timeout: float = 30.0,
    ) -> AsyncIterator[bytes]:
        """The response body: ``retry:`` first, then events and heartbeat comments until the hub
        ends the subscription, the client leaves or stops reading (``send_timeout``), or the server
        stops. Releases ``slot`` when it ends."""
        nursery = self._nursery
        if nursery is None or self._closing.is_set():
            if slot is not None:
                slot.release()
            return
        # Unbuffered: the pump holds the next batch while the response writes one.
        send, recv = trio.open_memory_channel[bytes](0)
        try:
            pump_scope: trio.CancelScope = await nursery.start(self._pump, hub, subscribe, send, send_timeout)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        self.open += 1
        try:
            yield encode_retry(retry_ms)
            # A comment every ``heartbeat`` seconds whether or not events flow, so proxies and
            # clients can rely on hearing from the server that often.
            next_beat = trio.current_time() + heartbeat
            while True:
                frames: bytes | None = None
                with trio.move_on_after(max(0.0, next_beat - trio.current_time())):
                    try:
                        frames = await recv.receive()
                    except trio.EndOfChannel:
                        break
                # Yield outside the cancel scope: a generator must not suspend inside one.
                if frames is None:
                    next_beat = trio.current_time() + heartbeat
                    yield HEARTBEAT
                    continue
                # Everything waiting goes out in one write (the processor commits in batches).
                # Bounded in bytes: a write to a client that stopped reading holds one chunk.
                chunk = [frames]
                size = len(frames)
                while size < _CHUNK_BYTES:
                    try:
                        chunk.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    size += len(chunk[-1])
                yield b"".join(chunk)
        finally:
            self.open -= 1
            pump_scope.cancel()
            recv.close()
            if slot is not None:
                slot.release()

    async def _pump(
        self,
        hub: Any,
        subscribe: dict[str, Any],
        send: trio.MemorySendChannel[bytes],
        send_timeout: float,
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
                            while True:
                                # Frames as the hub built them once for all subscribers (live), or
                                # from the stored JSON (replay); only the bytes are held from here.
                                try:
                                    frames = b"".join([encode_event(e) for e in await events.batch(_BATCH_EVENTS)])
                                except StopAsyncIteration:
                                    break
                                # The response takes events as fast as the socket accepts them:
                                # waiting this long means the client stopped reading.
                                with trio.move_on_after(send_timeout) as waited:
                                    await send.send(frames)
                                if waited.cancelled_caught:
                                    metrics.SSE_STUCK.inc()
                                    log.info("sse client stopped reading, stream cut after %.0fs", send_timeout)
                                    break
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
