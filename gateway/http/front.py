"""The API as a supervised component: it binds, serves, and stops gracefully on the gateway's stop.

An address that cannot be bound (in use, not local, not permitted) is a refusal (see
:mod:`gateway.health`): reported as ``degraded`` with ``refused``, and retried with backoff.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from gateway.backoff import Backoff
from gateway.health import ComponentHealth
from gateway.http.app import serve
from gateway.http.context import AppContext
from gateway.settings import SupervisorSettings

log = logging.getLogger("gateway.app")


class HttpFront:
    """Serves ``ctx`` until cancelled; ``port`` is the bound port once started."""

    def __init__(
        self, ctx: AppContext, health: ComponentHealth, settings: SupervisorSettings, stop_requested: trio.Event
    ) -> None:
        self.ctx = ctx
        self.port: int | None = None
        self._health = health
        self._settings = settings
        self._stop_requested = stop_requested

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the API; stop gracefully on a stop request. Runs until cancelled."""
        backoff = Backoff(self._settings.restart_min, self._settings.restart_max)
        while True:
            stop = trio.Event()
            failure: OSError | None = None

            async def relay(stop: trio.Event = stop) -> None:
                await self._stop_requested.wait()
                stop.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay)
                try:
                    bound = await nursery.start(partial(serve, self.ctx, stop=stop))
                except OSError as exc:  # raised by the bind, before anything else started
                    failure = exc
                    nursery.cancel_scope.cancel()
                else:
                    self.port = bound if isinstance(bound, int) else None
                    self._health.set("ok")
                    task_status.started(bound)
                    task_status = trio.TASK_STATUS_IGNORED
            if failure is None:
                if stop.is_set():
                    await trio.sleep_forever()  # stopped gracefully: the supervisor cancels us
                return  # ended by itself: the supervisor treats it as a crash
            s = self.ctx.settings.http
            cause = f"cannot listen on {s.host}:{s.port}: {failure.strerror or failure}"
            log.error("HTTP API %s", cause)
            self._health.set("degraded", cause, code="http_listen_failed", refused=True)
            await trio.sleep(backoff.next())
