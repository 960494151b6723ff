"""Raw ASGI routes in front of the Quart app, for the requests too frequent to pay for Quart's
request machinery (request context, hooks, response objects: most of a trivial route's CPU here).

``GET /api/v1/ping`` (without a query or body) and ``GET /api/v1/messages`` (a reader's, answered
from the page cache or one read) are answered here, with the same gate (:mod:`gateway.http.gate`:
request id, caller, rate limit, headers, metrics, access log), the same parameter parsing and the
same bodies (:mod:`gateway.http.routes`) as the Quart routes. Everything else — other methods, a
body, a request over the rate limit, a missing key or role, a wrong parameter, a failed read —
goes on to Quart, which answers it as always; a request already admitted carries its
:class:`~gateway.http.gate.Admission` in the scope (``ADMITTED``) so the limit is charged once.
"""

from __future__ import annotations

import time
from typing import cast
from urllib.parse import parse_qs

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    HTTPScope,
    Scope,
)

from gateway.errors import ApiError, StoreError
from gateway.http import routes
from gateway.http.context import AppContext
from gateway.http.gate import Admission, Gate
from gateway.http.openapi import spec_of

ADMITTED = "gateway.admitted"  # scope key: the Admission of a request handed on to Quart
PING = "/api/v1/ping"
MESSAGES = "/api/v1/messages"
_JSON = "application/json"


class FastRoutes:
    """ASGI app: the hot routes answered directly, everything else by ``app``."""

    def __init__(self, app: ASGIFramework, ctx: AppContext, gate: Gate, extensions: dict[str, object]) -> None:
        self.app = app
        self.ctx = ctx
        self.gate = gate
        self._extensions = extensions  # the Quart app's: "gateway.tasks" is set once served
        spec = spec_of(routes.messages)
        assert spec is not None and spec.role is not None
        self._messages_role = spec.role

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path = scope["path"]
            if path == PING and not scope["query_string"]:
                return await self._ping(scope, receive, send)
            if path == MESSAGES:
                return await self._messages(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _ping(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        found = self._admit(scope)
        if found is None:
            return await self.app(scope, receive, send)
        admitted, origin, _ = found
        if admitted.wait > 0:  # Quart answers the 429 (problem body, headers) with this admission
            return await self._hand_on(scope, receive, send, admitted)
        status, body = await routes.ping_body(self.ctx, admitted.principal)
        headers = {"Content-Type": _JSON, **routes.ping_headers(admitted)}
        await self._respond(scope, send, admitted, origin, PING, status, body, headers)

    async def _messages(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        raw_query = scope["query_string"]
        found = self._admit(scope) if raw_query.isascii() else None
        if found is None:
            return await self.app(scope, receive, send)
        admitted, origin, if_none_match = found
        principal = admitted.principal
        if admitted.wait > 0 or principal is None or not principal.may(self._messages_role):
            return await self._hand_on(scope, receive, send, admitted)  # 429, 401, 403
        try:
            given = parse_qs(raw_query.decode("ascii"), keep_blank_values=True, errors="strict")
            query = routes.message_query(given)
            tasks = self._extensions.get("gateway.tasks")
            cached = await routes.page_of(self.ctx, query, cast(trio.Nursery | None, tasks))
        except (ApiError, ValueError, StoreError):
            # Quart parses and reads again and answers the problem (400, 503) as always.
            return await self._hand_on(scope, receive, send, admitted)
        headers = {"ETag": cached.etag, "Cache-Control": routes.PAGE_CACHE_CONTROL}
        if routes.not_modified(cached, if_none_match):
            await self._respond(scope, send, admitted, origin, MESSAGES, 304, b"", headers)
        else:
            headers["Content-Type"] = _JSON
            await self._respond(scope, send, admitted, origin, MESSAGES, 200, cached.body, headers)

    def _admit(self, scope: HTTPScope) -> tuple[Admission, str | None, str | None] | None:
        """The gate's admission, the Origin and If-None-Match headers; None when the request has a
        body (Quart reads and limits it)."""
        x_api_key = authorization = origin = if_none_match = None
        forwarded: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                x_api_key = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"if-none-match":
                if_none_match = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
            elif name in (b"content-length", b"transfer-encoding"):
                return None
        client = scope.get("client")
        admitted = self.gate.admit(
            self.ctx.settings.http,
            time.perf_counter(),
            x_api_key=x_api_key,
            authorization=authorization,
            access_token=None,
            peer=client[0] if client else None,
            forwarded_for=forwarded,
        )
        return admitted, origin, if_none_match

    async def _hand_on(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, admitted: Admission
    ) -> None:
        await self.app(cast(HTTPScope, {**scope, ADMITTED: admitted}), receive, send)

    async def _respond(
        self,
        scope: HTTPScope,
        send: ASGISendCallable,
        admitted: Admission,
        origin: str | None,
        route: str,
        status: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        if status != 304:
            headers["Content-Length"] = str(len(body))
        self.gate.finish_headers(
            headers,
            self.ctx.settings.http,
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
            route=route,
            method="GET",
            status=status,
            elapsed=time.perf_counter() - admitted.started,
            principal=admitted.principal,
            request_id=admitted.request_id,
            path=scope["path"],
            query_string=scope["query_string"],
        )
