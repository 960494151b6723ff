"""What every request goes through on the Quart side: admission (request id, rate limit, API key),
the body read before anything answers, the role check; then the response headers, the access log
line and the request metrics. :func:`install` registers them as the app's before/after hooks.

The work itself lives in :class:`~gateway.http.gate.Gate` (shared with the raw routes of
:mod:`gateway.http.fast`, which admit a request themselves and hand it on admitted); this module
only reads the request and answers with the API's errors.
"""

from __future__ import annotations

import time
from typing import cast

from quart import Response, g, request
from quart_trio import QuartTrio

from gateway import metrics
from gateway.errors import ApiError, ProblemCode
from gateway.http.auth import Role
from gateway.http.context import AppContext
from gateway.http.fast import ADMITTED
from gateway.http.gate import Admission, Gate
from gateway.http.openapi import ApiSpec, spec_of
from gateway.http.ratelimit import retry_after_header
from gateway.settings import HttpSettings


def install(app: QuartTrio, ctx: AppContext, gate: Gate) -> None:
    """Run every request of ``app`` through ``gate``; settings are read from ``ctx`` per request."""
    hooks = _Hooks(app, ctx, gate)
    app.before_request(hooks.before)
    app.after_request(hooks.after)


class _Hooks:
    def __init__(self, app: QuartTrio, ctx: AppContext, gate: Gate) -> None:
        self._app = app
        self._ctx = ctx
        self._gate = gate

    async def before(self) -> None:
        """Admit the request (429 over the rate limit), read its body, check its key's role.

        Raises :class:`ApiError` (401 ``auth_missing``/``auth_invalid``, 403 ``forbidden``, 429).
        """
        http = self._ctx.settings.http
        # Keeps the body limit live across reloads (Quart reads it when a request starts).
        self._app.config["MAX_CONTENT_LENGTH"] = http.max_body
        spec = spec_of(self._app.view_functions.get(request.endpoint)) if request.endpoint else None
        # A raw route (gateway.http.fast) that hands a request on has admitted it already.
        admitted = cast(Admission | None, request.scope.get(ADMITTED))
        if admitted is None:
            admitted = self._admit(http, spec)
        g.admitted = admitted
        g.request_id = admitted.request_id
        g.principal = admitted.principal
        # (The 429 then closes the connection, see after.)
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
        _authorize(http, admitted, spec.role)

    def _admit(self, http: HttpSettings, spec: ApiSpec | None) -> Admission:
        token = request.args.get("access_token") if spec is not None and spec.query_token else None
        return self._gate.admit(
            http,
            time.perf_counter(),
            x_api_key=request.headers.get("X-API-Key"),
            authorization=request.headers.get("Authorization"),
            access_token=token,
            peer=request.remote_addr,
            forwarded_for=request.headers.getlist("X-Forwarded-For"),
        )

    async def after(self, response: Response) -> Response:
        """Set the response headers, log the request and count it in the metrics."""
        gate = self._gate
        admitted: Admission | None = g.get("admitted")
        request_id = admitted.request_id if admitted is not None else gate.request_id()
        started = admitted.started if admitted is not None else time.perf_counter()
        gate.finish_headers(
            response.headers,
            self._ctx.settings.http,
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


def _authorize(http: HttpSettings, admitted: Admission, role: Role) -> None:
    """Refuse a request without a valid key of ``role`` (or a higher one)."""
    principal = admitted.principal
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
    if not principal.may(role):
        raise ApiError(ProblemCode.FORBIDDEN, f"this needs the {role} role; the key has {principal.role}")
