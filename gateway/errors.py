"""The gateway's error tree, and the stable problem codes the API answers with.

Every exception class of ``gateway/`` is defined here, but one (below). Each line: the class, who
raises it → who catches it, and what follows::

    GatewayError               the root; ``code`` is the problem code the API answers with when the
    │                          error reaches a request (``internal`` unless the class says otherwise)
    ├── ConfigError            settings, secrets, app.reload → cli (exit 2); reload: 400 config_invalid
    ├── RuleError              rules.load_rules → app (at start: exit 2; on reload: a ConfigError)
    ├── StartupRefused         app.Gateway.run, a refusal before all started → cli (exit 3)
    ├── StoreError             store/ (only as its subclasses) → routes (/ping backlog, page rebuild)
    │   ├── StoreUnavailable   store/: unreachable, timed out → ingest, processor, publish, hub and
    │   │   │                  the stores retry with backoff; API 503 db_unavailable
    │   │   ├── QueryTimeout   store/, an API read past API_QUERY_TIMEOUT → API 503 query_timeout
    │   │   └── StoreAccessRefused  store/postgres: credentials, role or database refused → health
    │   │                      ``refused`` (exit 3 while starting), retried like an outage after
    │   └── StoreCorrupt       store/, migrate, ingest: schema or data not as expected (a bug, a bad
    │       │                  migration) → the supervisor restarts the group; API 500 internal
    │       └── StoreRefused   store/ write_batch: the database refuses a value → ingest splits the
    │                          batch and stores the refused rows as ``unstorable`` rejects
    ├── MqttUnavailable        mqtt.MqttBridge.publish_nowait, queue full → alerts (logged); API 503
    │                          mqtt_unavailable
    ├── PacketInvalid          packets.parse_packet, ingest → ingest (stored as a reject)
    ├── ActionFailed           actions/script, processor → processor (the message is retried with
    │                          backoff, counted per action)
    ├── ComponentExited        supervisor, a run() that returned uncancelled → supervisor (restart)
    ├── SimulateError          simulate: bad --url, no broker → simulate.main (exit 1)
    ├── DemoError              demo: no broker installed, a child that would not start or stopped
    │                          → demo.main (exit 1, with the end of that child's log)
    └── ApiError               http/: routes, request hooks, SSE limits → http.errors (the problem
                               response of its ``code``)

Outside the tree: :class:`gateway.mqtt_codec.MqttCodecError` (a ``ValueError``), a malformed frame
from the broker. The codec is pure and imports nothing of the gateway, so it can be read, tested and
reused on its own (as h11's and hypercorn's protocol errors are); its error never leaves
:mod:`gateway.mqtt`, which catches it where it feeds the codec and drops the connection (the bridge
reconnects), so no caller ever needs to catch it as a gateway error.

Library exceptions are translated once, at the boundary that calls the library, with
``raise ... from exc`` so the cause stays in the traceback but never in a response body.

:class:`ProblemCode` is the one list of the ``code`` values of problem+json bodies (CONTRACT.md),
each with its HTTP status and title: :class:`ApiError`, the handlers of :mod:`gateway.http.errors`
and the OpenAPI description (:mod:`gateway.http.openapi`) all take them from it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ProblemCode(StrEnum):
    """The stable code of a problem+json body, which clients branch on: add codes, never rename one.

    Each comes with its HTTP status and its title. The HTTP layer also answers bad_request for
    other 4xx statuses and internal for other 5xx ones.
    """

    # (The docstring is the OpenAPI description of the enum, hence plain text: no reST markup.)

    status: int
    summary: str

    def __new__(cls, code: str, status: int, summary: str) -> ProblemCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.summary = summary
        return member

    BAD_REQUEST = "bad_request", 400, "Bad request"
    PACKET_INVALID = "packet_invalid", 400, "Packet invalid"
    QUERY_INVALID = "query_invalid", 400, "Query invalid"
    CONFIG_INVALID = "config_invalid", 400, "Configuration invalid"
    AUTH_MISSING = "auth_missing", 401, "API key missing"
    AUTH_INVALID = "auth_invalid", 401, "API key invalid"
    FORBIDDEN = "forbidden", 403, "Role not allowed"
    NOT_FOUND = "not_found", 404, "Not found"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "Method not allowed"
    NOT_ACCEPTABLE = "not_acceptable", 406, "Not acceptable"
    PAYLOAD_TOO_LARGE = "payload_too_large", 413, "Payload too large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415, "Unsupported media type"
    RATE_LIMITED = "rate_limited", 429, "Too many requests"
    TOO_MANY_STREAMS = "too_many_streams", 429, "Too many streams"
    INTERNAL = "internal", 500, "Internal error"
    DB_UNAVAILABLE = "db_unavailable", 503, "Database unavailable"
    QUERY_TIMEOUT = "query_timeout", 503, "Query took too long"
    MQTT_UNAVAILABLE = "mqtt_unavailable", 503, "Broker unavailable"
    SHUTTING_DOWN = "shutting_down", 503, "Server stopping"
    STREAMS_EXHAUSTED = "streams_exhausted", 503, "Streams exhausted"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose.

    ``code`` is what the API answers should the error reach a request (see the module docstring).
    """

    code: ProblemCode = ProblemCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(GatewayError):
    """A configuration value is invalid; ``variable`` names it (e.g. ``MQTT_URL``)."""

    code = ProblemCode.CONFIG_INVALID

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class StoreError(GatewayError):
    """Something went wrong talking to the database."""

    code = ProblemCode.DB_UNAVAILABLE


