"""SSE wire encoding: frames a browser's EventSource parses back to the same id, type and data."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.sse import encode_comment, encode_event, encode_retry
from gateway.store.base import Event


def _parse(frame: bytes) -> dict[str, str]:
    """A minimal EventSource field parser (one frame)."""
    assert frame.endswith(b"\n\n")
    fields: dict[str, str] = {}
    for line in frame.decode().split("\n")[:-2]:
        name, _, value = line.partition(":")
        fields[name] = fields.get(name, "") + ("\n" if name in fields else "") + value.removeprefix(" ")
    return fields


def test_event_frame_round_trips() -> None:
    data = {"device_id": "d1", "note": "line1\nline2\r\n", "t": 21.5, "unicode": "é"}
    ev = Event(id=42, type="alert", data=data, created_at=datetime.now(UTC))
    frame = encode_event(ev)
    fields = _parse(frame)
    assert fields["id"] == "42"
    assert fields["event"] == "alert"
    assert json.loads(fields["data"]) == data
    assert frame.count(b"\n") == 4  # exactly three fields and the blank line: no stray newlines


def test_event_type_cannot_inject_fields() -> None:
    ev = Event(id=1, type="x\nid: 999", data={}, created_at=datetime.now(UTC))
    fields = _parse(encode_event(ev))
    assert fields["id"] == "1"


def test_comment_and_retry() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("keepalive\nid: 5") == b": keepalive id: 5\n\n"
    assert encode_retry(3000) == b"retry: 3000\n\n"
    with pytest.raises(ValueError):
        encode_retry(-1)


def test_frame_reuses_the_stored_encoding_and_is_built_once() -> None:
    from gateway.sse import framed

    data = {"device_id": "d1", "t": 21.5}
    raw = b'{"device_id":"d1","t":21.5}'
    ev = Event(id=7, type="packet", data=data, created_at=datetime.now(UTC), json=raw)
    frame = encode_event(ev)
    assert frame == b"id: 7\nevent: packet\ndata: " + raw + b"\n\n"
    assert json.loads(_parse(frame)["data"]) == data
    once = framed(ev)
    assert once.frame == frame and once == ev  # same event; the frame is a cache
    assert encode_event(once) is once.frame and framed(once) is once
