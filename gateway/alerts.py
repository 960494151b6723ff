"""Built-in alerts for sites without Prometheus: the same conditions as ``ops/prometheus/alerts.yml``.

Every few seconds :class:`Alerts` looks at component health, the processing backlog, free disk space
and the error counters. Each condition goes through an :class:`AlertState`, a small hysteresis
state machine: an alert fires once, after its condition has held for ``for_seconds``, and resolves
once, after it has been clear for ``clear_seconds``, so a flapping link does not flood anyone.

Free disk space also drives the ``disk`` component's health at every round (``degraded`` below
``DISK_MIN_FREE``, so /ping shows it before the alert's hold time and long before a write fails).

A transition is announced four ways: a CRITICAL log line on ``gateway.alerts`` (WARNING for a
resolution), the ``gateway_alert_active{alert}`` gauge, an ``alert`` event in the events table (SSE
replays it) and a QoS 1 publish on ``MQTT_PUBLISH_TOPIC/alerts``, written to the outbox with the event
(so it is sent at least once). While the database is down (itself an alert) the event is kept and
appended when it is back, and the publish goes out at once from memory, best effort.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import trio

from gateway import metrics
from gateway.errors import GatewayError
from gateway.health import Health
from gateway.publish import Publisher
from gateway.settings import DatabaseSettings, LogSettings
from gateway.store.base import Backlog, Event, NewEvent, NewPublish, Store

log = logging.getLogger("gateway.alerts")

Transition = Literal["fire", "resolve"]
OnAlert = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass
class AlertState:
    """Hysteresis for one alert. Pure: feed it the condition and the time, it says what changed.

    ``since`` is when the current streak began: of the condition holding while not firing, or of
    it being clear while firing; None when there is no streak.
    """

    for_seconds: float
    clear_seconds: float
    firing: bool = False
    since: float | None = None

    def update(self, condition: bool, now: float) -> Transition | None:
        """Record one observation; returns ``"fire"`` or ``"resolve"`` on a transition, else None."""
        if condition != self.firing:
            if self.since is None:
                self.since = now
            needed = self.clear_seconds if self.firing else self.for_seconds
            if now - self.since >= needed:
                self.firing = condition
                self.since = None
                return "fire" if condition else "resolve"
        else:
            self.since = None
        return None


@dataclass(frozen=True)
class AlertThresholds:
    """When each built-in alert fires. Durations in seconds; ratios as fractions."""

    interval: float = 5.0
    check_timeout: float = 10.0
    mqtt_for: float = 120.0
    database_for: float = 60.0
    backlog_max_age: float = 300.0
    backlog_age_for: float = 60.0
    backlog_growth: int = 1000
    backlog_window: float = 600.0
    disk_min_free: float = 0.10
    disk_for: float = 60.0
    error_ratio: float = 0.10
    error_min_count: int = 10
    error_window: float = 300.0
    error_for: float = 60.0
    clear_seconds: float = 60.0


@dataclass(frozen=True)
class _Spec:
    summary: str
    severity: Literal["critical", "warning"]
    for_seconds: float
    prometheus: str  # the matching rule in ops/prometheus/alerts.yml


def _specs(t: AlertThresholds) -> dict[str, _Spec]:
    return {
        "mqtt_disconnected": _Spec(
            "not connected to the MQTT broker", "critical", t.mqtt_for, "GatewayMqttDisconnected"
        ),
        "database_unavailable": _Spec(
            "the database does not answer", "critical", t.database_for, "GatewayDatabaseUnavailable"
        ),
        "backlog_too_old": _Spec(
            "the oldest unprocessed message is too old", "critical", t.backlog_age_for, "GatewayBacklogTooOld"
        ),
        "backlog_growing": _Spec(
            "the processing backlog keeps growing", "warning", t.backlog_window / 2, "GatewayBacklogGrowing"
        ),
        "disk_almost_full": _Spec(
            "little free disk space where the database or logs live", "critical", t.disk_for, "GatewayDiskAlmostFull"
        ),
        "processing_errors": _Spec(
            "high processing error rate", "warning", t.error_for, "GatewayHighProcessingErrorRate"
        ),
        "http_errors": _Spec("high rate of HTTP 5xx responses", "warning", t.error_for, "GatewayHighHttpErrorRate"),
        "spool_active": _Spec(
            "messages are kept in the disk spool for PostgreSQL", "warning", 0.0, "GatewaySpoolActive"
        ),
        "spool_full": _Spec(
            "the disk spool is full: ingest stops acking, the broker holds messages",
            "critical",
            0.0,
            "GatewaySpoolFull",
        ),
    }


@dataclass
class _Window:
    """Counter samples over a sliding window; ``delta`` is the growth across it."""

    seconds: float
    samples: deque[tuple[float, tuple[float, ...]]] = field(default_factory=deque)

    def add(self, now: float, values: tuple[float, ...]) -> tuple[tuple[float, ...], float]:
        """Add a sample; returns (growth of each value since the window start, the span covered)."""
        self.samples.append((now, values))
        # Keep one sample at or beyond the window's start as the baseline.
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.seconds:
            self.samples.popleft()
        start, base = self.samples[0]
        return tuple(v - b for v, b in zip(values, base, strict=True)), now - start


def disk_free_ratios(paths: Iterable[Path]) -> dict[str, float]:
    """Free fraction of the filesystem holding each path (its nearest existing ancestor); also
    updates ``gateway_disk_free_ratio{path}``. Paths that cannot be examined are left out."""
    out: dict[str, float] = {}
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
        except OSError:
            continue
        ratio = usage.free / usage.total if usage.total else 1.0
        out[str(path)] = ratio
        metrics.DISK_FREE_RATIO.labels(str(path)).set(ratio)
    return out


def disk_paths_for(database: DatabaseSettings, log: LogSettings) -> list[Path]:
    """Where the gateway writes: the SQLite file (PostgreSQL's disk is the database host's concern)
    and the log file; the working directory when neither is configured."""
    paths: list[Path] = []
    if database.kind == "sqlite":
        paths.append(database.sqlite_path.absolute())
    if log.file is not None:
        paths.append(log.file.absolute())
    return paths or [Path.cwd()]


def _counter_sum(counter: Any, where: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and where(sample.labels):
                total += sample.value
    return total


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


class Alerts:
    """Evaluates the built-in alert conditions and announces transitions.

    ``disk_paths`` are where the database and the logs live. ``on_alert(name, data)`` is awaited
    after each transition (e.g. to wake the SSE hub at once). ``clock`` gives wall time, used to age
    the backlog; hysteresis runs on Trio's clock.
    """

    def __init__(
        self,
        health: Health,
        store: Store,
        publisher: Publisher,
        *,
        on_alert: OnAlert | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        disk_paths: Sequence[Path] = (),
        thresholds: AlertThresholds = AlertThresholds(),
    ) -> None:
        self._health = health
        self._store = store
        self._publisher = publisher
        self._on_alert = on_alert
        self._clock = clock
        self._disk_paths = tuple(disk_paths)
        self._t = thresholds
        self._specs = _specs(thresholds)
        self._states = {
            name: AlertState(spec.for_seconds, thresholds.clear_seconds) for name, spec in self._specs.items()
        }
        self._detail: dict[str, dict[str, Any]] = {name: {} for name in self._specs}
        self._fired_at: dict[str, datetime] = {}
        self._backlog = _Window(thresholds.backlog_window)
        self._processing = _Window(thresholds.error_window)
        self._http = _Window(thresholds.error_window)
        # Events not yet stored because the database was down; appended, in order, when it is back.
        self._unsent: deque[NewEvent] = deque(maxlen=1000)
        for name in self._specs:
            metrics.ALERTS_ACTIVE.labels(name).set(0)

    @property
    def active(self) -> dict[str, dict[str, Any]]:
        """Firing alerts by name, with their detail."""
        return {name: dict(self._detail[name]) for name, s in self._states.items() if s.firing}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Evaluate every ``interval`` seconds and announce transitions. Runs until cancelled."""
        task_status.started()
        while True:
            await self.check()
            await trio.sleep(self._t.interval)

    async def check(self) -> list[tuple[str, Transition]]:
        """One evaluation round; returns the transitions it announced."""
        now = trio.current_time()
        conditions = await self._conditions(now)
        changed: list[tuple[str, Transition]] = []
        for name, condition in conditions.items():
            if condition is None:  # unknown this round (e.g. no database): keep the state as is
                continue
            transition = self._states[name].update(condition, now)
            if transition is not None:
                changed.append((name, transition))
        await self._flush_unsent()
        for name, transition in changed:
            await self._announce(name, transition)
        return changed

    async def _conditions(self, now: float) -> dict[str, bool | None]:
        """Each alert's condition this round (None: unknown), and its detail in ``self._detail``."""
        components = self._health.as_dict()
        out: dict[str, bool | None] = {}
        mqtt = components.get("mqtt", {}).get("state")
        out["mqtt_disconnected"] = None if mqtt is None else mqtt != "ok"
        self._detail["mqtt_disconnected"] = {"state": mqtt}
        db_state = components.get("database", {}).get("state") or self._store.health.state
        out |= await self._database_conditions(now, db_state)
        spool = components.get("spool", {})  # present only with the spool configured
        mode = spool.get("mode")
        out["spool_active"] = None if mode is None else mode != "empty"
        out["spool_full"] = None if mode is None else mode == "full"
        shown = {k: spool[k] for k in ("mode", "rows", "bytes", "oldest") if k in spool}
        self._detail["spool_active"] = self._detail["spool_full"] = shown
        out["disk_almost_full"] = self._disk_condition()
        failed = _counter_sum(metrics.PROCESSOR_FAILED)
        processed = _counter_sum(metrics.PROCESSOR_PROCESSED)
        (d_failed, d_processed), _ = self._processing.add(now, (failed, processed))
        out["processing_errors"] = self._error_condition("processing_errors", d_failed, d_failed + d_processed)
        errors = _counter_sum(metrics.HTTP_REQUESTS, lambda labels: labels.get("status", "").startswith("5"))
        requests = _counter_sum(metrics.HTTP_REQUESTS)
        (d_errors, d_requests), _ = self._http.add(now, (errors, requests))
        out["http_errors"] = self._error_condition("http_errors", d_errors, d_requests)
        return out

    async def _database_conditions(self, now: float, db_state: str | None) -> dict[str, bool | None]:
        """``database_unavailable``, and the backlog's two alerts (unknown without the database)."""
        t = self._t
        backlog: Backlog | None = None
        error: str | None = None
        with trio.move_on_after(t.check_timeout):
            try:
                backlog = await self._store.backlog()
            # Broad on purpose: the watcher must outlive any database failure it is there to report
            # (trio.Cancelled is a BaseException and passes through).
            except Exception as exc:
                error = str(exc) if isinstance(exc, GatewayError) else type(exc).__name__
        self._detail["database_unavailable"] = {"state": db_state, **({"error": error} if error else {})}
        if backlog is None:
            return {"database_unavailable": True, "backlog_too_old": None, "backlog_growing": None}
        age = (self._clock() - backlog.oldest).total_seconds() if backlog.oldest else 0.0
        self._detail["backlog_too_old"] = {"age_seconds": round(age, 1), "max_age_seconds": t.backlog_max_age}
        (growth,), span = self._backlog.add(now, (float(backlog.count),))
        self._detail["backlog_growing"] = {
            "backlog": backlog.count,
            "growth": int(growth),
            "window_seconds": round(span, 1),
        }
        return {
            "database_unavailable": db_state != "ok",
            "backlog_too_old": age > t.backlog_max_age,
            "backlog_growing": span >= t.backlog_window and growth >= t.backlog_growth,
        }

    def _disk_condition(self) -> bool | None:
        """``disk_almost_full`` (None without disk paths); also keeps the ``disk`` component's health."""
        t = self._t
        # statvfs of a local filesystem takes microseconds: called inline rather than in a thread,
        # which would also let an autojump clock skip ahead in tests.
        ratios = disk_free_ratios(self._disk_paths)
        low = {path: round(r, 4) for path, r in ratios.items() if r < t.disk_min_free}
        self._detail["disk_almost_full"] = {
            "free_ratio": {p: round(r, 4) for p, r in ratios.items()},
            "min_free_ratio": t.disk_min_free,
        }
        if not ratios:
            return None
        # At once, not after disk_for: /ping says "degraded" while there is still room to act.
        disk = self._health.component("disk")
        disk.detail["free_ratio"] = self._detail["disk_almost_full"]["free_ratio"]
        if low:
            disk.set("degraded", f"free space below DISK_MIN_FREE ({t.disk_min_free:g}): {low}")
        else:
            disk.set("ok")
        return bool(low)

    def _error_condition(self, name: str, errors: float, total: float) -> bool:
        ratio = errors / total if total else 0.0
        self._detail[name] = {
            "errors": int(errors),
            "total": int(total),
            "ratio": round(ratio, 4),
            "window_seconds": self._t.error_window,
        }
        return errors >= self._t.error_min_count and ratio >= self._t.error_ratio

    async def _announce(self, name: str, transition: Transition) -> None:
        spec = self._specs[name]
        at = self._clock()
        firing = transition == "fire"
        if firing:
            self._fired_at[name] = at
        data: dict[str, Any] = {
            "alert": name,
            "state": "firing" if firing else "resolved",
            "severity": spec.severity,
            "summary": spec.summary,
            "detail": self._detail[name],
            "fired_at": _iso(self._fired_at.get(name, at)),
            "at": _iso(at),
        }
        if firing:
            log.critical("ALERT %s firing: %s %s", name, spec.summary, json.dumps(self._detail[name]))
        else:
            log.warning("ALERT %s resolved: %s %s", name, spec.summary, json.dumps(self._detail[name]))
        metrics.ALERTS_ACTIVE.labels(name).set(1 if firing else 0)

        new = NewEvent(type="alert", data=data)
        if not await self._append([new]):
            # Not stored (the database is down), so not in the outbox either: publish from memory.
            payload = {"id": None, "type": "alert", "data": data}
            try:
                self._publisher.publish_nowait(json.dumps(payload).encode(), subtopic="alerts")
            except GatewayError as exc:
                log.warning("alert %s not published over MQTT: %s", name, exc)
        if self._on_alert is not None:
            try:
                await self._on_alert(name, data)
            except Exception:  # trio.Cancelled is a BaseException and passes through
                log.exception("on_alert callback failed for %s", name)

    async def _append(self, events: list[NewEvent]) -> list[Event]:
        if self._unsent:  # keep the order: older announcements first
            self._unsent.extend(events)
            return []
        try:
            with trio.fail_after(self._t.check_timeout):
                return await self._store.append_events(events, _alert_publishes)
        except Exception as exc:  # includes TooSlowError; same reason as in _conditions
            log.warning("alert event kept until the database is back: %s", exc)
            self._unsent.extend(events)
            return []

    async def _flush_unsent(self) -> None:
        if not self._unsent:
            return
        batch = list(self._unsent)
        try:
            with trio.fail_after(self._t.check_timeout):
                await self._store.append_events(batch)
        except Exception:
            return
        for _ in batch:
            self._unsent.popleft()


def _alert_publishes(stored: list[Event]) -> list[NewPublish]:
    """The outbox rows of stored alert events: ``{"id", "type", "data"}`` on ``<topic>/alerts``."""
    return [
        NewPublish(json.dumps({"id": e.id, "type": e.type, "data": e.data}).encode(), "alerts", None, e.id)
        for e in stored
    ]
