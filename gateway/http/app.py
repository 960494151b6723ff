"""The HTTP application: app factory, per-request hooks (request id, rate limit, auth, headers,
access log, metrics) and :func:`serve`, which runs it on hypercorn's trio worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart import Response, g, request
from quart_schema import QuartSchema
from quart_trio import QuartTrio

from gateway import metrics
from gateway.errors import ApiError, ProblemCode
from gateway.http import dashboard, docs, errors, routes
from gateway.http.context import AppContext
from gateway.http.fast import ADMITTED, FastRoutes
from gateway.http.gate import Admission, Gate
from gateway.http.openapi import SECURITY_SCHEMES, GatewayOpenAPIProvider, spec_of
from gateway.http.ratelimit import retry_after_header
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

    @app.before_request
    async def _before() -> None:
        http = ctx.settings.http
        # Keeps the body limit live across reloads (Quart reads it when a request starts).
        app.config["MAX_CONTENT_LENGTH"] = http.max_body
        spec = spec_of(app.view_functions.get(request.endpoint)) if request.endpoint else None
        # A raw route (gateway.http.fast) that hands a request on has admitted it already.
        admitted = cast(Admission | None, request.scope.get(ADMITTED))
        if admitted is None:
            token = request.args.get("access_token") if spec is not None and spec.query_token else None
            admitted = gate.admit(
                http,
                time.perf_counter(),
                x_api_key=request.headers.get("X-API-Key"),
                authorization=request.headers.get("Authorization"),
                access_token=token,
                peer=request.remote_addr,
                forwarded_for=request.headers.getlist("X-Forwarded-For"),
            )
        g.admitted = admitted
        g.request_id = admitted.request_id
        principal = g.principal = admitted.principal
        # (The 429 then closes the connection, see _after.)
        if admitted.wait > 0:
            raise ApiError(
                ProblemCode.RATE_LIMITED,
                f"rate limit is {http.rate_limit}",
                headers={"Retry-After": retry_after_header(admitted.wait)},
            )
        if request.content_length or request.headers.get("Transfer-Encoding"):
            # Receive the whole body before anything else can answer: hypercorn's HTTP/1.1
            # connection hangs when a response (e.g. 401 or 415) is sent before the body has
            # arrived. Quart raises 413 here when it is larger than MAX_CONTENT_LENGTH.
            await request.get_data(cache=True)
        if spec is None or spec.role is None or request.method == "OPTIONS":
            return
        if admitted.key is None:
            detail = "send an API key in X-API-Key or Authorization: Bearer"
            if not http.api_keys:
                detail += " (no API keys are configured: see `gateway apikey new`)"
            raise ApiError(ProblemCode.AUTH_MISSING, detail, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
        if principal is None:
            raise ApiError(
                ProblemCode.AUTH_INVALID,
                "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'},
            )
        if not principal.may(spec.role):
            raise ApiError(ProblemCode.FORBIDDEN, f"this needs the {spec.role} role; the key has {principal.role}")

    @app.after_request
    async def _after(response: Response) -> Response:
        admitted: Admission | None = g.get("admitted")
        request_id = admitted.request_id if admitted is not None else gate.request_id()
        started = admitted.started if admitted is not None else time.perf_counter()
        gate.finish_headers(
            response.headers,
            ctx.settings.http,
            request_id=request_id,
            scheme=request.scheme,
            method=request.method,
            origin=request.headers.get("Origin"),
            status=response.status_code,
            body_unread=bool(
                request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
            ),
        )
        gate.record(
            route=request.url_rule.rule if request.url_rule is not None else metrics.UNMATCHED_ROUTE,
            method=request.method,
            status=response.status_code,
            elapsed=time.perf_counter() - started,
            principal=admitted.principal if admitted is not None else None,
            request_id=request_id,
            path=request.path,
            query_string=request.query_string,
        )
        return response

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
