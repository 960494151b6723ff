"""The processor: claim stored messages, evaluate the rules, run the actions, mark them done.

Each run claims up to ``PROCESSOR_BATCH_SIZE`` unprocessed messages with a lease (so processors in this
or another instance never work on the same message at once; a crashed instance's lease expires and
the message is claimed again), runs script actions (outside any transaction), then in ONE store
transaction marks the messages processed or failed, appends their SSE events and writes their MQTT
publishes to the outbox (rendered with the ids of those events). The outbox publisher
(:mod:`gateway.publish`) sends them; the processor never waits for the broker, so a slow or absent
broker cannot hold up SSE or scripts. It runs while claims come back full, then sleeps until nudged
(ingest committed, or another instance's NOTIFY) or ``PROCESSOR_INTERVAL`` passes.

Failures of one message (a script's non-zero exit or timeout, a broken template) are logged with
context, counted, and recorded on the message: retried after an exponential backoff with jitter, and
dead-lettered (kept, marked dead) after ``PROCESSOR_MAX_ATTEMPTS``. They never stop the loop. A database
outage marks the component degraded and is retried with backoff.

Delivery guarantees: SSE events are exactly-once (appended in the transaction that marks the message).
Scripts run at least once per message (again after a crash before commit, or after a failure of another
script of the same message); they get a stable key to deduplicate. MQTT publishes are at least once:
committed with the message, sent until the broker confirms them (again after a crash or restart), and
carrying the event id so receivers can deduplicate.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from gateway import metrics
from gateway.actions import ActionFailed, MqttAction, ScriptAction, SseAction
from gateway.backoff import Backoff
from gateway.errors import GatewayError, StoreCorrupt, StoreUnavailable
from gateway.health import ComponentHealth
from gateway.jsonenc import dumps
from gateway.retention import DEFAULT_POLICY, RetentionPolicy, prune_expired
from gateway.rules import PlannedAction, RuleSet, load_rules
from gateway.settings import ProcessorSettings
from gateway.store.base import (
    CompletionPublishes,
    Event,
    EventsByMessage,
    Failure,
    NewEvent,
    NewPublish,
    Store,
    StoredMessage,
)
from gateway.wake import Nudge

log = logging.getLogger("gateway.processor")

_STATS_EVERY = 5.0  # seconds between backlog queries (health detail, gauges)
_PRUNE_EVERY = 300.0  # seconds between retention runs (events, rejects, messages)
_SCRIPTS_AT_ONCE = 4  # messages whose scripts run concurrently
_PLAN_SLICE = 100  # messages planned between two yields to the other tasks (~1 ms of work)


class _Work:
    """One claimed message on its way through a run."""

    __slots__ = ("_bytes", "_json", "error", "events", "message", "planned")

    def __init__(
        self, message: StoredMessage, planned: Sequence[PlannedAction], error: ActionFailed | None = None
    ) -> None:
        self.message = message
        self.planned = planned
        self.events: list[tuple[PlannedAction, NewEvent]] = []
        self.error = error
        self._json: dict[str, Any] | None = None
        self._bytes: bytes | None = None

    def as_json(self) -> dict[str, Any]:
        """``message.to_json()``, computed once for all its actions."""
        if self._json is None:
            self._json = self.message.to_json()
        return self._json

    def as_bytes(self) -> bytes:
        """:meth:`as_json` encoded once: the event row, its SSE frame and the MQTT payload share it."""
        if self._bytes is None:
            self._bytes = dumps(self.as_json())
        return self._bytes


class Processor:
    """Turns stored messages into events, publishes and script runs; see the module docstring."""

    def __init__(
        self,
        settings: ProcessorSettings,
        store: Store,
        nudge: Nudge,
        health: ComponentHealth,
        *,
        instance_id: str,
        rules: RuleSet | None = None,
        on_committed: Callable[[list[Event]], None] | None = None,
        retention: RetentionPolicy = DEFAULT_POLICY,
        on_outbox: Callable[[], None] | None = None,
        stats_every: float = _STATS_EVERY,
        prune_every: float = _PRUNE_EVERY,
    ) -> None:
        """``rules`` None loads ``settings.rules_file`` (default rules when unset; may raise RuleError).

        ``on_committed`` receives the events a commit appended, in id order (the hub fans them
        out without a store read);
        ``on_outbox`` is called after a commit that wrote outbox rows (wakes the publisher).
        """
        self._settings = settings
        self._store = store
        self._on_outbox = on_outbox
        self._nudge = nudge
        self._health = health
        self._rules = rules if rules is not None else load_rules(settings.rules_file)
        self._on_committed = on_committed
        self._interval = settings.interval
        self._retention = retention
        self._stats_every = stats_every
        self._prune_every = prune_every
        # Unique per processor object: two processors of one instance must not share leases.
        self.owner = f"{instance_id}/{secrets.token_hex(4)}"
        self._limiter = trio.CapacityLimiter(_SCRIPTS_AT_ONCE)
        self._next_stats = -float("inf")
        self._next_prune = -float("inf")
        self._batch_limit = self._limit_for(self._rules)
        self.processed = 0
        self.failed = 0
        self.dead = 0
        self.runs = 0

    @property
    def rules(self) -> RuleSet:
        """The rules in force."""
        return self._rules

    def reconfigure(self, settings: ProcessorSettings, rules: RuleSet | None = None) -> None:
        """Use ``settings`` (and ``rules``, when given) from the next batch on; a batch in flight
        keeps the old ones. A new interval takes effect at once."""
        self._settings = settings
        if rules is not None:
            self._rules = rules
        self._batch_limit = self._limit_for(self._rules)
        self._interval = settings.interval
        self._nudge.set()
        log.info("processor reconfigured rules=%d batch_limit=%d", len(self._rules), self._batch_limit)

    def _limit_for(self, rules: RuleSet) -> int:
        """Messages to claim per batch: fewer when scripts could otherwise outlast the lease.

        A lease that expires mid-batch lets another processor claim the same messages; so the
        worst case (every script of every message timing out, ``_SCRIPTS_AT_ONCE`` at a time)
        must fit in 80% of the lease.
        """
        s = self._settings
        worst = sum(
            a.timeout if a.timeout is not None else s.script_timeout
            for r in rules.rules
            for a in r.actions
            if isinstance(a, ScriptAction)
        )
        if not worst:
            return s.batch_size
        budget = 0.8 * s.lease_seconds
        if worst > budget:
            log.warning(
                "script timeouts (%.1fs per message) exceed 80%% of the lease (%.1fs): raise PROCESSOR_LEASE",
                worst,
                s.lease_seconds,
            )
        rounds = max(1, int(budget // worst))
        return max(1, min(s.batch_size, rounds * _SCRIPTS_AT_ONCE))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Process until cancelled: at every nudge and every interval, drain the backlog.

        Reports started at once (the first drain follows). Runs until cancelled.
        """
        outage = Backoff(self._settings.retry_min, min(30.0, self._settings.retry_max))
        task_status.started()
        last_drain = -math.inf
        while True:
            try:
                last_drain = trio.current_time()
                await self._drain()
                await self._housekeeping()
            except StoreUnavailable as exc:
                delay = outage.next()
                self._health.set("degraded", f"database: {exc}")
                log.warning("processor store unavailable error=%r retry_in=%.2fs", str(exc), delay)
                await trio.sleep(delay)
                continue
            outage.reset()
            if self._health.state != "ok":
                self._health.set("ok")
            if await self._nudge.wait(self._interval):
                # Under a steady trickle every ingest commit nudges us; runs at most every
                # coalesce_ms turn many tiny claim/complete transactions into a few larger ones
                # (a few ms of latency for several times the throughput).
                gap = self._settings.coalesce_ms / 1000.0 - (trio.current_time() - last_drain)
                if gap > 0:
                    await trio.sleep(gap)

    async def _drain(self) -> None:
        """Claim and process batches until a claim comes back short."""
        batch_size = self._batch_limit
        while True:
            started = trio.current_time()
            batch = await self._store.claim(self.owner, batch_size, self._settings.lease_seconds)
            if not batch:
                return
            await self._process(batch)
            self.runs += 1
            metrics.PROCESSOR_RUN.observe(trio.current_time() - started)
            if len(batch) < batch_size:
                return

    async def _process(self, batch: list[StoredMessage]) -> None:
        rules = self._rules
        work = await self._plan_all(rules, batch)
        scripted = [w for w in work if w.error is None and any(isinstance(p.action, ScriptAction) for p in w.planned)]
        if scripted:
            async with trio.open_nursery() as nursery:
                for w in scripted:
                    nursery.start_soon(self._run_scripts, w)
        processed: list[int] = []
        failures: list[Failure] = []
        new_events: list[NewEvent] = []
        done: list[_Work] = []
        now = datetime.now(UTC)
        for w in work:
            if w.error is None:
                processed.append(w.message.id)
                new_events.extend(e for _, e in w.events)
                done.append(w)
            else:
                failures.append(self._failure(w, now))
        publishes = self._publishes(done)
        stored = await self._store.complete(self.owner, processed, failures, new_events, publishes)
        if len(stored) < len(work):
            log.warning("lease lost for some messages claimed=%d still_ours=%d", len(work), len(stored))
        metrics.PROCESSOR_PROCESSED.inc(len(processed))
        self.processed += len(processed)
        # Keyed in the order given (claim order), so this is id order: events were appended in turn.
        appended = [ev for mine in stored.values() for ev in mine]
        for kind, count in Counter(ev.type for ev in appended).items():
            metrics.EVENTS_APPENDED.labels(kind).inc(count)
        if appended and self._on_committed is not None:
            self._on_committed(appended)
        if publishes is not None and self._on_outbox is not None:
            self._on_outbox()

    async def _plan_all(self, rules: RuleSet, batch: list[StoredMessage]) -> list[_Work]:
        """Plan every message of the batch, yielding to other tasks every ``_PLAN_SLICE``
        messages so a large batch never holds the loop for long (latency of SSE and ingest)."""
        fixed = rules.fixed
        work: list[_Work] = []
        for start in range(0, len(batch), _PLAN_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            for message in batch[start : start + _PLAN_SLICE]:
                work.append(self._plan(rules, fixed, message))
        return work

    def _plan(self, rules: RuleSet, fixed: Sequence[PlannedAction] | None, message: StoredMessage) -> _Work:
        """Evaluate the rules (``fixed``: the plan when no condition decides) and build the
        events (pure); a failure is recorded on the work item."""
        if fixed is not None:
            planned: Sequence[PlannedAction] = fixed
        else:
            try:
                planned = rules.evaluate(message)
            except Exception as exc:  # a bug in a predicate must not stop the loop
                return _Work(message, (), ActionFailed("rules", f"{type(exc).__name__}: {exc}"))
        w = _Work(message, planned)
        for p in planned:
            action = p.action
            if isinstance(action, SseAction):
                try:
                    if action.whole_message:
                        event = action.build(message, w.as_json(), w.as_bytes())
                    else:  # a selection reads the message's fields; a renaming starts from its JSON
                        event = action.build(message, w.as_json() if action.fields is None else None)
                except Exception as exc:
                    w.error = ActionFailed("sse", f"rule {p.rule}: {type(exc).__name__}: {exc}")
                    break
                w.events.append((p, event))
        return w

    async def _run_scripts(self, w: _Work) -> None:
        async with self._limiter:
            for p in w.planned:
                if not isinstance(p.action, ScriptAction):
                    continue
                try:
                    await p.action.run(
                        w.message,
                        rule=p.rule,
                        key=f"{w.message.id}:{p.key}",
                        default_timeout=self._settings.script_timeout,
                    )
                except ActionFailed as exc:
                    w.error = ActionFailed(exc.action, f"rule {p.rule}: {exc.problem}")
                    return

    def _failure(self, w: _Work, now: datetime) -> Failure:
        """Record a failed attempt: retry after a backoff for this attempt number, or dead-letter."""
        assert w.error is not None
        m = w.message
        attempt = m.attempts + 1
        action = w.error.action
        error = str(w.error)
        metrics.PROCESSOR_FAILED.labels(action).inc()
        self.failed += 1
        if attempt >= self._settings.max_attempts:
            metrics.PROCESSOR_DEAD.inc()
            self.dead += 1
            log.error(
                "message dead-lettered message_id=%d device_id=%s action=%s attempts=%d error=%r",
                m.id,
                m.device_id,
                action,
                attempt,
                error,
            )
            return Failure(m.id, error, None)
        low = self._settings.retry_min
        delay = Backoff(low, max(low, self._settings.retry_max)).delay(attempt - 1)  # attempt is 1-based
        log.warning(
            "processing failed message_id=%d device_id=%s action=%s attempt=%d/%d error=%r retry_in=%.2fs",
            m.id,
            m.device_id,
            action,
            attempt,
            self._settings.max_attempts,
            error,
            delay,
        )
        return Failure(m.id, error, now + timedelta(seconds=delay))

    def _publishes(self, done: list[_Work]) -> CompletionPublishes | None:
        """The outbox rows of a batch, built inside the commit from the events it appended (so
        each payload carries its event id); None when no rule publishes."""
        if not any(isinstance(p.action, MqttAction) for w in done for p in w.planned):
            return None

        def build(stored: EventsByMessage) -> list[NewPublish]:
            out: list[NewPublish] = []
            for w in done:
                mine = stored.get(w.message.id)
                if mine is None:
                    continue  # lease lost: another processor has the message now
                ids = _event_ids(w, mine)
                for p in w.planned:
                    action = p.action
                    if not isinstance(action, MqttAction):
                        continue
                    event_id = ids.get(p.rule, ids.get(None))
                    try:
                        if action.payload is None:
                            payload = action.render(
                                w.message, rule=p.rule, event_id=event_id, as_json=w.as_json(), as_bytes=w.as_bytes()
                            )
                        else:
                            payload = action.render(w.message, rule=p.rule, event_id=event_id, as_json=w.as_json())
                    except (GatewayError, ValueError, TypeError) as exc:
                        # One bad payload must not fail the batch's commit: count and log it.
                        metrics.PROCESSOR_FAILED.labels("mqtt").inc()
                        log.warning(
                            "publish not rendered message_id=%d device_id=%s action=mqtt rule=%s error=%r",
                            w.message.id,
                            w.message.device_id,
                            p.rule,
                            str(exc),
                        )
                        continue
                    out.append(NewPublish(payload, action.subtopic, w.message.id, event_id))
            return out

        return build

    async def _housekeeping(self) -> None:
        """Every few seconds: backlog gauges and health detail; every few minutes: retention."""
        now = trio.current_time()
        if now >= self._next_stats:
            self._next_stats = now + self._stats_every
            backlog = await self._store.backlog()
            lag = (datetime.now(UTC) - backlog.oldest).total_seconds() if backlog.oldest else 0.0
            metrics.PROCESSOR_BACKLOG.set(backlog.count)
            metrics.PROCESSOR_LAG.set(max(0.0, lag))
            self._health.detail.update(
                backlog=backlog.count,
                lag_seconds=round(max(0.0, lag), 3),
                dead=backlog.dead,
                processed=self.processed,
                failed=self.failed,
                rules=len(self._rules),
            )
        if now >= self._next_prune:
            self._next_prune = now + self._prune_every
            await prune_expired(self._store, self._retention, datetime.now(UTC))


def _event_ids(w: _Work, stored: list[Event]) -> dict[str | None, int]:
    """{rule: the id of its first event, None: the id of the message's first event}.

    ``stored`` is what the store appended for ``w.message``: all of its planned events, in order.
    """
    if len(stored) != len(w.events):
        raise StoreCorrupt(f"message {w.message.id}: {len(w.events)} events planned, {len(stored)} stored")
    ids: dict[str | None, int] = {None: stored[0].id} if stored else {}
    for (p, _), ev in zip(w.events, stored, strict=True):
        ids.setdefault(p.rule, ev.id)
    return ids
