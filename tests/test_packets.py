"""The packet schema's fast path (one ``model_validate_json``) against its slow path (``json.loads``
and ``model_validate``, which names each refusal): on any input the fast path accepts nothing the
slow path refuses, and what it accepts has the same values and types, so ``parse_packet`` answers
exactly as the slow path alone did."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import PacketInvalid
from gateway.packets import Packet, _parse_slow, parse_packet

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60")) * 10  # `just fuzz` runs more


def _outcome(parse: Any, raw: bytes) -> tuple[str, Any]:
    try:
        p = parse(raw)
    except PacketInvalid as exc:
        return "invalid", (exc.reason, exc.errors)
    except Exception as exc:  # the slow path's own crash (the fast path must not hide one)
        return "crash", type(exc).__name__
    return "ok", _values(p)


def _values(p: Packet) -> Any:
    """Everything a packet carries into a row, with the types that decide its JSON text."""
    kinds = {k: (type(v).__name__, repr(v)) for k, v in p.measurements.items()}
    battery = (type(p.battery).__name__, repr(p.battery))
    return p.device_id, p.timestamp.isoformat(), p.seq, kinds, p.status, battery, p.dedupe_key()


def _fast(raw: bytes) -> Packet:
    return Packet.model_validate_json(raw)


def _check(raw: bytes) -> None:
    slow = _outcome(_parse_slow, raw)
    fast = _outcome(_fast, raw)
    if fast[0] == "ok":
        assert slow == fast, raw
    assert _outcome(parse_packet, raw) == slow, raw


# ---- JSON text with lexical variety: what a strict and a lenient parser may disagree on ------------

_WS = st.sampled_from(["", " ", "\t", "\n", "\r", "\x0c", "\x0b", "\xa0", "\u2028", "\ufeff"])


@st.composite
def _number(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return str(draw(st.integers(-(2**70), 2**70)))
    if kind == 1:
        x = draw(st.floats(allow_nan=True, allow_infinity=True))
        return repr(x) if math.isfinite(x) else draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1e999"]))
    if kind == 2:
        x = draw(st.floats(min_value=-1e6, max_value=1e6))
        return draw(st.sampled_from([f"{x:e}", f"{x:E}", f"{x:.17g}", f"{x:.3f}"]))
    if kind == 3:  # not JSON numbers
        return draw(st.sampled_from(["01", "+1", ".5", "5.", "-", "1e", "0x10", "1_000", "00", "-0", "1e+2", "1E-2"]))
    if kind == 4:
        return draw(st.sampled_from(["1790000000", "1790000000123", "1.79e9", "1790000000.000001", "0", "100.0"]))
    return str(draw(st.integers(0, 2**64)))


_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)


@st.composite
def _string(draw: st.DrawFn, text: st.SearchStrategy[str] | None = None) -> str:
    value = draw(text if text is not None else st.text(_CHAR, max_size=12))
    out = ['"']
    for ch in value:
        how = draw(st.integers(0, 3))
        if ch in '"\\' or how == 0:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else json.dumps(ch)[1:-1])
        else:
            out.append(ch)  # raw: control characters and surrogates included
    if draw(st.integers(0, 20)) == 0:
        out.append(draw(st.sampled_from(["\\x41", "\\", "\\ud800", "\\udc00", "\\u12", "\\/"])))
    out.append('"')
    return "".join(out)


_TIMESTAMP_TEXT = st.sampled_from(
    ["2026-11-27T09:00:00Z", "2026-11-27T09:00:00.123456+01:00", "2026-11-27t09:00:00z", "2026-11-27T09:00:00",
     "2026-11-27 09:00:00Z", " 2026-11-27T09:00:00Z ", "2026-11-27T09:00:00Z\t", "0001-01-01T00:00:00+01:00"]
)  # fmt: skip
_NAME = st.sampled_from(["temperature", "humidity", "t", "a.b:c-d_e", "x" * 64, "x" * 65, "", "bad name", "é"])


@st.composite
def _value(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.integers(0, 6 if depth < 2 else 3))
    if kind == 0:
        return draw(_number())
    if kind == 1:
        return draw(_string())
    if kind == 2:
        return draw(st.sampled_from(["true", "false", "null", "True", "None", "undefined"]))
    if kind == 3:
        return draw(st.sampled_from(['"ok"', '"warning"', '"OK"', '"ok "', "1.5", "[]", "{}"]))
    if kind == 4:
        items = draw(st.lists(_value(depth + 1), max_size=3))
        return "[" + ",".join(items) + draw(st.sampled_from(["", ","])) + "]"
    pairs = draw(st.lists(st.tuples(_string(_NAME), _value(depth + 1)), max_size=3))
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


def _mostly(draw: st.DrawFn, good: st.SearchStrategy[str], other: st.SearchStrategy[str]) -> str:
    """``good`` nine times in ten: most packets are valid but for one thing or two."""
    return draw(good if draw(st.integers(0, 9)) else other)


_GOOD_WS = st.sampled_from(["", " ", "\n", "\t", "\r\n"])
_GOOD_NUMBER = (
    st.sampled_from(["21.5", "40", "-3", "0", "1e2", "-0.0", "1013.25", "2.2250738585072014e-308"])
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.integers(-(2**70), 2**70).map(str)
)
_GOOD_TIMESTAMP = st.sampled_from(
    ["1790000000", "1790000000.5", "1790000000123", '"2026-11-27T09:00:00Z"', '"2026-11-27T09:00:00.1+01:00"', "0"]
)
_GOOD_SEQ = st.sampled_from(["1", "7450", "7450.0", "0", "null", "9223372036854775807"])
_STRAY = st.sampled_from([b"\xff", b"\xef\xbb\xbf", b"\x00", b"\xc3", b" x", b","])


@st.composite
def _packet_text(draw: st.DrawFn) -> bytes:
    """A packet, field by field, each field valid or not, with any spacing and key spelling."""
    measurements = draw(
        st.lists(st.tuples(st.sampled_from(['"temperature"', '"humidity"', '"t"', '"a.b:c-d_e"']), _GOOD_NUMBER),
                 min_size=1, max_size=4)
    )  # fmt: skip
    good_measurements = "{" + ",".join(f"{k}:{v}" for k, v in measurements) + "}"
    bad_measurements = st.lists(st.tuples(_string(_NAME), _number() | _value()), max_size=4).map(
        lambda ps: "{" + ",".join(f"{k}:{v}" for k, v in ps) + "}"
    )
    fields: list[tuple[str, str]] = [
        ('"device_id"', _mostly(draw, st.sampled_from(['"esp32-01"', '"a"', '"x.y:z_-9"']), _string() | _value())),
        ('"timestamp"', _mostly(draw, _GOOD_TIMESTAMP, _number() | _string(_TIMESTAMP_TEXT) | _value())),
        ('"seq"', _mostly(draw, _GOOD_SEQ, _number())),
        ('"measurements"', _mostly(draw, st.just(good_measurements), bad_measurements | _value())),
        ('"status"', _mostly(draw, st.sampled_from(['"ok"', '"warning"', '"error"', '"maintenance"']), _value())),
        ('"battery"', _mostly(draw, st.sampled_from(["87", "87.5", "0", "100", "null", "1e2"]), _number() | _value())),
    ]
    keep = draw(st.lists(st.integers(0, 5), min_size=len(fields), max_size=len(fields)))
    chosen = [f for f, k in zip(fields, keep, strict=True) if k or f[0] in ('"device_id"', '"measurements"')]
    if draw(st.integers(0, 3)) == 0:  # a repeated or an extra key
        chosen.append(draw(st.sampled_from(fields) | st.tuples(_string(_NAME), _value())))
    if draw(st.integers(0, 4)) == 0:  # a key spelled with escapes
        k, v = chosen[0]
        chosen[0] = ('"' + "".join(f"\\u{ord(c):04x}" for c in json.loads(k)) + '"', v)
    draw(st.randoms()).shuffle(chosen)
    ws = [_mostly(draw, _GOOD_WS, _WS) for _ in range(5)]
    body = ws[0] + "{" + ",".join(f"{ws[1]}{k}{ws[2]}:{ws[3]}{v}" for k, v in chosen) + "}" + ws[4]
    data = body.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 10)) == 0:  # stray bytes: invalid UTF-8, a BOM, a NUL, trailing text
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(_STRAY) + data[cut:]
    return data


@given(_packet_text())
@settings(max_examples=EXAMPLES, deadline=None)
def test_fast_path_accepts_only_what_the_slow_path_accepts(raw: bytes) -> None:
    _check(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"device_id":"a","timestamp":1790000000.5,"measurements":{"t":1,"t":2.5},"status":"ok"}',  # repeated key
        b'{"device_id":"a","timestamp":1790000000,"measurements":{"t":1},"status":"ok","status":"error"}',
        b'{"device_id":"a","timestamp":"2026-11-27T09:00:00Z\t","measurements":{"t":1},"status":"ok"}',  # raw tab
        b'\xef\xbb\xbf{"device_id":"a","timestamp":1790000000,"measurements":{"t":1},"status":"ok"}',  # BOM
        b'{"device_id":"a","timestamp":1790000000,"measurements":{"t":NaN},"status":"ok"}',
        b'{"device_id":"a","timestamp":1' + b"0" * 400 + b',"measurements":{"t":1},"status":"ok"}',  # huge epoch
        b'{"device_id":"a","timestamp":1790000000,"measurements":{"t":1e-400,"u":' + b"9" * 40 + b'},"status":"ok"}',
        b'{"device_id":"a","timestamp":1790000000,"seq":7450.0,"battery":87,"measurements":{"t":1},"status":"ok"}',
        b'{"device_id":"a","timestamp":1790000000,"measurements":{"t":1},"status":"ok","\\u0000":1,"\\ud800":2}',
        b'{"device_id":"a","timestamp":1790000000,"measurements":{"t":1},"status":"ok"}\x00',
    ],
)
def test_fast_path_edge_cases(raw: bytes) -> None:
    _check(raw)


def test_huge_epoch_integer_is_a_schema_error_not_a_crash() -> None:
    raw = b'{"device_id":"a","timestamp":1' + b"0" * 400 + b',"measurements":{"t":1},"status":"ok"}'
    with pytest.raises(PacketInvalid) as info:
        parse_packet(raw)
    assert info.value.reason == "schema"
    assert info.value.errors == [{"loc": ["timestamp"], "msg": "epoch time out of range", "type": "value_error"}]
