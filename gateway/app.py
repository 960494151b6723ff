"""The composition root: opens resources, builds the components, runs them under one supervisor.

Data flow (see README): mqtt → (channel) → ingest → store → processor → hub → http (SSE, REST).
The HTTP API starts first, under its own supervisor, so ``/ping`` answers (503 ``starting``, with
each component's cause) while the rest cannot start yet. The other components start in dependency
order; the supervisor stops them in reverse, so intake stops first and the store closes last.

A stop request is obeyed at every moment. An error no retry can fix (refused credentials, an
unknown database, an address in use) ends a start that has not finished with
:class:`~gateway.errors.StartupRefused`; once the gateway runs, it shows as ``degraded`` instead.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from pydantic import SecretStr

from gateway import __version__, metrics
from gateway.alerts import Alerts, AlertThresholds, disk_paths_for
from gateway.backoff import Backoff
from gateway.errors import ConfigError, RuleError, StartupRefused
from gateway.health import Health, State
from gateway.http.app import serve as serve_http
from gateway.http.context import AppContext
from gateway.hub import Hub
from gateway.ingest import Ingest
from gateway.logs import set_level, setup_logging
from gateway.mqtt import Inbound, MqttBridge
from gateway.processor import Processor
from gateway.publish import OutboxPublisher
from gateway.retention import RetentionPolicy
from gateway.rules import load_rules
from gateway.settings import Settings, known_variables, load_settings, url_secrets
from gateway.store import open_store
from gateway.store.base import InsertOutcome, NewMessage, Store
from gateway.store.single import single_instance
from gateway.supervisor import Component, Supervisor
from gateway.systemd import Notifier
from gateway.wake import Nudge

log = logging.getLogger("gateway.app")


def secret_values(settings: Settings) -> list[str]:
    """Literal secret values for the log filter (it masks long ones wherever they appear)."""
    out: list[str] = []
    if settings.mqtt.password is not None:
        out.append(settings.mqtt.password.get_secret_value())
    out += url_secrets(settings.database.url.get_secret_value())
    out += url_secrets(settings.mqtt.url)
    return out


@dataclass
class Gateway:
    """The running service's shared objects; ``settings`` is replaced on reload."""

    settings: Settings
    env_file: str | None
    store: Store
    health: Health = field(default_factory=lambda: Health(starting=True))
    nudge: Nudge = field(default_factory=Nudge)
    notifier: Notifier = field(default_factory=Notifier)
    stop_requested: trio.Event = field(default_factory=trio.Event)
    http_port: int | None = None

    def __post_init__(self) -> None:
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}"
        self.hub = Hub(self.store)
        self.bridge = MqttBridge(self.settings.mqtt, self.health.component("mqtt"))
        self.outbox = OutboxPublisher(self.settings.mqtt, self.store, self.bridge, self.health.component("outbox"))
        self.processor = Processor(
            self.settings.processor,
            self.store,
            self.nudge,
            self.health.component("processor"),
            instance_id=self.instance_id,
            rules=load_rules(self.settings.processor.rules_file),
            on_committed=self.hub.committed,
            retention=RetentionPolicy.from_settings(self.settings.database),
            on_outbox=self.outbox.wake,
        )
        self.alerts = Alerts(
            self.health,
            self.store,
            self.bridge,
            disk_paths=disk_paths_for(self.settings.database, self.settings.log),
            thresholds=AlertThresholds(disk_min_free=self.settings.database.disk_min_free),
            on_alert=self._on_alert,
        )
        self.ctx = AppContext(
            settings=self.settings,
            store=self.store,
            hub=self.hub,
            publisher=self.bridge,
            health=self.health,
            on_commit=self.nudge.set,  # the API's own commits (it refreshes its cache itself)
            reload=self.reload,
            version=__version__,
        )
        self.supervisor = Supervisor(self.settings.supervisor, self._components)
        self.ingest: Ingest | None = None  # the running group's (one per generation)
        # The API has its own supervisor: it answers while the group (re)starts.
        self.front = Supervisor(self.settings.supervisor, lambda: [Component("http", self._serve_http)])
        self._refusal = trio.Event()
        self.health.on_refusal(lambda _: self._refusal.set())
        self._run_scope: trio.CancelScope | None = None
        self._reload_lock = trio.Lock()

    def _components(self) -> Sequence[Component]:
        """Build one generation of the group (fresh channels each time it is restarted)."""
        send, receive = trio.open_memory_channel[list[Inbound]](self.settings.ingest.channel_size)
        ingest = Ingest(
            self.settings.ingest,
            self.store,
            self.bridge.ack,
            self._on_commit,
            self.health.component("ingest"),
            on_stored=self._on_stored,
        )
        self.ingest = ingest
        return [
            Component("database", self.store.run),
            Component("status", self._status_loop),
            Component("watch", partial(self.store.watch, self.nudge.set, self.hub.notify)),
            Component("hub", self.hub.run),
            Component("processor", self.processor.run),
            Component("ingest", partial(ingest.run, receive)),
            Component("mqtt", partial(self.bridge.run, send)),
            Component("outbox", self.outbox.run),
            Component("alerts", self.alerts.run),
            Component("watchdog", self.notifier.run_watchdog),
        ]

    async def _on_alert(self, name: str, data: dict[str, Any]) -> None:
        """An alert event (and its outbox row) was appended: SSE clients and MQTT get it now."""
        self.hub.notify()
        self.outbox.wake()

    def _on_commit(self) -> None:
        """New rows are committed: wake the processor; cached API pages go stale within MAX_STALE."""
        self.nudge.set()
        self.ctx.live.invalidate()

    def _on_stored(self, messages: list[NewMessage], outcomes: list[InsertOutcome]) -> None:
        """Keep the latest reading per device for the ping/dashboard views (new rows only)."""
        latest: dict[str, dict[str, Any]] = {}
        for message, outcome in zip(reversed(messages), reversed(outcomes), strict=True):
            if outcome.duplicate or message.device_id in latest:
                continue
            latest[message.device_id] = message.to_json(outcome.id)
        if latest:
            self.ctx.live.remember(reversed(list(latest.values())))

    async def _serve_http(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the API; stop gracefully on a stop request. Runs until cancelled.

        An address that cannot be bound (in use, not local, not permitted) is a refusal (see the
        module docstring), retried with backoff.
        """
        http = self.health.component("http")
        backoff = Backoff(self.settings.supervisor.restart_min, self.settings.supervisor.restart_max)
        while True:
            stop = trio.Event()
            failure: OSError | None = None

            async def relay(stop: trio.Event = stop) -> None:
                await self.stop_requested.wait()
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay)
                try:
                    bound = await nursery.start(partial(serve_http, self.ctx, stop=stop))
                except OSError as exc:  # raised by the bind, before anything else started
                    failure = exc
                    nursery.cancel_scope.cancel()
                else:
                    self.http_port = bound if isinstance(bound, int) else None
                    http.set("ok")
                    task_status.started(bound)
                    task_status = trio.TASK_STATUS_IGNORED
            if failure is None:
                if stop.is_set():
                    await trio.sleep_forever()  # stopped gracefully: the supervisor cancels us
                return  # ended by itself: the supervisor treats it as a crash
            s = self.settings.http
            cause = f"cannot listen on {s.host}:{s.port}: {failure.strerror or failure}"
            log.error("HTTP API %s", cause)
            http.set("degraded", cause, code="http_listen_failed", refused=True)
            await trio.sleep(backoff.next())

    async def _status_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mirror store health into the registry and systemd STATUS, every second."""
        db = self.health.component("database")
        task_status.started()
        last_status = ""
        while True:
            sh = self.store.health
            state: State = "ok" if sh.state == "ok" else ("starting" if sh.state == "starting" else "degraded")
            db.set(state, sh.last_error, code="db_refused" if sh.refused else "db_unavailable", refused=sh.refused)
            db.detail["reconnects"] = sh.reconnects
            for name, comp in self.health.as_dict().items():
                metrics.COMPONENT_UP.labels(component=name).set(1 if comp["state"] == "ok" else 0)
            mqtt = self.health.component("mqtt")
            proc = self.health.component("processor")
            status = (
                f"{self.health.overall}; mqtt {mqtt.state}; db {db.state}; backlog {proc.detail.get('backlog', '?')}"
            )
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            await trio.sleep(1.0)

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration and apply it; raises ConfigError and keeps the old one if invalid.

        Returns ``{"changed": [variables], "restarted": [components], "requires_restart": [...]}``.
        """
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = load_settings(self.env_file if self.env_file else ".env")
                try:
                    rules = load_rules(new.processor.rules_file)
                except RuleError as exc:
                    raise ConfigError("RULES_FILE", str(exc)) from None
                old_vals, new_vals = _raw_values(self.settings), _raw_values(new)
                changed = sorted(k for k in new_vals if new_vals[k] != old_vals.get(k))
                restarted: list[str] = []
                requires_restart: list[str] = []
                self.settings = new
                self.ctx.settings = new
                setup_logging(new.log, secret_values(new))
                set_level(new.log.level)
                self.processor.set_rules(rules)
                self.processor.set_interval(new.processor.interval)
                owner = known_variables()
                groups = {owner.get(k) for k in changed}
                if "mqtt" in groups:
                    self.bridge.settings = new.mqtt
                    self.outbox.settings = new.mqtt
                    if self.supervisor.restart("mqtt"):
                        restarted.append("mqtt")
                if "ingest" in groups and self.ingest is not None:
                    # Applied in place at the next batch boundary: a restart would drop the batch
                    # being filled, unacked, and the broker redelivers only after a reconnect.
                    self.ingest.reconfigure(new.ingest)
                if "INGEST_CHANNEL_SIZE" in changed:
                    requires_restart.append("ingest")  # the channel is rebuilt with the group
                http_live = {"API_KEYS", "RATE_LIMIT", "HTTP_CORS_ORIGINS", "HTTP_MAX_BODY", "HTTP_TRUSTED_PROXIES"}
                if any(owner.get(k) == "http" and k not in http_live for k in changed):
                    requires_restart.append("http")
                if "database" in groups:
                    requires_restart.append("database")
                if "supervisor" in groups:
                    requires_restart.append("supervisor")
                log.info(
                    "configuration reloaded changed=%s restarted=%s requires_restart=%s",
                    ",".join(changed) or "-",
                    ",".join(restarted) or "-",
                    ",".join(requires_restart) or "-",
                )
                return {"changed": changed, "restarted": restarted, "requires_restart": requires_restart}
            except ConfigError as exc:
                log.warning("reload refused, keeping the running configuration error=%s", exc)
                raise
            finally:
                self.notifier.ready()

    async def run(self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the API, then every component; report READY; run until a stop is requested.

        A stop request is obeyed at every moment, start-up included (see :meth:`request_stop`).
        Raises StartupRefused when a component reports a refusal before every component started.
        """
        t0 = time.monotonic()
        refused: StartupRefused | None = None
        async with trio.open_nursery() as nursery:
            self._run_scope = nursery.cancel_scope
            nursery.start_soon(self.front.run)
            nursery.start_soon(self.supervisor.run)
            outcome = await _first_of(started=self._started, stop=self.stop_requested.wait, refused=self._refusal.wait)
            if outcome == "started":
                self.health.started = True
                self.notifier.ready()
                log.info(
                    "gateway ready version=%s instance=%s database=%s http_port=%s startup_ms=%.0f",
                    __version__,
                    self.instance_id,
                    self.store.kind,
                    self.http_port,
                    (time.monotonic() - t0) * 1000,
                )
                task_status.started(self.http_port)
                await self.stop_requested.wait()
            elif outcome == "refused" and self.health.refusal is not None:
                comp = self.health.refusal
                refused = StartupRefused(comp.name, comp.last_error or comp.code or "refused")
                log.error("cannot start: %s", refused)
            log.info("stopping")
            self.notifier.stopping()
            if outcome == "started" and self.settings.mqtt.leaves_on_stop:
                # Leaving for good (ops/SCALING.md): stop the broker's routing to us and commit
                # what it still sends before the disconnect ends the session.
                with trio.move_on_after(self.settings.supervisor.shutdown_timeout):
                    await self.bridge.leave()
            with trio.move_on_after(self.settings.supervisor.shutdown_timeout * 2):
                await self.front.stop()
                await self.supervisor.stop()
            nursery.cancel_scope.cancel()
        self._run_scope = None
        if refused is not None:
            raise refused
        log.info("gateway stopped")

    async def _started(self) -> None:
        await self.front.ready.wait()
        await self.supervisor.ready.wait()

    def request_stop(self) -> None:
        """Ask the gateway to stop gracefully; asked again while stopping, stop at once."""
        if self.stop_requested.is_set():
            if self._run_scope is not None:
                log.warning("second stop request: stopping now")
                self._run_scope.cancel()
            return
        self.stop_requested.set()


async def _first_of(**waits: Callable[[], Awaitable[object]]) -> str:
    """Run every wait concurrently; return the name of the first to finish (the others are cancelled)."""
    winner: list[str] = []
    async with trio.open_nursery() as nursery:

        async def wait(name: str, fn: Callable[[], Awaitable[object]]) -> None:
            await fn()
            winner.append(name)
            nursery.cancel_scope.cancel()

        for name, fn in waits.items():
            nursery.start_soon(wait, name, fn)
    return winner[0]


def _raw_values(settings: Settings) -> dict[str, str]:
    """Comparable values (secrets unmasked, never shown) for the reload diff."""
    return {
        variable: value.get_secret_value() if isinstance(value, SecretStr) else repr(value)
        for variable, _, value in settings.values()
    }


async def serve(settings: Settings, env_file: str | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT (graceful stop; a second one stops at once); SIGHUP
    reloads the configuration. Raises StartupRefused (see :meth:`Gateway.run`)."""
    # Signals first: a stop asked while the store opens is kept and obeyed.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        refused: StartupRefused | None = None
        async with open_store(settings.database) as store:
            gateway = Gateway(settings, env_file, store)
            async with trio.open_nursery() as nursery:

                async def on_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            # A refused configuration is logged by reload(); the running one stays.
                            with contextlib.suppress(ConfigError):
                                await gateway.reload()
                        else:
                            log.info("signal received signal=%s", signal.Signals(signum).name)
                            gateway.request_stop()

                nursery.start_soon(on_signals)
                try:
                    await gateway.run()
                except StartupRefused as exc:
                    refused = exc  # raised outside every nursery: one error, not a group
                nursery.cancel_scope.cancel()
        if refused is not None:
            raise refused


GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections (CPython's default: 700). A batch of 500
readings allocates tens of thousands of short-lived objects; at 700 the collector runs dozens of
times per batch, each time walking the young objects of the batch under way."""


def _tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings: never garbage, so never scanned again)
    and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def run_gateway(settings: Settings, env_file: str | None = None) -> None:
    """Set up logging and run :func:`serve` until a clean stop.

    Raises what ends it (ConfigError, RuleError, StartupRefused, ...): ``gateway.cli`` maps each
    to the exit code; unexpected errors are logged here with their traceback first.
    """
    setup_logging(settings.log, secret_values(settings))
    _tune_gc()
    if settings.database.kind == "sqlite":
        Path(settings.database.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with single_instance(settings.database):  # SQLite: refuses a second gateway on the file
            trio.run(serve, settings, env_file)
    except (ConfigError, RuleError) as exc:
        log.error("configuration error: %s", exc)
        raise
    except (KeyboardInterrupt, StartupRefused):
        raise
    except Exception:
        log.critical("fatal error", exc_info=True)
        raise
