"""The sensor packet schema and its published JSON Schema. Pure functions, no I/O.

:func:`parse_packet` turns raw bytes into a :class:`Packet` or raises :class:`PacketInvalid`
with a stable ``reason`` (``too_large``, ``bad_encoding``, ``bad_json``, ``not_an_object``,
``schema``) and pydantic-style field errors.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator

from gateway.errors import PacketInvalid
from gateway.safetext import safe_text
from gateway.store._common import ts_text

SCHEMA_VERSION = 1
"""The version of the packet schema below, stored with every reading and reject. Bump it whenever
the schema accepts or refuses something new (then ``POST /rejects/replay`` can tell which rejects a
past version refused). Keep ``gateway.store.base.DEFAULT_SCHEMA_VERSION`` equal (a test checks)."""
MAX_PACKET_BYTES = 64 * 1024
DEVICE_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
MEASUREMENT_NAME_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_MS_THRESHOLD = 1e11
_MAX_EPOCH_MS = 253402300799999  # 9999-12-31T23:59:59.999Z

Status = Literal["ok", "warning", "error", "maintenance"]


def _timestamp_schema(schema: dict[str, Any]) -> None:
    # A string (RFC 3339) or an epoch number; pydantic alone would publish "string" only.
    schema.pop("type", None)
    schema.pop("format", None)
    schema["anyOf"] = [
        {"type": "string", "format": "date-time", "maxLength": 64},
        {"type": "number", "minimum": 0, "maximum": _MAX_EPOCH_MS},
    ]


def _measurements_schema(schema: dict[str, Any]) -> None:
    # pydantic publishes patternProperties, which would let other names through with any value.
    names = schema.pop("patternProperties", {})
    schema["propertyNames"] = {"pattern": MEASUREMENT_NAME_PATTERN}
    schema["additionalProperties"] = next(iter(names.values()), {"type": "number"})


class Packet(BaseModel):
    """One sensor reading as published by the firmware."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    device_id: Annotated[str, Field(pattern=DEVICE_ID_PATTERN, description="1-64 of A-Z a-z 0-9 . _ : -")]
    timestamp: Annotated[
        datetime,
        Field(
            description="RFC 3339 with a zone offset, or seconds (milliseconds above 1e11) since the epoch",
            json_schema_extra=lambda schema: _timestamp_schema(schema),
        ),
    ]
    seq: Annotated[int | None, Field(ge=0, le=2**63 - 1, strict=True, description="per-device counter")] = None
    measurements: Annotated[
        dict[Annotated[str, Field(pattern=MEASUREMENT_NAME_PATTERN)], StrictFloat | StrictInt],
        Field(
            min_length=1,
            max_length=64,
            description="name -> finite number",
            json_schema_extra=lambda schema: _measurements_schema(schema),
        ),
    ]
    status: Status
    battery: Annotated[float | None, Field(ge=0, le=100, strict=True, description="percent")] = None

    @field_validator("seq", mode="before")
    @classmethod
    def _seq(cls, v: Any) -> Any:
        # JSON has one number type: 7450.0 is an integer to JSON Schema; true/"7" are not.
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            return int(v)
        return v

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be an RFC 3339 string or a number")
        if isinstance(v, int | float):
            try:
                finite = math.isfinite(v)
            except OverflowError:  # an integer too large for a float
                raise ValueError("epoch time out of range") from None
            if not finite or v < 0:
                raise ValueError("must be a finite, non-negative epoch time")
            seconds = v / 1000.0 if v > _MS_THRESHOLD else float(v)
            try:
                return datetime.fromtimestamp(seconds, tz=UTC)
            except (OverflowError, OSError, ValueError):
                raise ValueError("epoch time out of range") from None
        if isinstance(v, str):
            text = v.strip()
            if len(text) > 64:
                raise ValueError("timestamp string too long")
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValueError("must be RFC 3339, e.g. 2026-11-27T09:00:00Z") from None
            if parsed.tzinfo is None or parsed.utcoffset() is None:
                raise ValueError("timestamp has no zone offset (naive times are refused)")
            try:
                return parsed.astimezone(UTC)
            except OverflowError:
                raise ValueError("timestamp out of range") from None
        # Anything else, a datetime object too: every accepted value went through a branch above,
        # so it is aware UTC (no after-validator needed: one Python call less per packet).
        raise ValueError("must be an RFC 3339 string or a number")

    @field_validator("measurements")
    @classmethod
    def _finite(cls, v: dict[str, float | int]) -> dict[str, float | int]:
        for name, value in v.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"measurement {name!r} is not a finite number")
        return v

    def dedupe_key(self) -> str:
        """The redelivery key (unique per device): a redelivery is the same packet, so the same
        seq AND timestamp, ``seq:<n>@<UTC time text>``; a counter restarted by a reboot gives new
        keys. Without a seq, a hash of time and content. Migration 0002 rewrote older ``seq:<n>``
        keys to this form (in SQL: keep both in step)."""
        if self.seq is not None:
            return f"seq:{self.seq}@{ts_text(self.timestamp)}"
        body = json.dumps(
            [self.timestamp.isoformat(), self.measurements, self.status, self.battery],
            sort_keys=True,
            separators=(",", ":"),
        )
        return "h:" + hashlib.sha256(body.encode()).hexdigest()[:32]


