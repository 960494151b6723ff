"""Payload templates: JSON-like values whose strings may hold ``{field}`` placeholders (pure).

A string that is exactly one placeholder is replaced by the raw value (a number stays a number, an
absent measurement becomes ``null``); inside longer text the value is formatted (absent → empty).
``{{`` and ``}}`` are literal braces. Placeholders are checked when the rules load, never evaluated
as code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.actions.base import DATA_FIELDS, check_field, field_value
from gateway.store.base import StoredMessage

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
#: Placeholders besides the message fields.
CONTEXT_NAMES = frozenset({"rule", "event_id", "message_id"})


@dataclass(frozen=True, slots=True)
class Context:
    """What a placeholder can refer to besides the message."""

    message: StoredMessage
    rule: str
    event_id: int | None


_Render = Callable[[Context], Any]


class Template:
    """A compiled payload template. Raises ValueError at construction for an unknown placeholder."""

    def __init__(self, value: Any) -> None:
        self.source = value
        self._render = _compile(value, "payload")

    def render(self, ctx: Context) -> Any:
        """The value with every placeholder filled in."""
        return self._render(ctx)


def _lookup(name: str, ctx: Context) -> Any:
    if name == "rule":
        return ctx.rule
    if name == "event_id":
        return ctx.event_id
    if name == "message_id":
        return ctx.message.id
    return field_value(ctx.message, name)


def _check_name(name: str, where: str) -> str:
    name = name.strip()
    if name in CONTEXT_NAMES:
        return name
    if problem := check_field(name, DATA_FIELDS):
        raise ValueError(f"{where}: placeholder {{{name}}}: {problem}")
    return name


def _compile(value: Any, where: str) -> _Render:
    if isinstance(value, dict):
        items = [(str(k), _compile(v, f"{where}.{k}")) for k, v in value.items()]
        return lambda ctx: {k: r(ctx) for k, r in items}
    if isinstance(value, list):
        parts = [_compile(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return lambda ctx: [r(ctx) for r in parts]
    if not isinstance(value, str):
        if not isinstance(value, int | float | bool):
            raise ValueError(f"{where}: unsupported value of type {type(value).__name__}")
        return lambda ctx: value
    whole = _TOKEN.fullmatch(value)
    if whole and whole.group(1) is not None:
        name = _check_name(whole.group(1), where)
        return lambda ctx: _lookup(name, ctx)
    pieces: list[str | tuple[str]] = []  # literal text, or (placeholder,)
    pos = 0
    for m in _TOKEN.finditer(value):
        pieces.append(value[pos : m.start()])
        token = m.group(0)
        pieces.append(token[0] if m.group(1) is None else (_check_name(m.group(1), where),))
        pos = m.end()
    pieces.append(value[pos:])
    if not any(isinstance(p, tuple) for p in pieces):
        text = "".join(p for p in pieces if isinstance(p, str))
        return lambda ctx: text

    def render(ctx: Context) -> str:
        out = []
        for p in pieces:
            if isinstance(p, str):
                out.append(p)
            else:
                v = _lookup(p[0], ctx)
                out.append("" if v is None else str(v))
        return "".join(out)

    return render
