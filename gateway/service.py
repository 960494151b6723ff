"""The running gateway: the API first, then the supervised group; READY; stop on request; reload.

The HTTP API starts first, under its own supervisor, so ``/ping`` answers (503 ``starting``, with
each component's cause) while the rest cannot start yet. The other components start in dependency
order; the supervisor stops them in reverse, so intake stops first and the store closes last.

A stop request is obeyed at every moment. An error no retry can fix (refused credentials, an
unknown database, an address in use) ends a start that has not finished with
:class:`~gateway.errors.StartupRefused`; once the gateway runs, it shows as ``degraded`` instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gateway import __version__
from gateway.alerts import Alerts
from gateway.errors import ConfigError, RuleError, StartupRefused
from gateway.health import Health
from gateway.http.context import AppContext
from gateway.http.front import HttpFront
from gateway.hub import Hub
from gateway.ingest import Ingest
from gateway.logs import setup_logging
from gateway.mqtt import MqttBridge
from gateway.processor import Processor
from gateway.publish import OutboxPublisher
from gateway.rules import RuleSet, load_rules
from gateway.settings import Settings, load_settings, secret_values
from gateway.store.base import Store
from gateway.supervisor import Supervisor
from gateway.systemd import Notifier
from gateway.wake import Nudge

log = logging.getLogger("gateway.app")


@dataclass
class Gateway:
    """A built gateway (:func:`gateway.app.build`): its components, and how it runs and reloads.

    ``settings`` is replaced on reload; ``ingest`` is the running group's (one per generation).
    """

    settings: Settings
    env_file: str | None
    instance_id: str
    store: Store
    health: Health
    nudge: Nudge
    notifier: Notifier
    hub: Hub
    bridge: MqttBridge
    outbox: OutboxPublisher
    processor: Processor
    alerts: Alerts
    ctx: AppContext
    http: HttpFront
    front: Supervisor  # the API alone: it answers while the group (re)starts
    supervisor: Supervisor  # every other component
    stop_requested: trio.Event = field(default_factory=trio.Event)
    ingest: Ingest | None = None
    _run_scope: trio.CancelScope | None = field(default=None, init=False, repr=False)
    _reload_lock: trio.Lock = field(default_factory=trio.Lock, init=False, repr=False)

    async def run(self, *, task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the API, then every component; report READY; run until a stop is requested.

        A stop request is obeyed at every moment, start-up included (see :meth:`request_stop`).
        Raises StartupRefused when a component reports a refusal before every component started.
        """
        t0 = time.monotonic()
        refusal = trio.Event()
        self.health.on_refusal(lambda _: refusal.set())
        refused: StartupRefused | None = None
        async with trio.open_nursery() as nursery:
            self._run_scope = nursery.cancel_scope
            nursery.start_soon(self.front.run)
            nursery.start_soon(self.supervisor.run)
            outcome = await _first_of(started=self._started, stop=self.stop_requested.wait, refused=refusal.wait)
            if outcome == "started":
                self.health.started = True
                self.notifier.ready()
                log.info(
                    "gateway ready version=%s instance=%s database=%s http_port=%s startup_ms=%.0f",
                    __version__,
                    self.instance_id,
                    self.store.kind,
                    self.http.port,
                    (time.monotonic() - t0) * 1000,
                )
                task_status.started(self.http.port)
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

    async def reload(self) -> dict[str, list[str]]:
        """Re-read the configuration and apply it; raises ConfigError and keeps the old one if invalid.

        Returns ``{"changed": [variables], "restarted": [components], "requires_restart": [...]}``,
        derived from the marks on the settings models (``LIVE``, ``RESTARTS``, ``FIXED``).
        """
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                new = load_settings(self.env_file if self.env_file else ".env")
                try:
                    rules = load_rules(new.processor.rules_file)
                except RuleError as exc:
                    raise ConfigError("RULES_FILE", str(exc)) from None
                result = self._apply(new, rules)
            except ConfigError as exc:
                log.warning("reload refused, keeping the running configuration error=%s", exc)
                raise
            finally:
                self.notifier.ready()
        log.info(
            "configuration reloaded changed=%s restarted=%s requires_restart=%s",
            *(",".join(result[k]) or "-" for k in ("changed", "restarted", "requires_restart")),
        )
        return result

    def _apply(self, new: Settings, rules: RuleSet) -> dict[str, list[str]]:
        """Hand each component its new part; restart in place those whose change needs it."""
        diff = self.settings.diff(new)
        self.settings = new
        # Always: the rules file may have changed under the same name, and secrets with it.
        setup_logging(new.log, secret_values(new))
        self.processor.reconfigure(new.processor, rules)
        self.ctx.reconfigure(new.http)
        if "mqtt" in diff:
            self.bridge.reconfigure(new.mqtt)
            self.outbox.reconfigure(new.mqtt)
        if "ingest" in diff and self.ingest is not None:
            # In place at the next batch boundary: a restart would drop the batch being filled,
            # unacked, and the broker redelivers only after a reconnect.
            self.ingest.reconfigure(new.ingest)
        restarted: list[str] = []
        requires_restart: list[str] = []
        for name, variables in diff.items():
            applied = Settings.COMPONENTS[name].applied(variables)
            # A model that RESTARTS names the supervised component it configures.
            if "restart" in applied and self.supervisor.restart(name):
                restarted.append(name)
            if "process" in applied:
                requires_restart.append(name)
        changed = sorted(v for variables in diff.values() for v in variables)
        return {"changed": changed, "restarted": restarted, "requires_restart": requires_restart}


async def _first_of(**waits: Callable[[], Awaitable[Any]]) -> str:
    """Run every wait concurrently; return the name of the first to finish (the others are cancelled)."""
    winner: list[str] = []
    async with trio.open_nursery() as nursery:

        async def wait(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
            await fn()
            winner.append(name)
            nursery.cancel_scope.cancel()

        for name, fn in waits.items():
            nursery.start_soon(wait, name, fn)
    return winner[0]
