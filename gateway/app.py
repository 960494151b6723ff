"""The composition root: builds every component from the settings, wires them, and serves.

Data flow (see README): mqtt → (channel) → ingest → store → processor → hub → http (SSE, REST).
:func:`build` makes the components over an opened store; :func:`_group` lists the supervised ones
in start order (the supervisor stops them in reverse, so intake stops first and the store closes
last). How the result runs, stops and reloads: :class:`gateway.service.Gateway`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import trio

from gateway import __version__, metrics
from gateway.alerts import Alerts, AlertThresholds, disk_paths_for
from gateway.errors import ConfigError, StartupRefused, StoreUnavailable
from gateway.health import ComponentHealth, Health
from gateway.http.context import AppContext
from gateway.http.front import HttpFront
from gateway.http.query import event_types
from gateway.hub import Hub
from gateway.ingest import Ingest
from gateway.latest import LatestReadings
from gateway.mqtt import Inbound, MqttBridge
from gateway.processor import Processor
from gateway.publish import OutboxPublisher
from gateway.retention import RetentionPolicy
from gateway.rules import load_rules
from gateway.service import Gateway
from gateway.settings import Settings
from gateway.spool import Spool
from gateway.store import open_store
from gateway.store.base import Store
from gateway.supervisor import Component, Supervisor
from gateway.systemd import Notifier
from gateway.wake import Nudge

log = logging.getLogger("gateway.app")


def build(settings: Settings, store: Store, *, env_file: str | None = None) -> Gateway:
    """Make and wire every component over ``store`` (opened, not running yet); nothing starts here.

    ``env_file`` is what a reload re-reads (default ``.env``). Raises RuleError for a bad ``RULES_FILE``.
    """
    health = Health(starting=True)
    health.add(store.health)  # the store keeps its record itself
    health.on_change(_component_up)
    nudge = Nudge()
    instance_id = f"{socket.gethostname()}:{os.getpid()}"
    hub = Hub(store)
    bridge = MqttBridge(settings.mqtt, health.component("mqtt"))
    outbox = OutboxPublisher(settings.mqtt, store, bridge, health.component("outbox"))
    processor = Processor(
        settings.processor,
        store,
        nudge,
        health.component("processor"),
        instance_id=instance_id,
        rules=load_rules(settings.processor.rules_file),
        on_committed=hub.committed,
        retention=RetentionPolicy.from_settings(settings.database),
        on_outbox=outbox.wake,
    )

    async def on_alert(name: str, data: dict[str, Any]) -> None:
        hub.notify()  # the alert event (and its outbox row) is committed: SSE and MQTT get it now
        outbox.wake()

    disk_paths = disk_paths_for(settings.database, settings.log)
    thresholds = AlertThresholds(disk_min_free=settings.database.disk_min_free)
    alerts = Alerts(health, store, bridge, disk_paths=disk_paths, thresholds=thresholds, on_alert=on_alert)
    ctx = AppContext(
        settings=settings, store=store, hub=hub, publisher=bridge, health=health,
        on_commit=nudge.set,  # the API's own commits: it refreshes its caches itself
        reload=lambda: gw.reload(), version=__version__, event_types=lambda: event_types(processor.rules),
    )  # fmt: skip
    stop_requested = trio.Event()
    http = HttpFront(ctx, health.component("http"), settings.supervisor, stop_requested)
    gw = Gateway(
        settings=settings, env_file=env_file, instance_id=instance_id, store=store, health=health, nudge=nudge,
        notifier=Notifier(), hub=hub, bridge=bridge, outbox=outbox, processor=processor, alerts=alerts, ctx=ctx,
        http=http, front=Supervisor(settings.supervisor, lambda: [Component("http", http.run)]),
        supervisor=Supervisor(settings.supervisor, lambda: _group(gw)), stop_requested=stop_requested,
    )  # fmt: skip
    return gw


def _group(gw: Gateway) -> list[Component]:
    """One generation of the supervised group, in start order (fresh channels at each rebuild)."""
    send, receive = trio.open_memory_channel[list[Inbound]](gw.settings.ingest.channel_size)

    def on_commit() -> None:  # an ingest batch: cached pages may lag it by MAX_STALE at most
        gw.nudge.set()
        gw.ctx.pages.invalidate()

    health = gw.health.component("ingest")
    spool = _spool(gw.settings, gw.health)
    ingest = Ingest(
        gw.settings.ingest, gw.store, gw.bridge.ack, on_commit, health, on_stored=gw.ctx.latest.stored, spool=spool
    )
    gw.ingest = ingest

    async def run_ingest(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await _seed_latest(gw.store, gw.ctx.latest)  # before ingest feeds it, after the store is up
        await ingest.run(receive, task_status=task_status)

    return [
        Component("database", gw.store.run),
        Component("status", partial(gw.notifier.run_status, gw.health.summary)),
        Component("watch", partial(gw.store.watch, gw.nudge.set, gw.hub.notify)),
        Component("hub", gw.hub.run),
        Component("processor", gw.processor.run),
        Component("ingest", run_ingest),
        Component("mqtt", partial(gw.bridge.run, send)),
        Component("outbox", gw.outbox.run),
        Component("alerts", gw.alerts.run),
        Component("watchdog", gw.notifier.run_watchdog),
    ]


async def _seed_latest(store: Store, latest: LatestReadings) -> None:
    """Load each device's newest stored reading into the latest-per-device view, so a restart
    keeps it; a failure is only logged (live commits fill the view anyway)."""
    try:
        added = latest.seed(await store.latest_per_device(latest.max_devices))
    except StoreUnavailable as exc:
        log.warning("latest readings not loaded error=%s", exc)
    else:
        log.info("latest readings loaded devices=%d", added)


def _spool(settings: Settings, health: Health) -> Spool | None:
    """The disk spool when ``SPOOL_AFTER`` is set and the database is PostgreSQL (with SQLite the
    database is a local file already: a spool beside it would not survive anything it does not)."""
    ingest = settings.ingest
    if ingest.spool_after is None:
        return None
    if settings.database.kind != "postgres":
        log.warning("SPOOL_AFTER is ignored: the disk spool is for PostgreSQL, DATABASE_URL is SQLite")
        return None
    return Spool(ingest.spool_path, ingest.spool_max_bytes, health.component("spool"))


def _component_up(component: ComponentHealth) -> None:
    metrics.COMPONENT_UP.labels(component=component.name).set(1 if component.state == "ok" else 0)


async def serve(settings: Settings, env_file: str | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT (graceful stop; a second one stops at once); SIGHUP
    reloads the configuration. Raises StartupRefused (see :meth:`Gateway.run`), RuleError."""
    # Signals first: a stop asked while the store opens is kept and obeyed.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        refused: StartupRefused | None = None
        async with open_store(settings.database) as store:
            gateway = build(settings, store, env_file=env_file)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, gateway, signals)
                try:
                    await gateway.run()
                except StartupRefused as exc:
                    refused = exc  # raised outside every nursery: one error, not a group
                nursery.cancel_scope.cancel()
        if refused is not None:
            raise refused


async def _on_signals(gateway: Gateway, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            with contextlib.suppress(ConfigError):  # logged by reload(); the running one stays
                await gateway.reload()
        else:
            log.info("signal received signal=%s", signal.Signals(signum).name)
            gateway.request_stop()
