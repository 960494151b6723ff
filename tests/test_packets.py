"""``gateway.packets``: what a packet may be, why one is refused (a stable ``reason``, field errors
that never echo the input), the redelivery key and the published JSON Schema.

The schema's fast path (one ``model_validate_json``) against its slow path (``json.loads``
and ``model_validate``, which names each refusal): on any input the fast path accepts nothing the
slow path refuses, and what it accepts has the same values and types, so ``parse_packet`` answers
exactly as the slow path alone did."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import PacketInvalid
from gateway.packets import (
    DEVICE_ID_PATTERN,
    MAX_PACKET_BYTES,
    MEASUREMENT_NAME_PATTERN,
    Packet,
    _parse_slow,
    packet_json_schema,
    parse_packet,
    validate_packet,
)

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


# ---- the public behaviour: what a packet may be, the reasons it is refused, the published schema ---

CONTRACT_EXAMPLE = {
    "device_id": "esp32-kitchen-01",
    "timestamp": "2026-11-27T09:00:00Z",
    "seq": 1042,
    "measurements": {"temperature": 21.5, "humidity": 40.2},
    "status": "ok",
    "battery": 87,
}


class _AnyText:
    """Equal to any non-empty string (a message whose wording may change)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


def _refusal(obj: Any) -> tuple[str, list[dict[str, Any]]]:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    with pytest.raises(PacketInvalid) as info:
        parse_packet(raw)
    exc = info.value
    assert exc.code == "packet_invalid" and str(exc) == exc.reason  # the API's code, the reject's reason
    assert exc.errors and all(set(e) == {"loc", "msg", "type"} for e in exc.errors)
    return exc.reason, exc.errors


def test_the_contract_example_is_a_packet() -> None:
    p = parse_packet(json.dumps(CONTRACT_EXAMPLE))
    assert (p.device_id, p.seq, p.status, p.battery) == ("esp32-kitchen-01", 1042, "ok", 87)
    assert p.timestamp == datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    assert p.measurements == {"temperature": 21.5, "humidity": 40.2}
    minimal = {k: CONTRACT_EXAMPLE[k] for k in ("device_id", "timestamp", "measurements", "status")}
    assert parse_packet(json.dumps(minimal)).seq is None and validate_packet(minimal).battery is None


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2026-11-27T10:00:00+01:00", datetime(2026, 11, 27, 9, 0, tzinfo=UTC)),  # any offset, kept as UTC
        (1790000000, datetime.fromtimestamp(1790000000, UTC)),  # seconds
        (1790000000.5, datetime.fromtimestamp(1790000000.5, UTC)),
        (1790000000123, datetime.fromtimestamp(1790000000.123, UTC)),  # milliseconds: above 1e11
    ],
)
def test_timestamps_rfc3339_with_a_zone_or_epoch(timestamp: Any, expected: datetime) -> None:
    p = validate_packet({**CONTRACT_EXAMPLE, "timestamp": timestamp})
    assert p.timestamp == expected and p.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("change", "loc", "kind"),
    [
        ({"timestamp": "2026-11-27T09:00:00"}, ["timestamp"], "value_error"),  # no zone: refused
        ({"timestamp": -1}, ["timestamp"], "value_error"),
        ({"timestamp": True}, ["timestamp"], "value_error"),
        ({"device_id": "bad id"}, ["device_id"], "string_pattern_mismatch"),
        ({"device_id": "x" * 65}, ["device_id"], "string_pattern_mismatch"),
        ({"measurements": {}}, ["measurements"], "too_short"),
        ({"measurements": {f"m{i}": 1 for i in range(65)}}, ["measurements"], "too_long"),
        ({"measurements": {"bad name": 1}}, ["measurements", "bad name"], "string_pattern_mismatch"),
        ({"measurements": {"t": "1"}}, ["measurements", "t"], "number_type"),  # not a number
        ({"status": "fine"}, ["status"], "literal_error"),
        ({"battery": 101}, ["battery"], "less_than_equal"),
        ({"battery": -1}, ["battery"], "greater_than_equal"),
        ({"seq": -1}, ["seq"], "greater_than_equal"),
        ({"seq": True}, ["seq"], "int_type"),
        ({"seq": "7"}, ["seq"], "int_type"),
        ({"firmware": "1.2"}, ["firmware"], "extra_forbidden"),  # unknown keys refused
        ({"status": None}, ["status"], "literal_error"),
    ],
)
def test_schema_refusals_name_the_field(change: dict[str, Any], loc: list[str], kind: str | None) -> None:
    reason, errors = _refusal({**CONTRACT_EXAMPLE, **change})
    assert reason == "schema"
    assert errors[0]["loc"][: len(loc)] == loc, errors
    assert kind is None or errors[0]["type"] == kind, errors


