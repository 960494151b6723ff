"""RFC 9457 problem responses with the contract's stable ``code`` values.

Every error leaves as ``application/problem+json``: ``type``, ``title``, ``status``, ``code``,
``detail`` and the ``request_id`` also sent in ``X-Request-ID``. Codes, statuses and titles come
from :class:`gateway.errors.ProblemCode`. Only our own faults become 500 ``internal``; they are
logged with a traceback, and the body never carries a trace or a secret.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, g
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from gateway.errors import ApiError, ConfigError, GatewayError, MqttUnavailable, ProblemCode, StoreUnavailable

log = logging.getLogger("gateway.http")

PROBLEM_TYPE = "application/problem+json"

# The code of an error the HTTP layer raises itself (routing, body size, content negotiation).
_HTTP_CODES: dict[int, ProblemCode] = {
    400: ProblemCode.BAD_REQUEST,
    401: ProblemCode.AUTH_MISSING,
    403: ProblemCode.FORBIDDEN,
    404: ProblemCode.NOT_FOUND,
    405: ProblemCode.METHOD_NOT_ALLOWED,
    406: ProblemCode.NOT_ACCEPTABLE,
    413: ProblemCode.PAYLOAD_TOO_LARGE,
    415: ProblemCode.UNSUPPORTED_MEDIA_TYPE,
    429: ProblemCode.RATE_LIMITED,
}
_HTTP_DETAILS: dict[int, str] = {
    404: "no such resource",
    405: "method not allowed on this resource",
    413: "request body is too large",
}
# A dependency that failed a request: what the log says it was, and what the client is told (the
# error text, which may name hosts, goes to the log only; a query timeout's names the limit).
_UNAVAILABLE: dict[ProblemCode, tuple[str, str]] = {
    ProblemCode.DB_UNAVAILABLE: ("database unavailable", "the database is unavailable; retry later"),
    ProblemCode.QUERY_TIMEOUT: (
        "query stopped",
        "{error}; narrow the query (start_time/end_time, device_id) or retry later",
    ),
    ProblemCode.MQTT_UNAVAILABLE: ("broker unavailable", "the broker is unavailable; retry later"),
}
_RETRY_AFTER = {"Retry-After": "5"}


def problem(
    code: ProblemCode,
    detail: str,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Build a problem+json response for ``code``, with the code's status unless ``status`` is given."""
    status = code.status if status is None else status
    body: dict[str, Any] = {
        "type": f"about:blank#{code}" if code is not ProblemCode.INTERNAL else "about:blank",
        "title": code.summary,
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
    """Install the handlers that turn every exception into a problem response.

    Quart picks the handler of the most specific class, so a :class:`QueryTimeout` (a
    StoreUnavailable) answers with its own code and an unexpected exception with ``internal``.
    """
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(RequestSchemaValidationError, _schema_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(StoreUnavailable, _unavailable)
    app.register_error_handler(MqttUnavailable, _unavailable)
    app.register_error_handler(ConfigError, _config)
    app.register_error_handler(Exception, _internal)


async def _api_error(exc: ApiError) -> Response:
    return problem(exc.code, exc.detail, headers=exc.headers, **exc.extra)


async def _schema_error(exc: RequestSchemaValidationError) -> Response:
    return problem(ProblemCode.QUERY_INVALID, "request does not match the schema")


async def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, ProblemCode.INTERNAL if status >= 500 else ProblemCode.BAD_REQUEST)
    headers: dict[str, str] = {}
    if status == 405:
        valid = getattr(exc, "valid_methods", None) or []
        headers["Allow"] = ", ".join(sorted(valid))
    detail = _HTTP_DETAILS.get(status, exc.description or code.summary)
    return problem(code, detail, status=status, headers=headers)


async def _unavailable(exc: GatewayError) -> Response:
    """503 with ``Retry-After`` for the database or the broker (its ``code`` says which)."""
    what, detail = _UNAVAILABLE.get(exc.code, _UNAVAILABLE[ProblemCode.DB_UNAVAILABLE])
    log.warning("%s: %s (request %s)", what, exc, g.get("request_id"))
    return problem(exc.code, detail.format(error=exc), headers=_RETRY_AFTER)


async def _config(exc: ConfigError) -> Response:
    log.warning("configuration refused, the running one stays: %s (request %s)", exc, g.get("request_id"))
    return problem(exc.code, str(exc), variable=exc.variable)


async def _internal(exc: Exception) -> Response:
    log.error("internal error (request %s)", g.get("request_id"), exc_info=exc)
    return problem(ProblemCode.INTERNAL, "internal error; quote the request id when reporting it")
