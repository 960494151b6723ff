"""Server-Sent Events wire encoding (pure; no I/O).

One event is ``id:``, ``event:`` and ``data:`` lines ended by a blank line. The data is compact JSON,
which never contains a raw newline (``json.dumps`` escapes them), so one ``data:`` line always suffices.
See the WHATWG HTML standard, "Server-sent events", for the format.
"""

from __future__ import annotations

import json

from gateway.store.base import Event


def encode_event(event: Event) -> bytes:
    """Encode one event as an SSE frame: ``id: N``, ``event: TYPE``, ``data: JSON``, blank line."""
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False, default=str)
    return f"id: {event.id}\nevent: {_one_line(event.type)}\ndata: {data}\n\n".encode()


def encode_comment(text: str = "") -> bytes:
    """Encode a comment frame (``: text``), used as a heartbeat; clients ignore it."""
    return f": {_one_line(text)}\n\n".encode() if text else b":\n\n"


def encode_retry(milliseconds: int) -> bytes:
    """Encode the reconnection delay the browser should use, in milliseconds."""
    if milliseconds < 0:
        raise ValueError("retry must be >= 0 milliseconds")
    return f"retry: {int(milliseconds)}\n\n".encode()


def _one_line(text: str) -> str:
    # A CR or LF would end the field early and let the rest be read as another field.
    return text.replace("\r", " ").replace("\n", " ")