class StoreUnavailable(StoreError):
    """The database cannot be reached right now; the caller should retry with backoff."""


class QueryTimeout(StoreUnavailable):
    """A read (an API query) ran longer than its time limit and was stopped; the database is fine.

    Narrow the query (a time range, a device) or retry later.
    """

    code = ProblemCode.QUERY_TIMEOUT


class StoreAccessRefused(StoreUnavailable):
    """The database refused us for a reason no retry fixes (bad password, unknown role or database).

    Ends the start with exit code 3; once the gateway runs it is retried like any outage, since an
    operator may fix it (create the role) without restarting the gateway.
    """


class StoreCorrupt(StoreError):
    """The database answered, but not as the gateway expects (schema missing, bad data)."""

    code = ProblemCode.INTERNAL  # our fault, not an outage: no Retry-After would help


class StoreRefused(StoreCorrupt):
    """The database refused the data of a write (PostgreSQL class 22/23, a value sqlite3 cannot
    bind): retrying the same rows cannot help, so ingest isolates and rejects them."""


class MqttUnavailable(GatewayError):
    """The broker is not connected; a publish was queued or refused."""

    code = ProblemCode.MQTT_UNAVAILABLE


class StartupRefused(GatewayError):
    """A component met an error no retry can fix while the gateway was starting (exit 3).

    ``component`` names it (``database``, ``mqtt``, ``http``); ``cause`` is one line.
    """

    def __init__(self, component: str, cause: str) -> None:
        super().__init__(f"{component}: {cause}")
        self.component = component
        self.cause = cause


class PacketInvalid(GatewayError):
    """A packet failed validation; ``errors`` lists field errors as ``{"loc", "msg", "type"}``."""

    code = ProblemCode.PACKET_INVALID

    def __init__(self, reason: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors


class RuleError(GatewayError):
    """A rule cannot be loaded; names the rule and the problem."""

    code = ProblemCode.CONFIG_INVALID

    def __init__(self, rule: str, problem: str) -> None:
        super().__init__(f"rule {rule!r}: {problem}")
        self.rule = rule
        self.problem = problem


class ActionFailed(GatewayError):
    """An action could not do its work for one message; the message is retried with backoff.

    ``action`` is the action type (``sse``, ``mqtt``, ``script``), used as the metric label.
    """

    def __init__(self, action: str, problem: str) -> None:
        super().__init__(f"{action}: {problem}")
        self.action = action
        self.problem = problem


class ComponentExited(GatewayError):
    """A component's ``run()`` returned although nobody cancelled it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"component {name!r} exited unexpectedly")
        self.name = name


class SimulateError(GatewayError):
    """The simulator could not connect or lost its broker connection."""


class DemoError(GatewayError):
    """``gateway demo`` could not start, or one of its children stopped by itself."""


class ApiError(GatewayError):
    """A request the API refuses: ``code`` (its HTTP status comes with it, ``status``), a detail for
    people, response ``headers`` and ``extra`` members of the problem body (``parameter``, ...)."""

    def __init__(self, code: ProblemCode, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    @property
    def status(self) -> int:
        """The HTTP status of the answer (the code's)."""
        return self.code.status
