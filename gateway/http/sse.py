"""Server-Sent Events: each response body iterates its hub subscription itself.

The response generator awaits its subscription (cancel-safe) under a cancel scope that ends at the
next heartbeat, and writes everything the subscription has ready in one chunk: each delivery wakes
one task, and no task is started per stream. :class:`SseStreams` is the set of open subscriptions (and
the stream counts); on server stop :meth:`SseStreams.close` closes every subscription, every generator
returns, and hypercorn's graceful shutdown finishes in milliseconds.

Resource bounds (a client must not be able to make the gateway hold memory for it without limit):

- Streams are counted per API key and in total; past either limit :meth:`SseStreams.reserve`
  refuses (429 ``too_many_streams`` / 503 ``streams_exhausted``, both with ``Retry-After``).
- Between the hub and the socket a stream holds one write: the frames of at most ``_BATCH_EVENTS``
  events (the hub holds at most one replay page more, and its bounded live channel, which it empties
  when it drops a subscriber that lags too long).
- A client that stops reading: its write blocks and the response stops taking events. Hypercorn
  shields its socket writes from cancellation, so the blocked write is ended by the kernel:
  :class:`SendTimeoutConfig` sets ``TCP_USER_TIMEOUT`` on the listening sockets (inherited by every
  accepted one), which aborts a connection whose peer has taken no data for ``send_timeout``. A
  write that took that long (returned late, or was ended by the abort) ends the stream's
  subscription and counts ``gateway_sse_stuck_total``.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import trio
from hypercorn.config import Config, Sockets

from gateway import metrics
from gateway.errors import ApiError, ProblemCode
from gateway.hub import Hub
from gateway.sse import encode_comment, encode_event, encode_retry
from gateway.subscription import Subscription

log = logging.getLogger("gateway.http")

HEARTBEAT = encode_comment("keepalive")
_BATCH_EVENTS = 200  # events one write takes at most (two replay pages; ~90 KB of frames)
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
    """The open streams: their subscriptions (closed on server stop) and their counts per key."""

    def __init__(self) -> None:
        self._running = False
        self._closing = False
        self._subs: set[Subscription] = set()
        self._waiting: set[trio.CancelScope] = set()  # streams waiting for the hub to be ready
        self.reserved = 0
        self._per_key: Counter[str] = Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept streams while running; on the way out end every stream. Runs until cancelled."""
        self._running = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._running = False
            self.close()

    def close(self) -> None:
        """End every stream (server stopping); new streams end at once too."""
        self._closing = True
        for scope in self._waiting:
            scope.cancel()
        for sub in list(self._subs):
            sub.close()

    @property
    def ready(self) -> bool:
        """Whether streams can be opened (the server is running and not stopping)."""
        return self._running and not self._closing

    @property
    def open(self) -> int:
        """Streams sending events now."""
        return len(self._subs)

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

    async def _subscribe(self, stack: AsyncExitStack, hub: Hub, subscribe: dict[str, Any]) -> Subscription | None:
        """Enter a hub subscription on ``stack`` and count it as open; None when the server stops
        first (waiting for a hub that is not ready yet ends on :meth:`close` too)."""
        sub: Subscription | None = None
        with trio.CancelScope() as waiting:
            self._waiting.add(waiting)
            try:
                sub = await stack.enter_async_context(hub.subscribe(**subscribe))
            finally:
                self._waiting.discard(waiting)
        if sub is None or self._closing:
            return None
        self._subs.add(sub)
        return sub

    async def stream(
        self,
        hub: Hub,
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
        write = _Write(send_timeout)
        try:
            async with AsyncExitStack() as stack:
                sub = await self._subscribe(stack, hub, subscribe) if self.ready else None
                if sub is None:
                    return
                try:
                    yield encode_retry(retry_ms)
                    # A comment every ``heartbeat`` seconds whether or not events flow, so proxies
                    # and clients can rely on hearing from the server that often.
                    next_beat = trio.current_time() + heartbeat
                    while (chunk := await _next_chunk(sub, next_beat)) is not None:
                        if chunk is HEARTBEAT:
                            next_beat = trio.current_time() + heartbeat
                        write.begin()
                        yield chunk
                        if write.end():
                            break
                finally:
                    self._subs.discard(sub)
        finally:
            if slot is not None:
                slot.release()
            # Counted once the subscription has ended (a cut stream holds nothing in the hub).
            if write.stuck():
                metrics.SSE_STUCK.inc()
                log.info("sse client stopped reading, stream cut after %.0fs", send_timeout)


class _Write:
    """Times one stream's writes: one that took ``send_timeout`` means the client stopped reading."""

    __slots__ = ("_since", "_timeout", "_too_slow")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._since: float | None = None
        self._too_slow = False

    def begin(self) -> None:
        self._since = trio.current_time()

    def end(self) -> bool:
        """The write returned; True when it took too long (the stream should end)."""
        self._too_slow = self.stuck()
        self._since = None
        return self._too_slow

    def stuck(self) -> bool:
        """Whether the last write took (or the one under way has taken) ``send_timeout``."""
        if self._since is None:
            return self._too_slow
        return trio.current_time() - self._since >= self._timeout


async def _next_chunk(sub: Subscription, next_beat: float) -> bytes | None:
    """The next write: every event ``sub`` has ready (waiting for the first until ``next_beat``)
    as one chunk, :data:`HEARTBEAT` when none came by then, None when the stream ends."""
    if trio.current_time() >= next_beat:
        return HEARTBEAT
    with trio.move_on_at(next_beat):
        try:
            # Frames as the hub built them once for all subscribers (live), or from the stored
            # JSON (replay). Everything waiting goes out in one write (the processor commits in
            # batches); cancel-safe, so the heartbeat deadline loses nothing.
            return b"".join([encode_event(e) for e in await sub.batch(_BATCH_EVENTS)])
        except StopAsyncIteration:
            return None
        except Exception:
            # A failing replay (e.g. database down) ends this stream, never the server; the
            # client reconnects with Last-Event-ID and resumes.
            log.warning("event stream ended by an error", exc_info=True)
            return None
    return HEARTBEAT
