"""The gateway's error tree and the stable error codes the API returns.

::

    GatewayError
    ├── ConfigError            invalid configuration (exit 2, API 400 config_invalid)
    ├── StoreError
    │   ├── StoreUnavailable   database unreachable / timed out: retry later (API 503 db_unavailable)
    │   │   ├── QueryTimeout   one API read ran past API_QUERY_TIMEOUT (API 503 query_timeout)
    │   │   └── StoreAccessRefused  credentials refused, unknown role or database: no retry fixes it
    │   └── StoreCorrupt       schema or data not as expected (a bug or a bad migration)
    │       └── StoreRefused   the database refused a value of a row (that row can never be stored as is)
    ├── MqttUnavailable        broker unreachable (API 503 mqtt_unavailable)
    ├── StartupRefused         a component refused at start-up for good (exit 3)
    ├── PacketInvalid          a sensor packet refused by the schema (stored as a reject)
    └── RuleError              a rules file that cannot be used (refused at start-up)

Library exceptions are translated once, at the boundary that calls the library, with
``raise ... from exc`` so the cause stays in the traceback but never in a response body.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(GatewayError):
    """A configuration value is invalid; ``variable`` names it (e.g. ``MQTT_URL``)."""

    code = "config_invalid"

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class StoreError(GatewayError):
    """Something went wrong talking to the database."""

    code = "db_unavailable"


class StoreUnavailable(StoreError):
    """The database cannot be reached right now; the caller should retry with backoff."""


class QueryTimeout(StoreUnavailable):
    """A read (an API query) ran longer than its time limit and was stopped; the database is fine.

    Narrow the query (a time range, a device) or retry later.
    """

    code = "query_timeout"


class StoreAccessRefused(StoreUnavailable):
    """The database refused us for a reason no retry fixes (bad password, unknown role or database).

    Ends the start with exit code 3; once the gateway runs it is retried like any outage, since an
    operator may fix it (create the role) without restarting the gateway.
    """


class StoreCorrupt(StoreError):
    """The database answered, but not as the gateway expects (schema missing, bad data)."""

    code = "internal"


class StoreRefused(StoreCorrupt):
    """The database refused the data of a write (PostgreSQL class 22/23, a value sqlite3 cannot
    bind): retrying the same rows cannot help, so ingest isolates and rejects them."""


class MqttUnavailable(GatewayError):
    """The broker is not connected; a publish was queued or refused."""

    code = "mqtt_unavailable"


class StartupRefused(GatewayError):
    """A component met an error no retry can fix while the gateway was starting (exit 3).

    ``component`` names it (``database``, ``mqtt``, ``http``); ``cause`` is one line.
    """

    code = "startup_refused"

    def __init__(self, component: str, cause: str) -> None:
        super().__init__(f"{component}: {cause}")
        self.component = component
        self.cause = cause


class PacketInvalid(GatewayError):
    """A packet failed validation; ``errors`` lists field errors as ``{"loc", "msg", "type"}``."""

    code = "packet_invalid"

    def __init__(self, reason: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors


class RuleError(GatewayError):
    """A rule cannot be loaded; names the rule and the problem."""

    code = "config_invalid"

    def __init__(self, rule: str, problem: str) -> None:
        super().__init__(f"rule {rule!r}: {problem}")
        self.rule = rule
        self.problem = problem
