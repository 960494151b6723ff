"""The API's OpenAPI description: response models, the ``@api`` decorator, and a provider that
declares every response a route can give (problem+json errors included), so the description is true.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field
from quart_schema import (
    APIKeySecurityScheme,
    HttpSecurityScheme,
    OpenAPIProvider,
    document_headers,
    document_querystring,
    document_request,
)
from werkzeug.routing import Rule

from gateway.errors import ProblemCode
from gateway.http.auth import Role
from gateway.packets import DEVICE_ID_PATTERN, MEASUREMENT_NAME_PATTERN
from gateway.rollups import BUCKET_PATTERN

F = TypeVar("F", bound=Callable[..., Any])
SPEC_ATTR = "_gateway_api_spec"
EVENT_TYPE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
TYPES_PATTERN = r"^[A-Za-z0-9._-]{1,64}(,[A-Za-z0-9._-]{1,64}){0,15}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
# A time in a response body: RFC 3339 in UTC (``...Z``), as text (the routes build the bodies).
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


# ---- response bodies ----------------------------------------------------------------------------


def _codes_table() -> str:
    """The description of ``Problem.code``: every code with its status and title, in Markdown."""
    rows = [f"| `{c}` | {c.status} | {c.summary} |" for c in ProblemCode]
    head = ["What went wrong, stable: branch on it, not on `detail`.", "", "| code | status | title |", "|---|---|---|"]
    return "\n".join(head + rows)


class FieldError(BaseModel):
    """One reason a packet was refused (the input value itself is never echoed)."""

    loc: list[str] = Field(description="Where: the path of keys to the field, empty for the whole packet")
    msg: str = Field(description="What is wrong, for people")
    type: str = Field(description="A machine-readable kind, e.g. `missing`, `bad_json`, `too_large`")


class Problem(BaseModel):
    """An RFC 9457 problem (`application/problem+json`): the stable `code` says what went wrong.

    Members beyond the standard ones appear with the codes that set them.
    """

    type: str = Field(description="`about:blank#<code>` (`about:blank` for `internal`)")
    title: str = Field(description="The code's title, for people")
    status: int = Field(description="The HTTP status, repeated")
    code: ProblemCode = Field(description=_codes_table())
    detail: str = Field(description="This occurrence in words, for people; may change between versions")
    request_id: str | None = Field(None, description="Also in `X-Request-ID` and the gateway's log: quote it")
    parameter: str | None = Field(None, description="`query_invalid`: the query parameter refused")
    reason: str | None = Field(
        None,
        description="`packet_invalid`: why the packet was refused, as stored with the reject "
        "(`schema`, `bad_json`, `bad_encoding`, `not_an_object`, `too_large`, `unstorable`, ...)",
    )
    errors: list[FieldError] | None = Field(None, description="`packet_invalid`: the field errors")
    variable: str | None = Field(None, description="`config_invalid`: the configuration variable refused")
    limit: int | None = Field(None, description="`too_many_streams`, `streams_exhausted`: the limit reached")


class PacketStored(BaseModel):
    """The stored reading's id; ``duplicate`` is true for a redelivery of a stored packet."""

    id: int
    duplicate: bool = False


class Ping(BaseModel):
    """Liveness; with a valid key also component detail."""

    status: Literal["starting", "ok", "degraded"]
    time: Timestamp
    version: str | None = None
    uptime_seconds: float | None = None
    components: dict[str, Any] | None = None
    backlog: dict[str, Any] | None = None
    sse_clients: int | None = None
    devices: int | None = None


class ReloadResult(BaseModel):
    """What a reload changed (variable names only) and which components it restarted."""

    changed: list[str]
    restarted: list[str]


class Reading(BaseModel):
    """A stored reading as `/latest` shows it (no processing state)."""

    id: int
    device_id: str
    timestamp: Timestamp
    received_at: Timestamp
    seq: int | None
    measurements: dict[str, float | int]
    status: str
    battery: float | None
    source: str
    schema_version: int = Field(description="The packet schema version it was validated against")


class MessageItem(Reading):
    """A stored reading with its processing state."""

    processed_at: Timestamp | None
    attempts: int
    last_error: str | None
    dead: bool


