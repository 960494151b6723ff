"""Helpers shared by the two store backends: cursors, query values, backoff, time text."""

from __future__ import annotations

import base64
import binascii
import math
import random
import re
from datetime import UTC, datetime

from gateway.store.base import MessageQuery

# Top-level columns a ``key``/``value`` filter may name; the rest are measurement names.
TEXT_FIELDS = frozenset({"device_id", "status", "source"})
NUMBER_FIELDS = frozenset({"seq", "battery"})

MAX_ID = 2**63 - 1  # BIGINT / SQLite INTEGER
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DIGITS_RE = re.compile(r"[0-9]{1,19}")


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


def backoff(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(high, low * 2**attempt)]."""
    return random.uniform(0, min(high, low * 2 ** min(attempt, 32)))


def ts_text(ts: datetime) -> str:
    """A datetime as fixed-width UTC text ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, so that text order is
    time order (SQLite stores times like this). Naive datetimes are taken as UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    # isoformat is several times faster than strftime; timespec keeps the width fixed.
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def ts_parse(text: str) -> datetime:
    """Inverse of :func:`ts_text`: an aware UTC datetime."""
    return datetime.fromisoformat(text)


def now_utc() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)
