"""API v1 routes. Parameters are parsed strictly here (each mistake is a 400 naming the parameter);
the ``@api`` specs declare role and responses for the auth hook and the OpenAPI description."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, current_app, g, request

from gateway.errors import ApiError, ProblemCode, StoreError
from gateway.http.auth import Principal
from gateway.http.cache import Build, CachedBody
from gateway.http.context import AppContext
from gateway.http.gate import Admission
from gateway.http.openapi import (
    CURSOR_PATTERN,
    EVENT_TYPE_PATTERN,
    AggregateQueryDoc,
    AggregateResult,
    EventsHeaders,
    EventsQuery,
    JsonSchemaDoc,
    Latest,
    MessagePage,
    MessagesQuery,
    PacketStored,
    Ping,
    RejectPage,
    RejectsQuery,
    ReloadResult,
    ReplayBody,
    ReplayResultDoc,
    api,
    spec_of,
)
from gateway.http.query import bad_parameter, parse_types
from gateway.http.sse import SseStreams
from gateway.ingest import Posted, observe, store_batch
from gateway.jsonenc import dumps
from gateway.packets import (
    DEVICE_ID_PATTERN,
    MAX_PACKET_BYTES,
    MEASUREMENT_NAME_PATTERN,
    Packet,
    packet_json_schema,
)
from gateway.replay import MAX_PER_REQUEST, ReplayRequest, replay
from gateway.rollups import AGGS, MAX_BUCKETS, Agg, AggregateQuery, format_interval, parse_interval
from gateway.store._query import MAX_ID, decode_cursor
from gateway.store.base import InsertOutcome, MessageQuery, NewMessage

log = logging.getLogger("gateway.http")

JSON = "application/json"
_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_KEY_RE = re.compile(MEASUREMENT_NAME_PATTERN)
_CURSOR_RE = re.compile(CURSOR_PATTERN)
_INT_RE = re.compile(r"^[0-9]{1,19}$")
_PACKET_SCHEMA: bytes | None = None
PAGE_CACHE_CONTROL = "private, no-cache"  # the ETag may be used, the page not reused unasked


def ctx() -> AppContext:
    """The application's context (set by ``create_app``)."""
    return cast(AppContext, current_app.extensions["gateway.ctx"])


def streams() -> SseStreams:
    """The SSE stream owner (run by ``serve``)."""
    return cast(SseStreams, current_app.extensions["gateway.sse"])


def json_response(body: Any, status: int = 200) -> Response:
    """A compact JSON response."""
    return Response(json.dumps(body, separators=(",", ":")), status=status, content_type=JSON)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# ---- strict parameter parsing -------------------------------------------------------------------


_bad = bad_parameter


def _args(allowed: frozenset[str], given: Mapping[str, list[str]] | None = None) -> dict[str, str]:
    """The query parameters (of this request, or ``given``), each at most once and all known."""
    out: dict[str, str] = {}
    source = given if given is not None else request.args.lists()
    for name, values in source.items() if isinstance(source, Mapping) else source:
        if name not in allowed:
            raise _bad(name, "unknown parameter")
        if len(values) != 1:
            raise _bad(name, "given more than once")
        out[name] = values[0]
    return out


