"""The read side both store backends share: cursors, message filters, page SQL, page outcomes and
connection health.

A query is described once (:class:`~gateway.store.base.MessageQuery`); a :class:`Dialect` says how
a backend spells placeholders, values and the measurement tests, and :func:`message_page` /
:func:`reject_page` turn the description into the count and page statements with their
parameters. Every value is a parameter; the SQL text is built from fixed fragments only.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from gateway import metrics
from gateway.health import ComponentHealth
from gateway.store._common import ts_text
from gateway.store.base import MessageQuery, Page

# Top-level columns a ``key``/``value`` filter may name; the rest are measurement names.
TEXT_FIELDS = frozenset({"device_id", "status", "source"})
NUMBER_FIELDS = frozenset({"seq", "battery"})

MAX_ID = 2**63 - 1  # BIGINT / SQLite INTEGER
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DIGITS_RE = re.compile(r"[0-9]{1,19}")


# ---- cursors ------------------------------------------------------------------------------------


def encode_cursor(last_id: int) -> str:
    """The opaque cursor that continues after (below) ``last_id``."""
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id a cursor from :func:`encode_cursor` continues below.

    Every part is checked: the text (URL-safe base64, at most 128 characters), the prefix and the
    number, which must fit a signed 64-bit id (both databases refuse a larger one with an error
    that is not the client's). Raises ValueError if malformed.
    """
    if not _CURSOR_RE.fullmatch(cursor):
        raise ValueError("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("malformed cursor") from exc
    prefix, _, number = raw.partition(":")
    if prefix != "id" or not _DIGITS_RE.fullmatch(number) or int(number) > MAX_ID:
        raise ValueError("malformed cursor")
    return int(number)


def parse_number(value: str) -> float | None:
    """``value`` as a finite number, or None when it is not one."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def check_query(query: MessageQuery) -> int | None:
    """Validate a query; returns the id its cursor continues below (None without a cursor).

    Raises ValueError for a malformed cursor, a limit below 1, or a ``value`` without ``key``.
    """
    if query.limit < 1:
        raise ValueError("limit must be at least 1")
    if query.value is not None and query.key is None:
        raise ValueError("value needs a key")
    return decode_cursor(query.cursor) if query.cursor is not None else None


# ---- dialects and filters -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one backend spells what a message filter needs. ``{k}``/``{v}`` in the measurement
    templates stand for the placeholders of the key and the value."""

    numbered: bool  # $1, $2 … (PostgreSQL) rather than ? (SQLite)
    true: str
    false: str
    time_value: Callable[[datetime], Any]
    number_value: Callable[[float], Any]
    text_cast: str
    number_cast: str
    has_measurement: str
    measurement_equals: str


SQLITE = Dialect(
    numbered=False,
    true="1",
    false="0",
    time_value=ts_text,  # fixed-width UTC text: text order is time order
    number_value=float,
    text_cast="",
    number_cast="",
    has_measurement="EXISTS (SELECT 1 FROM json_each(measurements) WHERE key = {k})",
    # json_each yields SQL numbers, compared numerically (21 = 21.0).
    measurement_equals="EXISTS (SELECT 1 FROM json_each(measurements) WHERE key = {k} AND value = {v})",
)

POSTGRES = Dialect(
    numbered=True,
    true="true",
    false="false",
    time_value=lambda ts: ts,
    number_value=lambda n: Decimal(repr(n)),
    text_cast="::text",
    number_cast="::float8",
    has_measurement="measurements ? {k}::text",
    # Containment uses the GIN index; jsonb compares numbers as numeric (21 = 21.0).
    measurement_equals="measurements @> jsonb_build_object({k}::text, {v}::numeric)",
)


class _Params:
    """Collects parameter values and hands out their placeholders."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}" if self.dialect.numbered else "?"

    def next(self, offset: int = 1) -> str:
        """The placeholder of a value not collected yet (``offset`` positions ahead)."""
        return f"${len(self.values) + offset}" if self.dialect.numbered else "?"


def message_filters(dialect: Dialect, query: MessageQuery, p: _Params) -> list[str]:
    """WHERE fragments for ``query`` (fixed text; the values go to ``p``)."""
    d = dialect
    where: list[str] = []
    if query.start_time is not None:
        where.append(f"device_ts >= {p(d.time_value(query.start_time))}")
    if query.end_time is not None:
        where.append(f"device_ts < {p(d.time_value(query.end_time))}")
    if query.device_id is not None:
        where.append(f"device_id = {p(query.device_id)}")
    key, value = query.key, query.value
    if key is None:
        return where
    if key in TEXT_FIELDS or key in NUMBER_FIELDS:
        column = key  # from a fixed set of names, never free text
        if value is None:
            where.append(f"{column} IS NOT NULL")
        elif key in TEXT_FIELDS:
            where.append(f"{column} = {p(value)}{d.text_cast}")
        elif (number := parse_number(value)) is None:
            where.append(d.false)  # a number column never equals text
        else:
            where.append(f"{column} = {p(number)}{d.number_cast}")
    elif value is None:
        where.append(d.has_measurement.format(k=p(key)))
    elif (number := parse_number(value)) is None:
        where.append(d.false)  # measurements are numbers: text never matches
    else:
        k = p(key)
        where.append(d.measurement_equals.format(k=k, v=p(d.number_value(number))))
    return where


# ---- pages --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PageRead:
    """The two statements of one page (the capped total, then the rows) and how to answer."""

    count_sql: str
    count_params: tuple[Any, ...]
    page_sql: str
    page_params: tuple[Any, ...]
    limit: int
    cap: int

    def page(self, total: int, rows: Sequence[Any], item: Callable[[Any], Any]) -> Page:
        """The answer: ``item`` of each row up to ``limit`` (one more row was read to know
        whether a next page exists), the total up to the cap and the next cursor."""
        items = [item(r) for r in rows[: self.limit]]
        more = len(rows) > self.limit
        return Page(items, min(total, self.cap), encode_cursor(items[-1].id) if more else None, total > self.cap)


def _page(p: _Params, table: str, columns: str, where: list[str], before: int | None, limit: int, cap: int) -> PageRead:
    cond = " AND ".join(where) or p.dialect.true
    base = tuple(p.values)
    # Counting stops at cap + 1 rows: beyond the cap only "more" is reported (counting is the cost).
    count_sql = f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {cond} LIMIT {p.next()}) s"
    if before is not None:
        cond += f" AND id < {p(before)}"
    page_sql = f"SELECT {columns} FROM {table} WHERE {cond} ORDER BY id DESC LIMIT {p.next()}"
    return PageRead(count_sql, (*base, cap + 1), page_sql, (*p.values, limit + 1), limit, cap)


def message_page(dialect: Dialect, query: MessageQuery, columns: str, cap: int) -> PageRead:
    """The page of messages ``query`` asks for, newest first.

    Raises ValueError for a malformed cursor, a limit below 1 or a value without a key.
    """
    before = check_query(query)
    p = _Params(dialect)
    return _page(p, "messages", columns, message_filters(dialect, query, p), before, query.limit, cap)


def reject_page(dialect: Dialect, limit: int, cursor: str | None, columns: str, cap: int) -> PageRead:
    """A page of rejects, newest first. Raises ValueError for a malformed cursor."""
    before = check_query(MessageQuery(limit=limit, cursor=cursor))
    return _page(_Params(dialect), "rejects", columns, [], before, limit, cap)


# ---- health -------------------------------------------------------------------------------------


def new_health(health: ComponentHealth | None) -> ComponentHealth:
    """The store's health record: ``health`` (or a new ``database`` one), counting reconnects."""
    health = health if health is not None else ComponentHealth("database")
    health.detail.setdefault("reconnects", 0)
    return health


def mark_ok(health: ComponentHealth) -> None:
    """The database answered: ``ok`` (counting a recovery), and the up gauge."""
    if health.state == "degraded":
        health.detail["reconnects"] = health.detail.get("reconnects", 0) + 1
    health.set("ok")
    metrics.DB_UP.set(1)


def mark_degraded(health: ComponentHealth, error: str, *, refused: bool = False) -> None:
    """The database failed with ``error`` (``refused``: one no retry fixes)."""
    health.set("degraded", error, code="db_refused" if refused else "db_unavailable", refused=refused)
    metrics.DB_UP.set(0)
