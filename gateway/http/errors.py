"""RFC 9457 problem responses with the contract's stable ``code`` values.

Every error leaves as ``application/problem+json``: ``type``, ``title``, ``status``, ``code``,
``detail`` and the ``request_id`` also sent in ``X-Request-ID``. Only our own faults become 500
``internal``; they are logged with a traceback, and the body never carries a trace or a secret.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, g
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from gateway.errors import ConfigError, MqttUnavailable, QueryTimeout, StoreUnavailable

log = logging.getLogger("gateway.http")

PROBLEM_TYPE = "application/problem+json"

TITLES: dict[str, str] = {
    "auth_missing": "API key missing",
    "auth_invalid": "API key invalid",
    "forbidden": "Role not allowed",
    "rate_limited": "Too many requests",
    "not_found": "Not found",
    "method_not_allowed": "Method not allowed",
    "packet_invalid": "Packet invalid",
    "query_invalid": "Query invalid",
    "config_invalid": "Configuration invalid",
    "bad_request": "Bad request",
    "payload_too_large": "Payload too large",
    "unsupported_media_type": "Unsupported media type",
    "not_acceptable": "Not acceptable",
    "db_unavailable": "Database unavailable",
    "query_timeout": "Query took too long",
    "mqtt_unavailable": "Broker unavailable",
    "shutting_down": "Server stopping",
    "internal": "Internal error",
}

_HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "auth_missing",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    """An error the API answers with: status, stable code, a human detail and extra members."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """Build a problem+json response."""
    body: dict[str, Any] = {
        "type": f"about:blank#{code}" if code != "internal" else "about:blank",
        "title": TITLES.get(code, code.replace("_", " ").capitalize()),
        "status": status,
        "code": code,
        "detail": detail,
    }
    request_id = g.get("request_id") if g else None
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    response = Response(json.dumps(body), status=status, content_type=PROBLEM_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register(app: Quart) -> None:
    """Install the handlers that turn every exception into a problem response."""

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return problem(exc.status, exc.code, exc.detail, headers=exc.headers, **exc.extra)

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema_error(exc: RequestSchemaValidationError) -> Response:
        return problem(400, "query_invalid", "request does not match the schema")

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "internal" if status >= 500 else "bad_request")
        headers: dict[str, str] = {}
        if status == 405:
            valid = getattr(exc, "valid_methods", None) or []
            headers["Allow"] = ", ".join(sorted(valid))
        detail = {
            404: "no such resource",
            405: "method not allowed on this resource",
            413: "request body is too large",
        }.get(status, exc.description or TITLES.get(code, "error"))
        return problem(status, code, detail, headers=headers)

    @app.errorhandler(StoreUnavailable)
    async def _db(exc: StoreUnavailable) -> Response:
        log.warning("database unavailable: %s (request %s)", exc, g.get("request_id"))
        return problem(503, "db_unavailable", "the database is unavailable; retry later", headers={"Retry-After": "5"})

    @app.errorhandler(QueryTimeout)
    async def _query_timeout(exc: QueryTimeout) -> Response:
        # Checked before StoreUnavailable (Quart picks the handler of the most specific class).
        log.warning("query stopped: %s (request %s)", exc, g.get("request_id"))
        return problem(
            503,
            "query_timeout",
            f"{exc}; narrow the query (start_time/end_time, device_id) or retry later",
            headers={"Retry-After": "5"},
        )

    @app.errorhandler(MqttUnavailable)
    async def _mqtt(exc: MqttUnavailable) -> Response:
        log.warning("broker unavailable: %s (request %s)", exc, g.get("request_id"))
        return problem(503, "mqtt_unavailable", "the broker is unavailable; retry later", headers={"Retry-After": "5"})

    @app.errorhandler(ConfigError)
    async def _config(exc: ConfigError) -> Response:
        log.warning("configuration refused, the running one stays: %s (request %s)", exc, g.get("request_id"))
        return problem(400, "config_invalid", str(exc), variable=exc.variable)

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        log.error("internal error (request %s)", g.get("request_id"), exc_info=exc)
        return problem(500, "internal", "internal error; quote the request id when reporting it")
