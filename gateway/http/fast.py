"""Raw ASGI routes in front of the Quart app, for the requests too frequent to pay for Quart's
request machinery (request context, hooks, response objects: ~2/3 of a trivial route's CPU here).

Only ``GET /api/v1/ping`` without a query or body is answered here, with the same gate
(:mod:`gateway.http.gate`: request id, caller, rate limit, headers, metrics, access log) and the same
body (:func:`gateway.http.routes.ping_body`) as the Quart route. Everything else — other methods, a
query string, a body, a request over the rate limit — goes on to Quart; a request already admitted
carries its :class:`~gateway.http.gate.Admission` in the scope (``ADMITTED``) so the limit is
charged once.
"""

from __future__ import annotations

import time
from typing import cast

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
)

from gateway.http.context import AppContext
from gateway.http.gate import Gate
from gateway.http.routes import ping_body

ADMITTED = "gateway.admitted"  # scope key: the Admission of a request handed on to Quart
PING = "/api/v1/ping"


class FastRoutes:
    """ASGI app: ``GET /api/v1/ping`` answered directly, everything else by ``app``."""

    def __init__(self, app: ASGIFramework, ctx: AppContext, gate: Gate) -> None:
        self.app = app
        self.ctx = ctx
        self.gate = gate

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http" or scope["path"] != PING or scope["method"] != "GET" or scope["query_string"]:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        x_api_key = authorization = origin = None
        forwarded: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                x_api_key = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
            elif name in (b"content-length", b"transfer-encoding"):
                return await self.app(scope, receive, send)  # a body: Quart reads (and limits) it
        http = self.ctx.settings.http
        client = scope.get("client")
        admitted = self.gate.admit(
            http,
            started,
            x_api_key=x_api_key,
            authorization=authorization,
            access_token=None,
            peer=client[0] if client else None,
            forwarded_for=forwarded,
        )
        if admitted.wait > 0:  # Quart answers the 429 (problem body, headers) with this admission
            return await self.app(cast(HTTPScope, {**scope, ADMITTED: admitted}), receive, send)
        status, body = await ping_body(self.ctx, admitted.principal)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self.gate.finish_headers(
            headers,
            http,
            request_id=admitted.request_id,
            scheme=scope.get("scheme", "http"),
            method="GET",
            origin=origin,
            status=status,
            body_unread=False,
        )
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send(HTTPResponseStartEvent(type="http.response.start", status=status, headers=raw, trailers=False))
        await send(HTTPResponseBodyEvent(type="http.response.body", body=body, more_body=False))
        self.gate.record(
            route=PING,
            method="GET",
            status=status,
            elapsed=time.perf_counter() - started,
            principal=admitted.principal,
            request_id=admitted.request_id,
            path=PING,
            query_string=b"",
        )