def _int(args: dict[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    raw = args.get(name)
    if raw is None:
        return default
    if not _INT_RE.match(raw) or not low <= int(raw) <= high:
        raise _bad(name, f"must be an integer from {low} to {high}")
    return int(raw)


def _time(args: dict[str, str], name: str) -> datetime | None:
    raw = args.get(name)
    if raw is None:
        return None
    try:
        if len(raw) > 64:
            raise ValueError
        parsed = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise _bad(name, "needs a zone offset (RFC 3339, e.g. 2026-11-27T09:00:00Z)")
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _bad(name, "must be RFC 3339 with a zone offset, e.g. 2026-11-27T09:00:00Z") from None


def _match(args: dict[str, str], name: str, pattern: re.Pattern[str], what: str) -> str | None:
    raw = args.get(name)
    if raw is not None and not pattern.match(raw):
        raise _bad(name, what)
    return raw


# ---- routes -------------------------------------------------------------------------------------

# The problem codes of a route beyond those of every route (the OpenAPI description lists them).
_POST_PACKET = (
    ProblemCode.PACKET_INVALID,
    ProblemCode.PAYLOAD_TOO_LARGE,
    ProblemCode.UNSUPPORTED_MEDIA_TYPE,
    ProblemCode.DB_UNAVAILABLE,
)
_API_READ = (ProblemCode.QUERY_INVALID, ProblemCode.DB_UNAVAILABLE, ProblemCode.QUERY_TIMEOUT)
_EVENTS = (
    ProblemCode.QUERY_INVALID,
    ProblemCode.TOO_MANY_STREAMS,
    ProblemCode.STREAMS_EXHAUSTED,
    ProblemCode.SHUTTING_DOWN,
)


@api(role="write", ok={201: (PacketStored, JSON), 200: (PacketStored, JSON)}, errors=_POST_PACKET, body=Packet)
async def post_packet() -> Response:
    """Store a sensor packet

    Validated against the packet schema, stored idempotently (a redelivery answers 200 with the
    existing id); the processor is woken at once and publishes it to MQTT and SSE per the rules.
    An invalid packet is stored as a reject and answered 400.
    """
    c = ctx()
    limit = min(c.settings.http.max_body, MAX_PACKET_BYTES)
    mimetype = request.mimetype
    if mimetype != JSON and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        raise ApiError(ProblemCode.UNSUPPORTED_MEDIA_TYPE, "send the packet as application/json")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(ProblemCode.PAYLOAD_TOO_LARGE, f"a packet is at most {limit} bytes")
    body = cast(bytes, await request.get_data(cache=False, as_text=False))
    if len(body) > limit:
        raise ApiError(ProblemCode.PAYLOAD_TOO_LARGE, f"a packet is at most {limit} bytes")
    # The ingest path of MQTT batches, with a batch of one: validation, storing (a packet the
    # database refuses becomes an `unstorable` reject), metrics. The database down: 503.
    posted = Posted(body, datetime.now(UTC))
    stored = await store_batch(c.store.write_batch, [posted], "api", limit)
    observe([posted], stored, "api")
    if stored.rejects:
        reject = stored.rejects[0]
        raise ApiError(
            ProblemCode.PACKET_INVALID, f"packet refused: {reject.reason}", reason=reject.reason, errors=reject.errors
        )
    message, outcome = stored.messages[0], stored.outcomes[0]
    if outcome.duplicate:
        return json_response({"id": outcome.id, "duplicate": True}, 200)
    reading = message.to_json(outcome.id)
    c.pages.clear()  # read-your-writes: the next page read shows it
    c.latest.remember([reading])
    c.on_commit()
    # Publishing goes through the processor, woken just now by on_commit: one path for every
    # reading, carrying the event id: the processor writes the publish to the outbox in the commit
    # that marks the reading processed, and it is sent at least once (again after a crash).
    return json_response({"id": outcome.id, "duplicate": False}, 201)


@api(
    role=None,
    ok={200: (Ping, JSON), 503: (Ping, JSON)},
    ok_headers={
        "WWW-Authenticate": 'Sent when the key given is not valid (`Bearer realm="gateway", error="invalid_token"`): '
        "the body is then the answer without a key"
    },
)
async def ping() -> Response:
    """Liveness and, with any valid key, component detail

    Without a key: status and time. With a key: components, backlog and lag, SSE clients, uptime.
    Each component shows its state and a generic ``cause`` code; the error text (which names users
    and hosts) only to admin keys. 503 with status ``starting`` until every component has started.
    A key that is not valid gets the answer without a key, with the header
    ``WWW-Authenticate: Bearer realm="gateway", error="invalid_token"`` saying it was refused.
    """
    _args(frozenset())
    admitted: Admission = g.admitted
    status, body = await ping_body(ctx(), admitted.principal)
    return Response(body, status=status, content_type=JSON, headers=ping_headers(admitted))


# What ``/ping`` adds when the key sent matches no ``API_KEYS`` entry: the answer stays the
# public one (200), and this standard challenge (RFC 9110 allows it on any response, RFC 6750
# names the error) says the key was refused, so a client can tell "wrong key" from "no detail".
KEY_REFUSED = {"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'}


def ping_headers(admitted: Admission) -> dict[str, str]:
    """``/ping``'s own headers (both routes): :data:`KEY_REFUSED` for a key that is not valid."""
    return KEY_REFUSED if admitted.key is not None and admitted.principal is None else {}


async def ping_body(c: AppContext, principal: Principal | None) -> tuple[int, bytes]:
    """``/ping``'s status code and JSON body (also served by the raw route, gateway.http.fast).

    Reads memory only, but for the backlog (keys only), which comes from the database at most
    once a second (``c.backlog``, a :class:`~gateway.http.memo.Memo`).
    """
    status = c.health.overall
    body: dict[str, Any] = {"status": status, "time": _now()}
    if principal is not None:
        backlog: dict[str, Any] | None = None
        b = await c.backlog.get(c.store.backlog)  # at most once a second whatever the request rate
        if b is None:
            if status == "ok":
                body["status"] = "degraded"
        else:
            lag = (datetime.now(UTC) - b.oldest).total_seconds() if b.oldest else 0.0
            backlog = {"count": b.count, "lag_seconds": round(max(lag, 0.0), 3), "dead": b.dead}
        body.update(
            version=c.version,
            uptime_seconds=round(time.time() - c.health.started_at, 3),
            components=c.health.as_dict(full=principal.may("admin")),
            backlog=backlog,
            sse_clients=c.hub.clients,
            devices=c.latest.devices,
        )
    return 503 if status == "starting" else 200, dumps(body)


@api(role="admin", ok={200: (ReloadResult, JSON)}, errors=(ProblemCode.CONFIG_INVALID,))
async def rereadenv() -> Response:
    """Re-read the configuration and apply it

    Validates the new configuration as a whole; applies what can change live and restarts the
    components whose settings changed. An invalid configuration is refused (400 config_invalid)
    and the running one stays.
    """
    _args(frozenset())
    principal = g.get("principal")
    result = await ctx().reload()
    log.info(
        "configuration reloaded by key %s: changed=%s restarted=%s",
        principal.name if principal else "-",
        result.get("changed"),
        result.get("restarted"),
    )
    return json_response(result)


@api(role="read", ok={200: (MessagePage, JSON), 304: (None, JSON)}, errors=_API_READ, query=MessagesQuery)
async def messages() -> Response:
    """Query stored readings

    Newest first. Identical queries are served from a short-lived cache that new inserts
    invalidate; send If-None-Match with the ETag to get 304.
    """
    c = ctx()
    query = message_query()
    try:
        cached = await page_of(c, query, current_app.extensions.get("gateway.tasks"))
    except ValueError:
        raise _bad("cursor", "malformed cursor") from None
    headers = {"ETag": cached.etag, "Cache-Control": PAGE_CACHE_CONTROL}
    if not_modified(cached, request.headers.get("If-None-Match")):
        return Response(b"", status=304, headers=headers)
    return Response(cached.body, status=200, content_type=JSON, headers=headers)


def message_query(given: Mapping[str, list[str]] | None = None) -> MessageQuery:
    """The query of a ``/messages`` request (its parameters, or ``given``); ApiError names a
    wrong parameter."""
    args = _args(frozenset(MessagesQuery.model_fields), given)
    limit = _int(args, "limit", 100, 1, 1000)
    assert limit is not None
    start, end = _time(args, "start_time"), _time(args, "end_time")
    if start is not None and end is not None and start > end:
        raise _bad("end_time", "is before start_time")
    key = _match(args, "key", _KEY_RE, "must be a field or measurement name")
    value = args.get("value")
    if value is not None:
        if key is None:
            raise _bad("value", "needs key")
        if not 1 <= len(value) <= 256:
            raise _bad("value", "must be 1 to 256 characters")
    return MessageQuery(
        limit=limit,
        start_time=start,
        end_time=end,
        device_id=_match(args, "device_id", _DEVICE_RE, "1-64 of A-Z a-z 0-9 . _ : -"),
        key=key,
        value=value,
        cursor=_match(args, "cursor", _CURSOR_RE, "malformed cursor"),
    )


def not_modified(cached: CachedBody, if_none_match: str | None) -> bool:
    """Whether the client's ``If-None-Match`` names this body's ETag (answer 304)."""
    return cached.etag in _etags(if_none_match)


async def page_of(c: AppContext, query: MessageQuery, tasks: trio.Nursery | None) -> CachedBody:
    """The page ``query`` asks for, from the cache when fresh enough (see gateway.http.cache).

    A page past half its life is rebuilt in the background, in ``tasks`` (nobody waits for it); a
    page nobody has is read once however many requests ask for it at the same time. Raises
    ValueError for a malformed cursor, StoreError when the read fails.
    """
    pages = c.pages
    while True:
        cached, refresh = pages.lookup(query)
        if cached is not None:
            if refresh:
                # Registered now, not when the task starts: the next requests see it under way.
                rebuild = pages.begin(query)
                try:
                    if tasks is None:  # not served by gateway.http.serve (no task owner): inline
                        await _rebuild(c, query, rebuild)
                    else:
                        tasks.start_soon(_rebuild, c, query, rebuild)
                except RuntimeError:  # the server is stopping: no rebuild
                    pages.end(query, rebuild)
            return cached
        pending = pages.building(query)
        if pending is None:
            return await _build(c, query, pages.begin(query))
        await pending.done.wait()
        if pages.building(query) is None and pages.get(query) is None:
            # That read failed or came too late to be cached: read ourselves.
            return await _build(c, query, pages.begin(query))


async def _build(c: AppContext, query: MessageQuery, build: Build) -> CachedBody:
    """Read the page (``build``: registered with ``pages.begin``), encode it once and cache it."""
    pages = c.pages
    try:
        page = await c.store.query_messages(query)
        items = [m.to_json() for m in page.items]
        body = {"items": items, "total": page.total, "total_capped": page.total_capped, "next_cursor": page.next_cursor}
        text = dumps(body)  # one encoding per page, served from the cache until it expires
        return pages.put(query, build.generation, text, started=build.started)
    finally:
        pages.end(query, build)


async def _rebuild(c: AppContext, query: MessageQuery, build: Build) -> None:
    """A background rebuild: a failure leaves the cached page to expire (the next request that
    misses reads it and reports the error)."""
    try:
        await _build(c, query, build)
    except StoreError as exc:
        log.debug("background page rebuild failed: %s", exc)
    except Exception:  # a bug: logged, but it must not take the server down
        log.exception("background page rebuild failed")


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",")}


@api(role="read", ok={200: (AggregateResult, JSON)}, errors=_API_READ, query=AggregateQueryDoc)
async def aggregate() -> Response:
    """Readings of one measurement in time buckets

    The average, minimum, maximum or count per bucket (aligned to the Unix epoch, UTC) of one
    device's measurement. Answered from the rollups (``ROLLUP_INTERVALS``) when one divides the
    bucket and every reading in the range was processed, else from the stored readings; ``source``
    says which. Both give the same figures (averages to float rounding).
    """
    query, agg = aggregate_query()
    try:
        result = await ctx().store.aggregate(query)
    except ValueError as exc:
        raise _bad("end_time", str(exc)) from None
    start, end = query.span()
    return json_response(
        {
            "device_id": query.device_id,
            "measurement": query.measurement,
            "bucket": format_interval(query.bucket),
            "agg": agg,
            "start_time": _iso(start),
            "end_time": _iso(end),
            "source": result.source,
            "items": [{"bucket_start": _iso(b.start), "value": b.value(agg), "count": b.count} for b in result.buckets],
        }
    )


def aggregate_query(given: Mapping[str, list[str]] | None = None) -> tuple[AggregateQuery, Agg]:
    """The query of a ``/messages/aggregate`` request and the figure asked for; ApiError names a
    wrong parameter."""
    args = _args(frozenset(AggregateQueryDoc.model_fields), given)
    device = _match(args, "device_id", _DEVICE_RE, "1-64 of A-Z a-z 0-9 . _ : -")
    measurement = _match(args, "measurement", _KEY_RE, "must be a measurement name")
    if device is None:
        raise _bad("device_id", "required")
    if measurement is None:
        raise _bad("measurement", "required")
    try:
        bucket = parse_interval(args.get("bucket", "1h"))
    except ValueError as exc:
        raise _bad("bucket", str(exc)) from None
    agg = args.get("agg", "avg")
    if agg not in AGGS:
        raise _bad("agg", "must be avg, min, max or count")
    end = _time(args, "end_time") or datetime.now(UTC)
    try:
        start = _time(args, "start_time") or end - timedelta(days=1)
        query = AggregateQuery(device, measurement, bucket, start, end)
        query.span()
    except OverflowError:
        raise _bad("end_time", "out of range") from None
    except ValueError:
        if end <= start:
            raise _bad("end_time", "must be after start_time") from None
        raise _bad("bucket", f"the range holds more than {MAX_BUCKETS} buckets of it") from None
    return query, agg


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


@api(role="read", ok={200: (RejectPage, JSON)}, errors=_API_READ, query=RejectsQuery)
async def rejects() -> Response:
    """Rejected packets with their reasons

    Newest first; the raw payload as text.
    """
    args = _args(frozenset(RejectsQuery.model_fields))
    limit = _int(args, "limit", 100, 1, 1000)
    assert limit is not None
    cursor = _match(args, "cursor", _CURSOR_RE, "malformed cursor")
    try:
        page = await ctx().store.query_rejects(limit, cursor)
    except ValueError:
        raise _bad("cursor", "malformed cursor") from None
    return json_response(
        {
            "items": [r.to_json() for r in page.items],
            "total": page.total,
            "total_capped": page.total_capped,
            "next_cursor": page.next_cursor,
        }
    )


_REPLAY = (
    ProblemCode.QUERY_INVALID,
    ProblemCode.PAYLOAD_TOO_LARGE,
    ProblemCode.UNSUPPORTED_MEDIA_TYPE,
    ProblemCode.DB_UNAVAILABLE,
)
_REASON_RE = re.compile(EVENT_TYPE_PATTERN)  # a reject's reason: the same characters as an event type


@api(role="admin", ok={200: (ReplayResultDoc, JSON)}, errors=_REPLAY, body=ReplayBody)
async def replay_rejects() -> Response:
    """Replay rejects against today's packet schema

    Those that pass are stored as readings (idempotently: a second replay stores nothing new,
    counted as duplicates) with source `replay`, and processed; the rest keep their rows with the
    fresh reason and errors. At most `limit` (10,000) per request, in transactions of 500;
    `next_cursor` continues when more remain.
    """
    c = ctx()
    _args(frozenset())
    mimetype = request.mimetype
    if mimetype != JSON and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        raise ApiError(ProblemCode.UNSUPPORTED_MEDIA_TYPE, "send the selection as application/json")
    body = cast(bytes, await request.get_data(cache=False, as_text=False))
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad("body", "must be a JSON object") from None
    wanted = _replay_request(raw)

    def stored(messages: list[NewMessage], outcomes: list[InsertOutcome]) -> None:
        if not all(o.duplicate for o in outcomes):
            c.pages.clear()  # read-your-writes, as for POST /packets
            c.on_commit()  # wakes the processor

    result = await replay(
        c.store,
        wanted,
        max_payload=c.settings.ingest.max_payload,
        device_level=c.settings.mqtt.device_level,
        on_stored=stored,
    )
    return json_response(result.to_json())


def _replay_request(raw: Any) -> ReplayRequest:
    """The body of ``POST /rejects/replay``, strictly; ApiError names a wrong member."""
    if not isinstance(raw, dict):
        raise _bad("body", "must be a JSON object")
    for name in raw:
        if name not in ReplayBody.model_fields:
            raise _bad(name, "unknown member")
    args = {k: v for k, v in raw.items() if v is not None}
    for name in ("start_time", "end_time", "reason", "cursor"):
        if name in args and not isinstance(args[name], str):
            raise _bad(name, "must be a string")
    ids: tuple[int, ...] | None = None
    if "ids" in args:
        given = args["ids"]
        if (
            not isinstance(given, list)
            or not 1 <= len(given) <= MAX_PER_REQUEST
            or not all(type(i) is int and 1 <= i <= MAX_ID for i in given)
        ):
            raise _bad("ids", f"a list of 1 to {MAX_PER_REQUEST} reject ids")
        ids = tuple(given)
    start, end = _time(args, "start_time"), _time(args, "end_time")
    if ids is not None and (start or end):
        raise _bad("ids", "select by ids or by start_time and end_time, not both")
    if ids is None:
        if start is None:
            raise _bad("start_time", "needed (with end_time) when no ids are given")
        if end is None:
            raise _bad("end_time", "needed (with start_time) when no ids are given")
        if end <= start:
            raise _bad("end_time", "must be after start_time")
    limit = args.get("limit", MAX_PER_REQUEST)
    if type(limit) is not int or not 1 <= limit <= MAX_PER_REQUEST:
        raise _bad("limit", f"must be an integer from 1 to {MAX_PER_REQUEST}")
    dry_run = args.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _bad("dry_run", "must be true or false")
    reason = _match(args, "reason", _REASON_RE, "1-64 of A-Z a-z 0-9 . _ -")
    cursor = _match(args, "cursor", _CURSOR_RE, "malformed cursor")
    after = 0
    if cursor is not None:
        try:
            after = decode_cursor(cursor)
        except ValueError:
            raise _bad("cursor", "malformed cursor") from None
    return ReplayRequest(ids, start, end, reason, limit, after, dry_run)


@api(role="read", ok={200: (Latest, JSON)})
async def latest() -> Response:
    """The latest reading per device

    Kept in memory: loaded from the database at start-up (each device's reading with the newest
    timestamp), then updated by every packet this instance stores (the last one stored wins).
    At most 10,000 devices, those heard from most recently.
    """
    _args(frozenset())
    return json_response({"devices": ctx().latest.latest()})


@api(role=None, ok={200: (JsonSchemaDoc, "application/schema+json")})
async def packet_schema() -> Response:
    """The sensor packet JSON Schema"""
    global _PACKET_SCHEMA
    _args(frozenset())
    if _PACKET_SCHEMA is None:
        _PACKET_SCHEMA = json.dumps(packet_json_schema()).encode()
    return Response(_PACKET_SCHEMA, content_type="application/schema+json")


@api(
    role="read",
    ok={200: (None, "text/event-stream")},
    errors=_EVENTS,
    query=EventsQuery,
    headers=EventsHeaders,
    query_token=True,
)
async def events() -> Response:
    """Server-Sent Events

    ``retry:`` first, then events with growing ids and a comment line at least every 15 s.
    ``Last-Event-ID`` (header, or ``last_event_id``) replays every event after that id first.
    """
    c = ctx()
    args = _args(frozenset(EventsQuery.model_fields))
    last = _int(args, "last_event_id", None, 0, 2**63 - 1)
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip():
        if not _INT_RE.match(header.strip()):
            raise _bad("Last-Event-ID", "must be an event id (a non-negative integer)")
        last = int(header.strip())
    types = parse_types(args["types"], c.event_types()) if "types" in args else None
    device = _match(args, "device_id", _DEVICE_RE, "1-64 of A-Z a-z 0-9 . _ : -")
    owner = streams()
    if not owner.ready:
        raise ApiError(ProblemCode.SHUTTING_DOWN, "the server is stopping", headers={"Retry-After": "1"})
    http = c.settings.http
    principal = g.get("principal")
    slot = owner.reserve(
        principal.name if principal else "-",
        max_total=http.sse_max_streams,
        max_per_key=http.sse_max_streams_per_key,
    )
    body = owner.stream(
        c.hub,
        {"last_event_id": last, "types": types, "device_id": device},
        heartbeat=c.sse_heartbeat,
        retry_ms=c.sse_retry_ms,
        slot=slot,
        send_timeout=http.sse_send_timeout,
    )
    response = Response(body, content_type="text/event-stream")
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut the stream
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    return response


@api(role="read", ok={200: (None, CONTENT_TYPE_LATEST)})
async def prometheus() -> Response:
    """Prometheus metrics (text format)"""
    _args(frozenset())
    return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)


