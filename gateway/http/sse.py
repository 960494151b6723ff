"""Server-Sent Events: the response body of each stream, straight from its hub subscription.

The response generator itself waits on the hub subscription (cancel-safe) with the heartbeat
deadline as a timeout, so each delivery wakes one task, not a pump and then the response: with 1,000
streams every event wakes 1,000 tasks. :class:`SseStreams` (which :func:`serve` runs) owns one
watchdog task; on server stop :meth:`SseStreams.close` has it end every stream's subscription, every
generator returns, and hypercorn's graceful shutdown finishes in milliseconds.

Resource bounds (a client must not be able to make the gateway hold memory for it without limit):

- Streams are counted per API key and in total; past either limit :meth:`SseStreams.reserve`
  refuses (429 ``too_many_streams`` / 503 ``streams_exhausted``, both with ``Retry-After``).
- Between the hub and the socket a stream holds one write: the frames of at most ``_BATCH_EVENTS``
  events (the hub holds at most one replay page more, and its bounded live channel).
- A client that stops reading: its write blocks, the response stops taking events, and once the
  write has been blocked ``send_timeout`` the watchdog ends the subscription and counts
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
from contextlib import AsyncExitStack
from typing import Any

import trio
from hypercorn.config import Config, Sockets

from gateway import metrics
from gateway.http.errors import ApiError
from gateway.sse import encode_comment, encode_event, encode_retry

log = logging.getLogger("gateway.http")

HEARTBEAT = encode_comment("keepalive")
_BATCH_EVENTS = 100  # events one write takes at most (a replay page; ~45 KB of frames)
_WATCH_INTERVAL = 0.25  # seconds between the watchdog's looks at blocked writes and server stop
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
    """Counts and watches all open streams. Runs until cancelled (inside :func:`serve`)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self.open = 0
        self.reserved = 0
        self._per_key: Counter[str] = Counter()
        self._states: set[_StreamState] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the watchdog (blocked writes, server stop). Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watch)
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
                429,
                "too_many_streams",
                f"this key already has {max_per_key} open event streams (SSE_MAX_STREAMS_PER_KEY)",
                headers=retry,
                limit=max_per_key,
            )
        if self.reserved >= max_total:
            metrics.SSE_REFUSED.labels("total").inc()
            raise ApiError(
                503,
                "streams_exhausted",
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
        if self._nursery is None or self._closing.is_set():
            if slot is not None:
                slot.release()
            return
        # No pump task between the hub and the response: one task wake-up per delivery, not two
        # (with 1,000 streams every event wakes 1,000 tasks). ``Subscription.batch`` is
        # cancel-safe, so the heartbeat timeout around it loses nothing.
        state = _StreamState()
        self._states.add(state)
        self.open += 1
        try:
            async with state.stack:
                # In the stream's exit stack, so the watchdog can end it while a write is blocked.
                events = await state.stack.enter_async_context(hub.subscribe(**subscribe))
                if self._closing.is_set():
                    return
                yield encode_retry(retry_ms)
                next_beat = trio.current_time() + heartbeat
                while not state.cut:
                    batch: list[Any] | None = None
                    with trio.move_on_at(next_beat):
                        try:
                            batch = await events.batch(_BATCH_EVENTS)
                        except StopAsyncIteration:
                            break
                        except Exception:
                            # A failing replay (e.g. database down) ends this stream, never the
                            # server; the client reconnects with Last-Event-ID and resumes.
                            log.warning("event stream ended by an error", exc_info=True)
                            break
                    if state.cut:
                        break
                    # Yield outside the cancel scope: a generator must not suspend inside one.
                    if batch is None:
                        next_beat = trio.current_time() + heartbeat
                        frames = HEARTBEAT
                    else:
                        # Frames as the hub built them once for all subscribers (live), or from
                        # the stored JSON (replay). Everything waiting goes out in one write.
                        frames = b"".join([encode_event(e) for e in batch])
                    # The watchdog cuts a stream whose write has not returned in send_timeout
                    # (the client stopped reading).
                    state.writing_since = trio.current_time()
                    state.send_timeout = send_timeout
                    yield frames
                    state.writing_since = None
        finally:
            self.open -= 1
            self._states.discard(state)
            if slot is not None:
                slot.release()

    async def _watch(self) -> None:
        """Cut streams whose write is blocked past their send timeout, and end every stream's
        subscription when the server stops."""
        while True:
            with trio.move_on_after(_WATCH_INTERVAL):
                await self._closing.wait()
            now = trio.current_time()
            for state in list(self._states):
                if self._closing.is_set():
                    await state.cut_off()
                    continue
                since = state.writing_since
                if since is not None and not state.cut and now - since >= state.send_timeout:
                    metrics.SSE_STUCK.inc()
                    log.info("sse client stopped reading, stream cut after %.0fs", state.send_timeout)
                    await state.cut_off()
            if self._closing.is_set():
                await trio.sleep(_WATCH_INTERVAL)  # streams that open now end at once anyway


class _StreamState:
    """What the watchdog knows of one open stream."""

    __slots__ = ("cut", "send_timeout", "stack", "writing_since")

    def __init__(self) -> None:
        self.stack = AsyncExitStack()
        self.writing_since: float | None = None
        self.send_timeout = 30.0
        self.cut = False

    async def cut_off(self) -> None:
        """End the stream: its hub subscription ends now (it holds no more events), its loop
        ends when it next runs. Leaving the subscription has no await, so this runs at once."""
        self.cut = True
        await self.stack.aclose()