class MessagePage(BaseModel):
    """One page of readings, newest first, with the total matching and the next page's cursor."""

    items: list[MessageItem]
    total: int
    total_capped: bool = Field(False, description="total is a lower bound: more match than API_TOTAL_LIMIT")
    next_cursor: str | None


class RejectItem(BaseModel):
    """A refused packet with its reason and field errors."""

    id: int
    received_at: Timestamp
    source: str
    topic: str | None
    payload: str
    reason: str
    errors: list[dict[str, Any]]
    schema_version: int = Field(description="The packet schema version that refused it (last replay: the newest)")
    replayed_at: Timestamp | None = Field(description="When a replay last stored it as a reading")
    message_id: int | None = Field(description="That reading's id")


class RejectPage(BaseModel):
    """One page of rejects, newest first."""

    items: list[RejectItem]
    total: int
    total_capped: bool = Field(False, description="total is a lower bound: more match than API_TOTAL_LIMIT")
    next_cursor: str | None


class AggregateItem(BaseModel):
    """One bucket with readings: its start, the figure asked for, and how many readings it holds."""

    bucket_start: Timestamp = Field(description="RFC 3339, UTC")
    value: float
    count: int


class AggregateResult(BaseModel):
    """Buckets of one measurement of one device, oldest first; empty buckets are left out."""

    device_id: str
    measurement: str
    bucket: str
    agg: str
    start_time: Timestamp = Field(description="start_time rounded down to the bucket size")
    end_time: Timestamp = Field(description="end_time rounded up to the bucket size (exclusive)")
    source: Literal["rollup", "raw"] = Field(description="rollup: from ROLLUP_INTERVALS; raw: from the readings")
    items: list[AggregateItem]


class ReplayBody(BaseModel):
    """Which rejects to replay: ``ids``, or ``start_time`` and ``end_time`` (received in
    ``[start_time, end_time)``); ``reason`` narrows either. ``cursor`` comes from ``next_cursor``."""

    ids: Annotated[list[Annotated[int, Field(ge=1, le=2**63 - 1)]] | None, Field(min_length=1, max_length=10_000)] = (
        None
    )
    start_time: datetime | None = Field(None, description="RFC 3339 with a zone offset")
    end_time: datetime | None = Field(None, description="RFC 3339 with a zone offset, after start_time")
    reason: Annotated[str | None, Field(pattern=EVENT_TYPE_PATTERN, description="e.g. `schema`")] = None
    limit: Annotated[int, Field(ge=1, le=10_000, description="rejects examined at most")] = 10_000
    cursor: Annotated[str | None, Field(pattern=CURSOR_PATTERN)] = None
    dry_run: bool = Field(False, description="validate and count only; change nothing")


class ReplayResultDoc(BaseModel):
    """What the replay did: ``examined`` = ``passed`` + ``still_rejected``; ``passed`` = ``stored``
    + ``duplicates`` (0 and 0 in a dry run). ``next_cursor``: more remain, continue with it."""

    examined: int
    passed: int
    stored: int
    duplicates: int
    still_rejected: int
    next_cursor: str | None
    dry_run: bool


class Latest(BaseModel):
    """The latest reading per device (in memory, loaded from the database at start-up)."""

    devices: dict[str, Reading]


class JsonSchemaDoc(BaseModel):
    """A JSON Schema document."""


# ---- request parameters (documentation; parsing is done by the routes, strictly) ----------------


class MessagesQuery(BaseModel):
    """Filters for GET /messages. ``value`` needs ``key``; ``cursor`` comes from ``next_cursor``."""

    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    start_time: datetime | None = Field(None, description="RFC 3339 with a zone offset")
    end_time: datetime | None = Field(None, description="RFC 3339 with a zone offset")
    device_id: Annotated[str | None, Field(pattern=DEVICE_ID_PATTERN)] = None
    key: Annotated[str | None, Field(pattern=MEASUREMENT_NAME_PATTERN, description="field or measurement")] = None
    value: Annotated[
        str | None, Field(min_length=1, max_length=256, description="compared as a number when numeric")
    ] = None
    cursor: Annotated[str | None, Field(pattern=CURSOR_PATTERN)] = None