def register(app: Quart) -> None:
    """Add the routes to ``app``."""
    prefix = "/api/v1"
    app.add_url_rule(f"{prefix}/packets", "post_packet", post_packet, methods=["POST"])
    app.add_url_rule(f"{prefix}/ping", "ping", ping, methods=["GET"])
    app.add_url_rule(f"{prefix}/rereadenv", "rereadenv", rereadenv, methods=["GET", "POST"])
    app.add_url_rule(f"{prefix}/messages", "messages", messages, methods=["GET"])
    app.add_url_rule(f"{prefix}/messages/aggregate", "aggregate", aggregate, methods=["GET"])
    app.add_url_rule(f"{prefix}/rejects", "rejects", rejects, methods=["GET"])
    app.add_url_rule(f"{prefix}/rejects/replay", "replay_rejects", replay_rejects, methods=["POST"])
    app.add_url_rule(f"{prefix}/latest", "latest", latest, methods=["GET"])
    app.add_url_rule(f"{prefix}/schema/packet", "packet_schema", packet_schema, methods=["GET"])
    app.add_url_rule(f"{prefix}/events", "events", events, methods=["GET"])
    app.add_url_rule("/metrics", "metrics", prometheus, methods=["GET"])
    assert all(spec_of(f) for f in (post_packet, ping, messages, events))
