"""The HTTP application: app factory (routes, errors, the per-request hooks of
:mod:`gateway.http.middleware`) and :func:`serve`, which runs it on hypercorn's trio worker."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_schema import QuartSchema
from quart_trio import QuartTrio

from gateway.http import dashboard, docs, errors, middleware, routes
from gateway.http.context import AppContext
from gateway.http.fast import FastRoutes
from gateway.http.gate import Gate
from gateway.http.openapi import SECURITY_SCHEMES, GatewayOpenAPIProvider
from gateway.http.sse import SendTimeoutConfig, SseStreams

log = logging.getLogger("gateway.http")


def create_app(ctx: AppContext) -> QuartTrio:
    """Build the Quart app serving ``ctx``. Settings are read from ``ctx.settings`` per request."""
    app = QuartTrio("gateway.http", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = ctx.settings.http.max_body
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.extensions["gateway.ctx"] = ctx
    app.extensions["gateway.sse"] = SseStreams()
    gate = app.extensions["gateway.gate"] = Gate()
    QuartSchema(
        app,
        info={"title": "Sensor gateway API", "version": ctx.version},
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,  # served from the package instead (gateway.http.docs)
        security_schemes=SECURITY_SCHEMES,
        openapi_provider_class=GatewayOpenAPIProvider,
    )
    errors.register(app)
    routes.register(app)
    dashboard.register(app)
    docs.register(app)

    middleware.install(app, ctx, gate)
    return app


def _config(ctx: AppContext) -> Config:
    http = ctx.settings.http
    config = SendTimeoutConfig()
    config.send_timeout = http.sse_send_timeout
    host = f"[{http.host}]" if ":" in http.host and not http.host.startswith("[") else http.host
    config.bind = [f"{host}:{http.port}"]
    if http.tls:
        config.certfile = str(http.cert_file)
        config.keyfile = str(http.key_file)
    config.graceful_timeout = 2.0
    config.accesslog = None  # we log one line per request ourselves, secrets masked
    config.errorlog = logging.getLogger("gateway.http.server")
    config.include_server_header = False
    config.h11_max_incomplete_size = 16 * 1024
    return config


async def serve(
    ctx: AppContext,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until cancelled (or until ``stop`` is set, then stop gracefully and return).

    Reports the bound port (the real one when 0 was asked) once the socket listens. SSE streams
    end as soon as the stop begins, so shutdown takes milliseconds.
    Raises OSError when the address cannot be bound.
    """
    app = create_app(ctx)
    streams: SseStreams = app.extensions["gateway.sse"]
    config = _config(ctx)
    # Bind first, outside any nursery: an address in use (or not ours) is a plain OSError here,
    # which the gateway reports as a refusal instead of a crash of the task group.
    sockets = config.create_sockets()
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
        sock.listen(config.backlog)

    async def _shutdown_trigger() -> None:
        if stop is None:
            await trio.sleep_forever()
        else:
            await stop.wait()
        streams.close()

    try:
        await _serve_on(app, config, sockets, streams, _shutdown_trigger, task_status)
    finally:
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.close()  # a no-op when hypercorn closed it already


async def _serve_on(
    app: QuartTrio,
    config: Config,
    sockets: Sockets,
    streams: SseStreams,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[int],
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(streams.run)
        app.extensions["gateway.tasks"] = nursery  # background work of requests (page rebuilds)
        front = FastRoutes(app, app.extensions["gateway.ctx"], app.extensions["gateway.gate"], app.extensions)

        async def _server(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await worker_serve(
                wrap_app(front, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=sockets,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()  # stopped: end the stream owner too

        binds: list[str] = await nursery.start(partial(_server))
        log.info("HTTP API listening on %s", ", ".join(binds))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