def parse_packet(raw: bytes | str, *, max_bytes: int = MAX_PACKET_BYTES) -> Packet:
    """Validate raw JSON into a :class:`Packet`.

    Raises :class:`PacketInvalid` with ``reason`` and field errors (``loc``, ``msg``, ``type``).

    A valid packet costs one pydantic call (``model_validate_json``: parsing and validating in
    one pass, ~3x cheaper than ``json.loads`` and ``model_validate``). Only a packet it refuses
    takes the slow path, which names the reason as it always did. The fast path accepts nothing
    the slow path refuses, with equal values (``tests/test_packets.py`` checks this on generated
    input): both refuse NaN, invalid UTF-8, control characters in strings, and so on.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise PacketInvalid(
            "too_large",
            [{"loc": [], "msg": f"packet is {len(data)} bytes, the limit is {max_bytes}", "type": "too_large"}],
        )
    try:
        return Packet.model_validate_json(data)
    except Exception:  # refused (or crashed): the slow path says why, or raises the same
        pass
    return _parse_slow(data)


def _parse_slow(data: bytes) -> Packet:
    """:func:`parse_packet` in steps (decode, ``json.loads``, validate), each refusal with its reason."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PacketInvalid(
            "bad_encoding", [{"loc": [], "msg": f"not UTF-8 at byte {exc.start}", "type": "bad_encoding"}]
        ) from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        errors = [{"loc": [], "msg": f"invalid JSON: {exc}"[:300], "type": "bad_json"}]
        raise PacketInvalid("bad_json", errors) from None
    return validate_packet(obj)


def validate_packet(obj: Any) -> Packet:
    """Validate an already-decoded JSON value. Raises :class:`PacketInvalid`."""
    if not isinstance(obj, dict):
        raise PacketInvalid(
            "not_an_object", [{"loc": [], "msg": "packet must be a JSON object", "type": "not_an_object"}]
        )
    try:
        return Packet.model_validate(obj)
    except ValidationError as exc:
        raise PacketInvalid("schema", field_errors(exc)) from None


def field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors reduced to JSON-safe ``loc``/``msg``/``type`` (never the input value).

    ``loc`` holds the packet's own keys, so NUL and lone surrogates are escaped (:func:`safe_text`).
    A measurement that is not a number is one error (``number_type`` at ``measurements.<name>``),
    not one per branch of the float-or-int union pydantic validates it against.
    """
    out: list[dict[str, Any]] = []
    for e in exc.errors(include_url=False, include_input=False):
        loc = e["loc"]
        if len(loc) == 3 and loc[0] == "measurements" and loc[2] in _NUMBER_BRANCHES:
            if out and out[-1]["type"] == "number_type" and out[-1]["loc"][1] == safe_text(str(loc[1])):
                continue  # the union's other branch, already reported
            out.append(
                {"loc": ["measurements", safe_text(str(loc[1]))], "msg": "must be a number", "type": "number_type"}
            )
            continue
        out.append(
            {
                "loc": [safe_text(str(p)) for p in loc],
                "msg": safe_text(str(e["msg"]).removeprefix("Value error, ")),
                "type": e["type"],
            }
        )
    return out[:50]


_NUMBER_BRANCHES = frozenset({"float", "int"})
"""The union branch names pydantic appends to a measurement's error location."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def packet_json_schema() -> dict[str, Any]:
    """The JSON Schema served at ``GET /api/v1/schema/packet``."""
    schema = Packet.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Sensor packet"
    schema["description"] = "A JSON object published by a sensor, at most 64 KiB of UTF-8."
    return schema
