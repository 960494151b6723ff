"""The HTTP application: app factory, per-request hooks (request id, rate limit, auth, headers,
access log, metrics) and :func:`serve`, which runs it on hypercorn's trio worker."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart import Response, g, request
from quart_schema import QuartSchema
from quart_trio import QuartTrio

from gateway import metrics
from gateway.http import dashboard, docs, errors, routes
from gateway.http.auth import authenticate, presented_key
from gateway.http.context import AppContext
from gateway.http.errors import ApiError
from gateway.http.openapi import SECURITY_SCHEMES, GatewayOpenAPIProvider, spec_of
from gateway.http.ratelimit import RateLimiter, address_bucket, client_address, parse_networks, retry_after_header
from gateway.http.sse import SendTimeoutConfig, SseStreams

log = logging.getLogger("gateway.http")


def create_app(ctx: AppContext) -> QuartTrio:
    """Build the Quart app serving ``ctx``. Settings are read from ``ctx.settings`` per request."""
    app = QuartTrio("gateway.http", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = ctx.settings.http.max_body
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.extensions["gateway.ctx"] = ctx
    app.extensions["gateway.sse"] = SseStreams()
    limiter = RateLimiter()
    # Request ids: a random per-process prefix and a counter (unique, and cheaper than uuid4).
    id_prefix = uuid.uuid4().hex[:8]
    id_counter = itertools.count(1)
    # Prometheus children per label set, looked up once (labels() costs more than inc()).
    counters: dict[tuple[str, str, int], Any] = {}
    latencies: dict[str, Any] = {}
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
        g.request_id = f"{id_prefix}{next(id_counter):08x}"
        g.started = time.perf_counter()
        g.principal = None
        http = ctx.settings.http
        # Keeps the body limit live across reloads (Quart reads it when a request starts).
        app.config["MAX_CONTENT_LENGTH"] = http.max_body
        spec = spec_of(app.view_functions.get(request.endpoint)) if request.endpoint else None
        token = request.args.get("access_token") if spec is not None and spec.query_token else None
        key = presented_key(request.headers.get("X-API-Key"), request.headers.get("Authorization"), token)
        principal = authenticate(key, http.api_keys) if key else None
        g.principal = principal
        # The limit comes before the body is read: a client over it costs no body buffering.
        # (The 429 then closes the connection, see _after.)
        count, period = http.rate
        if principal is not None:
            wait = limiter.check_key(principal.name, count, period)
        else:
            address = client_address(
                request.remote_addr,
                request.headers.getlist("X-Forwarded-For"),
                parse_networks(http.trusted_proxies),
            )
            wait = limiter.check_address(address_bucket(address), count, period)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"rate limit is {http.rate_limit}",
                headers={"Retry-After": retry_after_header(wait)},
            )
        if request.content_length or request.headers.get("Transfer-Encoding"):
            # Receive the whole body before anything else can answer: hypercorn's HTTP/1.1
            # connection hangs when a response (e.g. 401 or 415) is sent before the body has
            # arrived. Quart raises 413 here when it is larger than MAX_CONTENT_LENGTH.
            await request.get_data(cache=True)
        if spec is None or spec.role is None or request.method == "OPTIONS":
            return
        if key is None:
            detail = "send an API key in X-API-Key or Authorization: Bearer"
            if not http.api_keys:
                detail += " (no API keys are configured: see `gateway apikey new`)"
            raise ApiError(401, "auth_missing", detail, headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
        if principal is None:
            raise ApiError(
                401,
                "auth_invalid",
                "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'},
            )
        if not principal.may(spec.role):
            raise ApiError(403, "forbidden", f"this needs the {spec.role} role; the key has {principal.role}")

    @app.after_request
    async def _after(response: Response) -> Response:
        request_id = g.get("request_id") or f"{id_prefix}{next(id_counter):08x}"
        headers = response.headers
        headers["X-Request-ID"] = request_id
        headers["X-Content-Type-Options"] = "nosniff"
        if request.scheme == "https":
            # Browsers keep to HTTPS for this host for a year (only sent over TLS, as RFC 6797 asks).
            headers["Strict-Transport-Security"] = "max-age=31536000"
        if "Cache-Control" not in headers:
            headers["Cache-Control"] = "no-store"
        origin = request.headers.get("Origin")
        if origin and origin in ctx.settings.http.cors_origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
            headers["Access-Control-Expose-Headers"] = "X-Request-ID, ETag, Retry-After"
            if request.method == "OPTIONS":
                headers["Access-Control-Allow-Methods"] = "GET, POST"
                headers["Access-Control-Allow-Headers"] = (
                    "X-API-Key, Authorization, Content-Type, Last-Event-ID, If-None-Match"
                )
                headers["Access-Control-Max-Age"] = "600"
        if response.status_code >= 400 and (
            request.content_length or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        ):
            # The body may be unread: hypercorn (h11) hangs the connection when the rest of a body
            # arrives after the response, so end the connection instead of keeping it alive.
            headers["Connection"] = "close"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        # Labels come from fixed sets only (h11 accepts any token as a method, and paths are the
        # client's): the route template or "unmatched", a known method or "other".
        route = request.url_rule.rule if request.url_rule is not None else metrics.UNMATCHED_ROUTE
        method = metrics.method_label(request.method)
        status = response.status_code
        counter = counters.get((route, method, status))
        if counter is None:
            counter = counters[(route, method, status)] = metrics.HTTP_REQUESTS.labels(route, method, str(status))
        counter.inc()
        latency = latencies.get(route)
        if latency is None:
            latency = latencies[route] = metrics.HTTP_LATENCY.labels(route)
        latency.observe(elapsed)
        principal = g.get("principal")
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d %.1fms key=%s rid=%s",
                request.method,
                _loggable_path(),
                response.status_code,
                elapsed * 1000,
                principal.name if principal else "-",
                request_id,
            )
        return response

    return app


def _loggable_path() -> str:
    """The request path and query with secrets (``access_token``) masked.

    The decoded path is percent-encoded again (``%0a``, spaces, quotes), so it stays one field of
    one line and cannot imitate the status or key that follow it.
    """
    path = quote(request.path, safe="/!$&'()*+,;=:@-._~")
    if not request.query_string:
        return path
    pairs = parse_qsl(request.query_string.decode("latin-1"), keep_blank_values=True)
    masked = [(k, "***" if k.lower() in ("access_token", "api_key", "key_token") else v) for k, v in pairs]
    return f"{path}?{urlencode(masked)}"


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

        async def _server(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, None),
                config,
                sockets=sockets,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )
            nursery.cancel_scope.cancel()  # stopped: end the stream owner too

        binds: list[str] = await nursery.start(partial(_server))
        log.info("HTTP API listening on %s", ", ".join(binds))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