class AggregateQueryDoc(BaseModel):
    """Parameters of GET /messages/aggregate. The range is widened to whole buckets (aligned to the
    Unix epoch, UTC) and holds at most 10,000 of them."""

    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
    measurement: Annotated[str, Field(pattern=MEASUREMENT_NAME_PATTERN)]
    bucket: Annotated[str, Field(pattern=BUCKET_PATTERN, description="a duration: 15m, 1h, 1d, 1w")] = "1h"
    agg: Literal["avg", "min", "max", "count"] = "avg"
    start_time: datetime | None = Field(None, description="RFC 3339 with a zone offset; default end_time - 24 h")
    end_time: datetime | None = Field(None, description="RFC 3339 with a zone offset; default now")


class RejectsQuery(BaseModel):
    """Paging for GET /rejects."""

    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    cursor: Annotated[str | None, Field(pattern=CURSOR_PATTERN)] = None


class EventsQuery(BaseModel):
    """Filters and resume point for the event stream."""

    device_id: Annotated[str | None, Field(pattern=DEVICE_ID_PATTERN)] = None
    types: Annotated[
        str | None,
        Field(
            pattern=TYPES_PATTERN,
            description="comma-separated event types: `packet`, `alert`, `reset` and those the rules emit; "
            "any other is refused (400 `query_invalid`)",
        ),
    ] = None
    last_event_id: Annotated[int | None, Field(ge=0, le=2**63 - 1)] = None
    access_token: str | None = Field(None, description="API key, for EventSource (cannot send headers)")


class EventsHeaders(BaseModel):
    """Resume point sent by EventSource on reconnect."""

    last_event_id: Annotated[int | None, Field(ge=0, le=2**63 - 1)] = None


# ---- the decorator ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiSpec:
    """How a route is authorised and what it answers: ``ok`` bodies by status, and the problem codes
    it may refuse with besides those of every route (:data:`EVERY_ROUTE`, :data:`PROTECTED`)."""

    role: Role | None
    ok: dict[int, tuple[type[BaseModel] | None, str]]
    errors: tuple[ProblemCode, ...] = ()
    query_token: bool = False
    ok_headers: tuple[tuple[str, str], ...] = ()  # (header, description) on its ok responses


def api(
    *,
    role: Role | None,
    ok: dict[int, tuple[type[BaseModel] | None, str]],
    errors: Iterable[ProblemCode] = (),
    query: type[BaseModel] | None = None,
    headers: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    query_token: bool = False,
    ok_headers: dict[str, str] | None = None,
) -> Callable[[F], F]:
    """Attach the route's role and responses (read by the app's auth hook and the provider).

    ``ok_headers``: header name → description, documented on the ok responses.
    """

    def decorator(func: F) -> F:
        extra = tuple((ok_headers or {}).items())
        setattr(func, SPEC_ATTR, ApiSpec(role, ok, tuple(errors), query_token, extra))
        if query is not None:
            func = document_querystring(query)(func)
        if headers is not None:
            func = document_headers(headers)(func)
        if body is not None:
            func = document_request(body)(func)
        return func

    return decorator


def spec_of(func: Callable[..., Any] | None) -> ApiSpec | None:
    """The :class:`ApiSpec` of a view function, if it has one."""
    return getattr(func, SPEC_ATTR, None) if func is not None else None


# ---- the provider -------------------------------------------------------------------------------

#: Problem codes any route may answer with, and those of every route that needs a role.
EVERY_ROUTE = (ProblemCode.RATE_LIMITED, ProblemCode.INTERNAL)
PROTECTED = (ProblemCode.AUTH_MISSING, ProblemCode.AUTH_INVALID, ProblemCode.FORBIDDEN)
_DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    304: "Not modified (ETag matches)",
    400: "Invalid request",
    401: "API key missing or invalid",
    403: "The key's role is not allowed",
    404: "Not found",
    413: "Body too large",
    415: "Body is not JSON",
    429: "Too many requests",
    500: "Internal error (quote the request id)",
    503: "Unavailable for now: retry after `Retry-After` seconds",
}
_HEADER_REF = {"X-Request-ID": {"description": "Request id, also in logs", "schema": {"type": "string"}}}
_SECURITY: list[dict[str, list[str]]] = [{"ApiKeyHeader": []}, {"BearerAuth": []}]
SECURITY_SCHEMES: dict[str, Any] = {
    "ApiKeyHeader": APIKeySecurityScheme(name="X-API-Key", in_="header"),
    "BearerAuth": HttpSecurityScheme(scheme="bearer"),
    "AccessToken": APIKeySecurityScheme(name="access_token", in_="query"),
}


