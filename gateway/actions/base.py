"""What every action shares: how it reads the fields of a message (pure). The failure an action
raises, :class:`~gateway.errors.ActionFailed`, is part of the error tree."""

from __future__ import annotations

from typing import Any

from gateway.store.base import StoredMessage

#: Fields a rule condition may test, besides ``measurements.<name>``.
CONDITION_FIELDS = frozenset({"device_id", "status", "battery", "seq", "source"})
#: Fields a template or an SSE field selection may use, besides ``measurements.<name>``.
DATA_FIELDS = CONDITION_FIELDS | {"id", "timestamp", "received_at", "measurements", "attempts"}
NUMERIC_FIELDS = frozenset({"battery", "seq", "id", "attempts"})


def check_field(path: str, allowed: frozenset[str]) -> str | None:
    """Return a problem with ``path`` (unknown field, empty measurement name), or None when usable."""
    if path.startswith("measurements."):
        return None if path[len("measurements.") :] else "empty measurement name"
    if path in allowed:
        return None
    known = ", ".join(sorted(allowed | {"measurements.<name>"}))
    return f"unknown field {path!r} (known: {known})"


def is_numeric_field(path: str) -> bool:
    """True for fields holding numbers (measurements, battery, seq, ...)."""
    return path.startswith("measurements.") or path in NUMERIC_FIELDS


def field_value(message: StoredMessage, path: str) -> Any:
    """The value of a field path of ``message``, or None when absent (e.g. a missing measurement)."""
    if path.startswith("measurements."):
        return message.measurements.get(path[len("measurements.") :])
    match path:
        case "device_id":
            return message.device_id
        case "status":
            return message.status
        case "battery":
            return message.battery
        case "seq":
            return message.seq
        case "source":
            return message.source
        case "id":
            return message.id
        case "attempts":
            return message.attempts
        case "measurements":
            return dict(message.measurements)
        case "timestamp" | "received_at":
            return message.to_json()[path]
    return None


def only_keys(spec: Any, allowed: set[str]) -> None:
    """Raise ValueError when the table ``spec`` has keys outside ``allowed`` (typos fail loudly)."""
    if unknown := set(spec) - allowed:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
