"""The restart policy: one nursery runs every component; an unexpected failure restarts the group.

Each component is ``run(*, task_status)``: it runs until cancelled and calls ``task_status.started()``
when really ready. The supervisor starts them in order (each waits for the previous to be ready),
reports itself started when all are, and then:

- an unexpected exception in any component cancels the whole group, is logged with its traceback,
  and the group is rebuilt (fresh channels) after a delay that doubles per consecutive crash
  (``restart_min`` … ``restart_max``, with jitter) and resets once the group stayed up for
  ``restart_reset_after`` seconds;
- ``restart(name)`` restarts one component in place (a configuration change), not a failure;
- ``stop()`` cancels the components in reverse start order, each given a bounded time to finish,
  so intake stops before the stages behind it and the store closes last. It works at any moment:
  during the first start (the component still starting goes first), while a restart waits out
  its backoff, and while the group is being rebuilt.

Expected faults (broker or database down) never reach here: components retry those themselves and
report them as health.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from gateway import metrics
from gateway.backoff import Backoff
from gateway.errors import ComponentExited
from gateway.settings import SupervisorSettings

log = logging.getLogger("gateway.supervisor")


@dataclass(frozen=True)
class Component:
    """A named service: ``run(task_status=...)`` runs until cancelled."""

    name: str
    run: Callable[..., Awaitable[None]]


def restart_backoff(settings: SupervisorSettings, rng: random.Random | None = None) -> Backoff:
    """The delays between consecutive group restarts: exponential, capped, with equal jitter.

    Restart ``n`` (0-based) waits in ``[base/2, base]`` where ``base = min(restart_max,
    restart_min * 2**n)``, so delays grow with each consecutive crash yet two instances do not
    restart in lockstep.
    """
    low = settings.restart_min
    return Backoff(low, max(low, settings.restart_max), jitter="equal", rng=rng)


class Supervisor:
    """Runs a group of components under the restart policy. See the module docstring."""

    def __init__(
        self,
        settings: SupervisorSettings,
        build: Callable[[], Sequence[Component]],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._build = build
        self._rng = rng or random.Random()
        self._scopes: dict[str, trio.CancelScope] = {}
        self._done: dict[str, trio.Event] = {}
        self._order: list[str] = []
        self._restart_requested: set[str] = set()
        self._group_scope: trio.CancelScope | None = None
        self._sleep_scope: trio.CancelScope | None = None
        self._stopping = False
        self._starting: str | None = None  # the component whose start() is awaited right now
        self.ready = trio.Event()  # set once the whole group has started the first time
        self.restarts = 0
        self.delays: list[float] = []

    @property
    def components(self) -> list[str]:
        """Names of the running group's components, in start order."""
        return list(self._order)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the group until :meth:`stop`; restart it after unexpected failures. Runs until stopped."""
        backoff = restart_backoff(self.settings, self._rng)
        ready_reported = False
        while not self._stopping:
            started_at = trio.current_time()
            crashed: BaseException | None = None
            try:
                with trio.CancelScope() as group_scope:
                    self._group_scope = group_scope
                    async with trio.open_nursery() as nursery:
                        self._order = []
                        for component in self._build():
                            self._starting = component.name
                            await nursery.start(self._runner, component)
                            self._starting = None
                            self._order.append(component.name)
                        if not ready_reported:
                            ready_reported = True
                            self.ready.set()
                            task_status.started()
                        log.info("group started components=%s", ",".join(self._order))
            except* Exception as group:
                crashed = group
            self._group_scope = None
            self._starting = None
            if self._stopping:
                break
            if crashed is None:
                # Every component returned after being cancelled by nobody but us: nothing to do.
                crashed = RuntimeError("group ended without a stop request")
            if trio.current_time() - started_at >= self.settings.restart_reset_after:
                backoff.reset()
            delay = backoff.next()
            self.restarts += 1
            self.delays.append(delay)
            failed = _failed_names(crashed)
            for name in failed or ["group"]:
                metrics.RESTARTS.labels(component=name).inc()
            log.error(
                "component failed, restarting group failed=%s restart=%d delay=%.2fs",
                ",".join(failed) or "?",
                self.restarts,
                delay,
                exc_info=(type(crashed), crashed, crashed.__traceback__),
            )
            with trio.CancelScope() as sleep_scope:
                self._sleep_scope = sleep_scope
                if self._stopping:
                    sleep_scope.cancel()
                await trio.sleep(delay)
            self._sleep_scope = None

    async def _runner(self, component: Component, *, task_status: trio.TaskStatus[None]) -> None:
        done = trio.Event()
        self._done[component.name] = done
        status: Any = task_status
        try:
            while True:
                scope = trio.CancelScope()
                self._scopes[component.name] = scope
                with scope:
                    try:
                        await component.run(task_status=status)
                    except Exception as exc:
                        exc.add_note(f"in component {component.name!r}")
                        raise
                    raise ComponentExited(component.name)
                status = trio.TASK_STATUS_IGNORED
                if component.name in self._restart_requested and not self._stopping:
                    self._restart_requested.discard(component.name)
                    log.info("component restarted component=%s reason=reconfigured", component.name)
                    continue
                return
        finally:
            done.set()

    def restart(self, name: str) -> bool:
        """Restart one component in place (e.g. its settings changed). Returns False if unknown."""
        scope = self._scopes.get(name)
        if scope is None or name not in self._order:
            return False
        self._restart_requested.add(name)
        scope.cancel()
        return True

    async def stop(self) -> None:
        """Stop every component in reverse start order, each within ``shutdown_timeout``; then the group."""
        self._stopping = True
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()
        starting = [self._starting] if self._starting is not None else []
        for name in [*starting, *reversed(self._order)]:
            scope = self._scopes.get(name)
            done = self._done.get(name)
            if scope is None or done is None:
                continue
            scope.cancel()
            with trio.move_on_after(self.settings.shutdown_timeout) as waited:
                await done.wait()
            if waited.cancelled_caught:
                log.warning("component did not stop in time component=%s", name)
            else:
                log.info("component stopped component=%s", name)
        if self._group_scope is not None:
            self._group_scope.cancel()


def _failed_names(group: BaseException) -> list[str]:
    names: list[str] = []
    excs = group.exceptions if isinstance(group, BaseExceptionGroup) else (group,)
    for exc in excs:
        if isinstance(exc, BaseExceptionGroup):
            names.extend(_failed_names(exc))
            continue
        if isinstance(exc, ComponentExited):
            names.append(exc.name)
            continue
        for note in getattr(exc, "__notes__", []):
            if note.startswith("in component "):
                names.append(note[len("in component ") :].strip("'"))
    return names