def _schema_of(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    if model is JsonSchemaDoc:
        return {"type": "object"}
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_ROLE_TEXT: dict[Role | None, str] = {
    None: "**Role:** none, public (a key adds detail where the description says so).",
    "read": "**Role:** `read` (a `write` or `admin` key also may).",
    "write": "**Role:** `write` (an `admin` key also may).",
    "admin": "**Role:** `admin`.",
}
ROLE_EXTENSION = "x-required-role"  # the lowest role a key needs; "none" for public operations
_RST_LITERAL = re.compile(r"``(.+?)``", re.S)


def markdown(text: str) -> str:
    """Docstring text as Markdown: reStructuredText literals (two backticks) become code spans."""
    return _RST_LITERAL.sub(r"`\1`", text)


def _as_markdown(node: Any) -> Any:
    """``node`` (a piece of the spec) with every ``description`` and ``summary`` in Markdown."""
    if isinstance(node, dict):
        return {
            k: markdown(v) if k in ("description", "summary") and isinstance(v, str) else _as_markdown(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_as_markdown(v) for v in node]
    return node


class GatewayOpenAPIProvider(OpenAPIProvider):
    """quart-schema's provider, with every response of every route declared from its ``@api`` spec,
    the role each operation needs (in its description and as ``x-required-role``), and every
    description in Markdown (docstrings are written with reST literals).

    The role is an extension, not security requirement scopes: OpenAPI 3.1 lets an API key
    scheme list role names, but as roles *all* required, which cannot say "read, or any higher".
    """

    def schema(self) -> dict[str, Any]:
        spec: dict[str, Any] = _as_markdown(super().schema())
        return spec

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        func = self._app.view_functions[rule.endpoint]
        spec = spec_of(func)
        if spec is None:
            return paths, components
        for path_item in paths.values():
            for method, operation in list(path_item.items()):
                op = dict(operation)
                op["responses"] = self._responses(spec, components)
                if "requestBody" in op:
                    op["requestBody"] = {**op["requestBody"], "required": True}
                if spec.role is not None:
                    op["security"] = _SECURITY + ([{"AccessToken": []}] if spec.query_token else [])
                else:
                    op["security"] = []
                op[ROLE_EXTENSION] = spec.role or "none"
                op["description"] = "\n\n".join(
                    filter(None, [_ROLE_TEXT[spec.role], op.get("description", "").strip()])
                )
                path_item[method] = op
        return paths, components

    def _responses(self, spec: ApiSpec, components: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for status, (model, content_type) in spec.ok.items():
            response: dict[str, Any] = {"description": _DESCRIPTIONS.get(status, "OK"), "headers": dict(_HEADER_REF)}
            for name, text in spec.ok_headers:
                response["headers"][name] = {"description": text, "schema": {"type": "string"}}
            if status != 304:
                schema = _schema_of(model, components) if model is not None else {"type": "string"}
                response["content"] = {content_type: {"schema": schema}}
            out[str(status)] = response
        problem = _schema_of(Problem, components)
        by_status: dict[int, list[ProblemCode]] = {}
        for code in (*spec.errors, *EVERY_ROUTE, *(PROTECTED if spec.role is not None else ())):
            by_status.setdefault(code.status, []).append(code)
        for status, codes in sorted(by_status.items()):
            headers = dict(_HEADER_REF)
            if status in (429, 503):
                headers["Retry-After"] = {"description": "Seconds to wait", "schema": {"type": "string"}}
            listed = ", ".join(f"`{c}`" for c in codes)
            out[str(status)] = {
                "description": f"{_DESCRIPTIONS.get(status, 'Error')}: {listed}",
                "headers": headers,
                "content": {"application/problem+json": {"schema": problem}},
            }
        return out