def test_required_fields_and_the_non_finite_measurement() -> None:
    for name in ("device_id", "timestamp", "measurements", "status"):
        packet = {k: v for k, v in CONTRACT_EXAMPLE.items() if k != name}
        assert _refusal(packet) == ("schema", [{"loc": [name], "msg": "Field required", "type": "missing"}])
    assert _refusal(b'{"device_id":"a","timestamp":1,"measurements":{"t":1e999},"status":"ok"}')[0] == "schema"
    assert parse_packet(json.dumps({**CONTRACT_EXAMPLE, "seq": 7450.0})).seq == 7450  # one JSON number type


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff{}", "bad_encoding"),
        (b"{", "bad_json"),
        (b'{"device_id":"a","timestamp":1,"measurements":{"t":NaN},"status":"ok"}', "bad_json"),
        (b"[1]", "not_an_object"),
        (b'"packet"', "not_an_object"),
    ],
)
def test_refusals_before_the_schema_have_their_own_reason(raw: bytes, reason: str) -> None:
    assert _refusal(raw) == (reason, [{"loc": [], "msg": ANY_TEXT, "type": reason}])


def test_too_large_is_refused_before_it_is_parsed() -> None:
    assert len(json.dumps(CONTRACT_EXAMPLE)) < MAX_PACKET_BYTES == 64 * 1024
    with pytest.raises(PacketInvalid) as info:
        parse_packet(b"{" * 100, max_bytes=99)
    assert info.value.reason == "too_large"
    assert info.value.errors == [{"loc": [], "msg": "packet is 100 bytes, the limit is 99", "type": "too_large"}]
    assert parse_packet(json.dumps(CONTRACT_EXAMPLE).encode() + b" " * 10).device_id  # spaces count, but fit


def test_field_errors_never_echo_the_input_and_are_storable() -> None:
    secret = "value-that-must-not-leak"
    reason, errors = _refusal({**CONTRACT_EXAMPLE, "device_id": f"{secret} x", "k\x00": secret})
    text = json.dumps(errors)
    assert reason == "schema" and secret not in text
    assert ["k\\x00"] in [e["loc"] for e in errors]  # a NUL written out: storable in PostgreSQL
    many = {**CONTRACT_EXAMPLE, "measurements": {f"m{i}": "x" for i in range(64)}}
    assert len(_refusal(many)[1]) == 50  # capped


def test_dedupe_key_a_redelivery_is_the_same_packet() -> None:
    p = validate_packet(CONTRACT_EXAMPLE)
    assert p.dedupe_key() == "seq:1042@2026-11-27T09:00:00.000000Z"
    assert validate_packet({**CONTRACT_EXAMPLE, "measurements": {"t": 1}}).dedupe_key() == p.dedupe_key()
    rebooted = validate_packet({**CONTRACT_EXAMPLE, "timestamp": "2026-11-27T09:05:00Z"})
    assert rebooted.dedupe_key() != p.dedupe_key()  # a counter restarted after a reboot loses nothing
    no_seq = {k: v for k, v in CONTRACT_EXAMPLE.items() if k != "seq"}
    key = validate_packet(no_seq).dedupe_key()
    assert key.startswith("h:") and len(key) == 34 and validate_packet(dict(no_seq)).dedupe_key() == key
    assert validate_packet({**no_seq, "battery": 86}).dedupe_key() != key  # derived from the content


def test_published_schema_matches_the_model() -> None:
    schema = packet_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["title"] == "Sensor packet"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"device_id", "timestamp", "measurements", "status"}
    props = schema["properties"]
    assert props["device_id"]["pattern"] == DEVICE_ID_PATTERN
    assert props["status"]["enum"] == ["ok", "warning", "error", "maintenance"]
    assert {"type": "string", "format": "date-time", "maxLength": 64} in props["timestamp"]["anyOf"]
    assert props["measurements"]["propertyNames"] == {"pattern": MEASUREMENT_NAME_PATTERN}
    assert (props["measurements"]["minProperties"], props["measurements"]["maxProperties"]) == (1, 64)
    assert "patternProperties" not in props["measurements"]  # it would let other names through


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"timestamp": 1790000000123},
        {"seq": None, "battery": None},
        {"device_id": "bad id"},
        {"measurements": {}},
        {"measurements": {"bad name": 1}},
        {"measurements": {"t": "1"}},
        {"status": "fine"},
        {"battery": 101},
        {"seq": -1},
        {"firmware": "1.2"},
    ],
)
def test_the_schema_and_the_parser_agree(change: dict[str, Any]) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    packet = {**CONTRACT_EXAMPLE, **change}
    try:
        parse_packet(json.dumps(packet))
        accepted = True
    except PacketInvalid:
        accepted = False
    assert jsonschema_rs.validator_for(packet_json_schema()).is_valid(packet) is accepted


def test_a_non_numeric_measurement_is_one_error_not_one_per_union_branch() -> None:
    reason, errors = _refusal({**CONTRACT_EXAMPLE, "measurements": {"t": "hot", "h": True, "p": 1013.2}})
    assert reason == "schema"
    assert errors == [
        {"loc": ["measurements", "t"], "msg": "must be a number", "type": "number_type"},
        {"loc": ["measurements", "h"], "msg": "must be a number", "type": "number_type"},
    ]
