"""Helpers shared by the two store backends: time text. (The read side: :mod:`gateway.store._query`.)"""

from __future__ import annotations

from datetime import UTC, datetime


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
