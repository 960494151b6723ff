"""Server-Sent Events wire encoding (pure; no I/O).

One event is ``id:``, ``event:`` and ``data:`` lines ended by a blank line. The data is compact JSON,
which never contains a raw newline (JSON escapes them), so one ``data:`` line always suffices.
See the WHATWG HTML standard, "Server-sent events", for the format.
"""

from __future__ import annotations

from gateway.jsonenc import dumps
from gateway.store.base import Event


def encode_event(event: Event) -> bytes:
    """Encode one event as an SSE frame: ``id: N``, ``event: TYPE``, ``data: JSON``, blank line.

    Reuses ``event.frame`` when the hub built it already, and ``event.json`` when the data is
    encoded already.
    """
    if event.frame is not None:
        return event.frame
    data = event.json if event.json is not None else dumps(event.data)
    return b"".join((b"id: ", str(event.id).encode(), b"\nevent: ", _type_line(event.type), b"\ndata: ", data, b"\n\n"))


def framed(event: Event) -> Event:
    """``event`` carrying its SSE frame (built once, then written to every subscriber)."""
    if event.frame is not None:
        return event
    e = event
    return Event(e.id, e.type, e.data, e.created_at, e.device_id, e.json, encode_event(e), e.message_id)


def encode_comment(text: str = "") -> bytes:
    """Encode a comment frame (``: text``), used as a heartbeat; clients ignore it."""
    return f": {_one_line(text)}\n\n".encode() if text else b":\n\n"


def encode_retry(milliseconds: int) -> bytes:
    """Encode the reconnection delay the browser should use, in milliseconds."""
    if milliseconds < 0:
        raise ValueError("retry must be >= 0 milliseconds")
    return f"retry: {int(milliseconds)}\n\n".encode()


_TYPE_LINES: dict[str, bytes] = {}


def _type_line(kind: str) -> bytes:
    # Few distinct types: each is made one line and encoded once.
    line = _TYPE_LINES.get(kind)
    if line is None:
        line = _one_line(kind).encode()
        if len(_TYPE_LINES) < 256:
            _TYPE_LINES[kind] = line
    return line


def _one_line(text: str) -> str:
    # A CR or LF would end the field early and let the rest be read as another field.
    return text.replace("\r", " ").replace("\n", " ")
