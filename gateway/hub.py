"""Fan-out of stored events to SSE subscribers, with replay after ``Last-Event-ID``.

The ``events`` table is the truth. One tailer task keeps ``position`` (the highest id it has read) and,
when notified (this instance's processor committed events, or another instance's NOTIFY arrived) or
every ``poll_interval`` as a safety net, reads ``id > position`` in pages and hands each event to every
live subscriber's bounded channel. Event ids grow in commit order (the store guarantees it), so tailing
``id > position`` never misses an event from any instance.

A subscriber with a ``last_event_id`` is registered first (from then on it receives every event above
the tailer's position P at that moment) and then replays ``(last_event_id, P]`` from the store; live
events the replay already yielded are skipped by id. So there is no gap and no repeat.

Overflow policy: the tailer never waits for a subscriber. A subscriber whose bounded channel is full is
detached: it reads what was buffered, then catches up from the store (the same replay, re-registering
at the new position). One that stays behind longer than ``max_lag`` is dropped and counted: its
iteration ends, the HTTP side closes the stream, and the browser reconnects and replays with
``Last-Event-ID``. A burst larger than the buffer therefore costs a few store reads, not a reconnect.

Memory per subscriber is bounded: replay reads the store in pages of ``replay_limit`` events and reads
the next page only when the client has taken the previous one, so a client that stops reading holds at
most one page plus its live channel (``subscriber_buffer`` events shared with every other subscriber);
dropping a subscriber empties its channel at once, whether or not anyone still reads it.

The seam between the two sides: the hub keeps one private record per subscriber (``_Member``: its
filters, the send end of its live channel, whether it was detached or dropped), and a
:class:`~gateway.subscription.Subscription` sees the hub only through that record, typed as
:class:`~gateway.subscription.Feed` (join, read the
store, say it caught up). The subscription keeps its iteration state (cursor, replay page) to itself;
the hub reaches it only through the live channel it feeds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import StoreUnavailable
from gateway.sse import framed
from gateway.store.base import Event, Store
from gateway.subscription import Subscription
from gateway.wake import Nudge

log = logging.getLogger("gateway.hub")

_TAIL_PAGE = 1000


class _Member:
    """The hub's record of one subscriber, and the subscriber's only view of the hub (a :class:`Feed`).

    The hub calls :meth:`offer`, :meth:`detach`, :meth:`drop` and :meth:`close` (synchronously, so
    registration and fan-out never interleave); the subscription calls the :class:`Feed` methods.
    """

    __slots__ = ("_detached", "_dropped", "_hub", "_recv", "_send", "device_id", "types")

    def __init__(self, hub: Hub, types: frozenset[str] | None, device_id: str | None) -> None:
        self._hub = hub
        self.types = types
        self.device_id = device_id
        self._send: trio.MemorySendChannel[Event] | None = None
        self._recv: trio.MemoryReceiveChannel[Event] | None = None
        self._detached = False
        self._dropped = False

    # -- the Feed, for the subscription --

    @property
    def page_size(self) -> int:
        return self._hub.replay_limit

    @property
    def detached(self) -> bool:
        return self._detached and not self._dropped and not self._hub._stopped

    @property
    def dropped(self) -> bool:
        return self._dropped

    def join(self) -> tuple[int, trio.MemoryReceiveChannel[Event]]:
        self._send, self._recv = trio.open_memory_channel[Event](self._hub.subscriber_buffer)
        self._detached = False
        return self._hub._admit(self), self._recv

    def caught_up(self) -> None:
        self._hub._lagging.pop(self, None)

    def matches(self, event: Event) -> bool:
        if self.types is not None and event.type not in self.types:
            return False
        return self.device_id is None or event.device_id == self.device_id

    async def event_bounds(self) -> tuple[int, int]:
        return await self._hub._store.event_bounds()

    async def read_page(self, after_id: int) -> list[Event]:
        hub = self._hub
        return await hub._store.read_events(
            after_id=after_id, limit=hub.replay_limit, types=self.types, device_id=self.device_id
        )

    # -- for the hub --

    def offer(self, event: Event) -> bool:
        """Queue a live event; False when the channel is full (the hub then detaches it)."""
        assert self._send is not None
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return True  # already closed; the hub removes it
        return True

    def detach(self) -> None:
        """The channel is full: close it; the subscriber reads what it holds, then catches up."""
        self._detached = True
        self.close()

    def drop(self) -> bool:
        """End the subscriber and free what its channel holds; False when it was dropped already."""
        if self._dropped:
            return False
        self._dropped = True
        self.close()
        if self._recv is not None:
            self._recv.close()  # the buffered events go now, whether or not anyone still reads
        return True

    def close(self) -> None:
        """No more live events: the subscriber sees the end of its channel once it is read."""
        if self._send is not None:
            self._send.close()

    def describe(self) -> str:
        """The filters, for logs."""
        types = ",".join(sorted(self.types)) if self.types else "*"
        return f"device_id={self.device_id} types={types}"


class Hub:
    """Feeds SSE subscribers from the events table; see the module docstring for the design."""

    def __init__(
        self,
        store: Store,
        *,
        poll_interval: float = 1.0,
        subscriber_buffer: int = 1000,
        replay_limit: int = 100,
        max_lag: float = 30.0,
    ) -> None:
        """``replay_limit`` is the page size of replay reads (rows per query, and the most replayed
        events a subscriber holds at once), not a cap on replay.
        ``max_lag``: seconds a subscriber may stay behind (catching up from the store) before it is
        dropped."""
        self._store = store
        self.poll_interval = poll_interval
        self.subscriber_buffer = subscriber_buffer
        self.replay_limit = replay_limit
        self.max_lag = max_lag
        self._members: set[_Member] = set()  # live, attached subscribers
        self._lagging: dict[_Member, float] = {}  # subscriber → when it first fell behind
        self._position = 0
        self._nudge = Nudge()
        self._ready = trio.Event()
        self._stopped = False
        self.clients = 0
        self.dropped = 0
        self.delivered = 0

    @property
    def position(self) -> int:
        """The highest event id the tailer has read."""
        return self._position

    def notify(self) -> None:
        """Events were appended (by this instance or, via NOTIFY, another): tail them now."""
        self._nudge.set()

    def committed(self, events: list[Event]) -> None:
        """This instance committed ``events`` (in id order): fan them out without a store read
        when that is provably gap-free, else tail the table.

        Gap-free means the ids run on, one by one, from the tailer's position: since ids grow in
        commit order, no other event can sit between them. Anything else (another writer's events,
        a sequence gap on PostgreSQL) falls back to reading ``id > position`` from the store.
        """
        if not events:
            return
        expected = self._position + 1
        contiguous = self._ready.is_set() and not self._stopped
        for event in events:
            if event.id != expected:
                contiguous = False
                break
            expected += 1
        if contiguous:
            self._fan_out(events)
        else:
            self._nudge.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tail the events table and fan out. Reports started once it knows the newest id.

        Retries a failing store with backoff. Runs until cancelled; then every subscription ends.
        """
        backoff = Backoff(0.2, 10.0)
        self._stopped = False
        try:
            # Only the first start reads the newest id; a restart resumes tailing where it stopped.
            while not self._ready.is_set():
                try:
                    self._position = (await self._store.event_bounds())[1]
                    break
                except StoreUnavailable as exc:
                    log.warning("hub cannot read event bounds error=%r", str(exc))
                    await trio.sleep(backoff.next())
            backoff.reset()
            self._ready.set()
            task_status.started()
            while True:
                try:
                    await self._tail()
                    self._drop_laggards()
                    backoff.reset()
                except StoreUnavailable as exc:
                    log.warning("hub cannot read events error=%r", str(exc))
                    await trio.sleep(backoff.next())
                    continue
                await self._nudge.wait(self.poll_interval)
        finally:
            self._stopped = True
            for member in list(self._members):
                self._members.discard(member)
                member.close()

    async def _tail(self) -> None:
        while True:
            page = await self._store.read_events(after_id=self._position, limit=_TAIL_PAGE)
            if not page:
                return
            self._fan_out(page)
            if len(page) < _TAIL_PAGE:
                return

    def _fan_out(self, page: list[Event]) -> None:
        # Synchronous on purpose: no checkpoint between reading the position and sending, so a
        # subscriber registering concurrently sees either all of this page or none of it.
        if self._members:
            # Each event's SSE frame is built here once, not once per subscriber.
            page = [framed(e) for e in page]
        for member in list(self._members):
            for event in page:
                if event.id <= self._position or not member.matches(event):
                    continue
                if not member.offer(event):
                    # Full: detach it; it reads what it has, then catches up from the store.
                    member.detach()
                    self._members.discard(member)
                    self._lagging.setdefault(member, trio.current_time())
                    break
                self.delivered += 1
        self._position = max(self._position, page[-1].id)

    def _drop_laggards(self) -> None:
        deadline = trio.current_time() - self.max_lag
        for member, since in list(self._lagging.items()):
            if since < deadline:
                self._drop(member)

    def _admit(self, member: _Member) -> int:
        """Add ``member`` to the fan-out (or end it when stopped); returns the position."""
        if not self._stopped:
            self._members.add(member)
        else:
            member.close()
        return self._position

    def _leave(self, member: _Member) -> None:
        self._members.discard(member)
        self._lagging.pop(member, None)
        member.close()

    def _drop(self, member: _Member) -> None:
        self._members.discard(member)
        self._lagging.pop(member, None)
        if member.drop():
            self.dropped += 1
            metrics.SSE_DROPPED.inc()
            log.info("sse subscriber dropped for being too slow %s", member.describe())

    @asynccontextmanager
    async def subscribe(
        self, *, last_event_id: int | None, types: frozenset[str] | None, device_id: str | None
    ) -> AsyncIterator[Subscription]:
        """A subscription for the duration of the block (waits until the tailer is ready).

        ``last_event_id``: replay every event after it first (None: live only, from now).
        ``types`` / ``device_id``: filters applied to replay and live alike.
        """
        await self._ready.wait()
        member = _Member(self, types, device_id)
        sub = Subscription(member, last_event_id=last_event_id)
        self.clients += 1
        metrics.SSE_CLIENTS.inc()
        try:
            yield sub
        finally:
            self.clients -= 1
            metrics.SSE_CLIENTS.dec()
            self._leave(member)
