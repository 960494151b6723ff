"""One subscriber's stream of events, replay then live, and what it may ask of the hub (:class:`Feed`).

:class:`Subscription` keeps its own iteration state (cursor, replay page); the hub reaches it only
through the live channel it feeds, and the subscription reaches the hub only through its
:class:`Feed` (the hub's record of this subscriber), so this module imports nothing of the hub.
:mod:`gateway.hub` describes the design: the no-gap, no-repeat handover from replay to live, and
the overflow policy.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Protocol

import trio

from gateway.store.base import Event


class Feed(Protocol):
    """What a :class:`Subscription` may ask of its hub (the hub's record of that subscriber)."""

    @property
    def page_size(self) -> int:
        """Events per replay read (:meth:`read_page`)."""
        ...

    @property
    def detached(self) -> bool:
        """The live channel was closed because it filled up (and the subscriber was neither dropped
        nor is the hub stopping): catch up from the store, then :meth:`join` again."""
        ...

    @property
    def dropped(self) -> bool:
        """The hub dropped this subscriber for lagging too long: iteration ends."""
        ...

    def join(self) -> tuple[int, trio.MemoryReceiveChannel[Event]]:
        """Register for live events: every matching one above the returned position arrives on
        the returned channel (already closed when the hub has stopped). Synchronous, so no event
        can fall between the position and the channel."""
        ...

    def caught_up(self) -> None:
        """Replay reached the live stream: no longer lagging."""
        ...

    def matches(self, event: Event) -> bool:
        """Whether ``event`` passes the subscriber's filters."""
        ...

    async def event_bounds(self) -> tuple[int, int]:
        """The oldest and newest stored event ids (0 when there are none)."""
        ...

    async def read_page(self, after_id: int) -> list[Event]:
        """Up to :attr:`page_size` stored events above ``after_id`` that pass the filters, in id order."""
        ...


class Subscription:
    """One subscriber's stream of events: replay (if asked), then live. Async-iterable.

    Iteration yields :class:`~gateway.store.base.Event` in id order, first a ``reset`` event when the
    requested id is older than the oldest kept event (or unknown); it ends when the subscriber was
    dropped for being too slow, when the hub stops, or when :meth:`close` is called. After a
    ``reset`` (its id is the current position) the stream goes on live: the client should reload
    its state (e.g. ``GET /messages``). Cancelling a step (a heartbeat timeout around
    ``__anext__``) loses nothing.

    Registers with the hub when constructed (``feed.join()``): live events from then on are its own.
    """

    def __init__(self, feed: Feed, *, last_event_id: int | None) -> None:
        self._feed = feed
        self._position, self._recv = feed.join()
        self._pending: deque[Event] = deque()
        self._cursor = self._position  # id of the last event yielded (live events at or below it are repeats)
        self._last_event_id = last_event_id
        self._replay_after = 0  # replay reads ids above this
        self._target = 0  # replay until reaching this id (the tailer position at registration)
        self._replaying = False
        self._started = False
        self._closed = False

    def matches(self, event: Event) -> bool:
        """Whether ``event`` passes this subscriber's filters."""
        return self._feed.matches(event)

    def close(self) -> None:
        """End iteration now (the server is stopping): a step waiting for events ends, and so
        does every later one. Idempotent."""
        self._closed = True
        self._recv.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return (await self.batch(1))[0]

    async def batch(self, limit: int = 1 << 30) -> list[Event]:
        """The next events, at least one and at most ``limit``: waits for the first, then takes
        every one already waiting (the rest of a replay page, or what the live channel holds),
        so a consumer handles a burst in one step. Raises StopAsyncIteration as iteration ends.

        Cancel-safe like ``__anext__``: once an event is taken nothing awaits, so a cancelled
        step has taken nothing.
        """
        if not self._started:
            await self._start()
        out: list[Event] = []
        while True:
            if self._closed:
                raise StopAsyncIteration
            pending = self._pending
            while pending and len(out) < limit:
                event = pending.popleft()
                if event.id > self._cursor or event.type == "reset":
                    self._cursor = max(self._cursor, event.id)
                    out.append(event)
            if out:
                if not pending and not self._replaying:
                    self._take_live(out, limit)
                return out
            if self._feed.dropped:
                raise StopAsyncIteration
            if self._replaying:
                await self._replay_page()
                continue
            try:
                event = await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self._feed.detached and not self._closed:
                    # Fell behind while live: what was buffered is delivered; catch up from the
                    # store from here (the hub drops us if that takes too long).
                    self._replaying = True
                    self._replay_after = self._target = self._cursor
                    continue
                raise StopAsyncIteration from None
            if event.id > self._cursor:
                self._cursor = event.id
                out.append(event)
                self._take_live(out, limit)
                return out

    def _take_live(self, out: list[Event], limit: int) -> None:
        """Append the live events already waiting (no wait; the end of the channel is left for
        the next step to see)."""
        recv = self._recv
        while len(out) < limit:
            try:
                event = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if event.id > self._cursor:
                self._cursor = event.id
                out.append(event)

    async def _start(self) -> None:
        """On first iteration: decide between replay, reset and live only.

        Cancel-safe (a heartbeat timeout around ``__anext__`` may cancel it): nothing changes
        before the only await, so a cancelled start simply runs again.
        """
        position = self._position
        if self._last_event_id is None:
            self._started = True
            return
        requested = self._last_event_id
        oldest, newest = await self._feed.event_bounds()
        self._started = True
        known = max(position, newest)
        pruned = oldest - 1 if oldest > 0 else known  # every id up to here is gone
        if requested > known or requested < pruned:
            reason = "unknown" if requested > known else "expired"
            self._pending.append(
                Event(
                    id=position,
                    type="reset",
                    data={"reason": reason, "last_event_id": requested, "oldest_id": oldest},
                    created_at=datetime.now(UTC),
                )
            )
            return
        self._cursor = requested
        self._replay_after = requested
        self._target = position
        self._replaying = requested < position

    async def _replay_page(self) -> None:
        feed = self._feed
        if self._replay_after >= self._target:
            if not feed.detached:
                self._replaying = False
                feed.caught_up()
                return
            # Live events came faster than we read: register again (a fresh channel gets every
            # event above the new position) and read the store up to that position.
            self._target, self._recv = feed.join()
            return
        page = await feed.read_page(self._replay_after)
        if len(page) < feed.page_size:
            # Short page: everything committed up to now is read, which includes the target.
            self._replay_after = max(self._target, page[-1].id if page else 0)
        else:
            self._replay_after = page[-1].id
        self._pending.extend(page)
