"""The one JSON encoding: compact UTF-8 bytes from orjson, the stdlib where orjson refuses."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from gateway.jsonenc import dumps, loads


def test_compact_utf8_round_trip() -> None:
    value = {"device_id": "d1", "t": 21.5, "n": 3, "note": "é\nx", "none": None, "list": [1, True]}
    raw = dumps(value)
    assert b" " not in raw and b"\n" not in raw  # one SSE data line, no padding
    assert "é".encode() in raw
    assert json.loads(raw) == value == loads(raw)


def test_what_orjson_refuses_still_encodes() -> None:
    # A lone surrogate, an int beyond 64 bits, a non-string key: the stdlib, ASCII-escaped.
    for value in ({"a": "\ud800"}, {"a": 2**70}, {1: "x"}):
        raw = dumps(value)
        raw.decode("utf-8")  # always valid UTF-8
        assert json.loads(raw) == json.loads(json.dumps(value))
    assert loads(b'"\\ud800"') == "\ud800"  # the stdlib reads what orjson refuses


def test_other_values_become_text() -> None:
    assert json.loads(dumps({"d": Decimal("1.5")})) == {"d": "1.5"}
    assert json.loads(dumps({"t": datetime(2026, 1, 2, tzinfo=UTC)})) == {"t": "2026-01-02T00:00:00+00:00"}
