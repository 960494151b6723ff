"""Text every store and every JSON encoder accepts, made from text that came from outside.

PostgreSQL ``text``/``jsonb`` refuse U+0000, and no UTF-8 encoder (asyncpg, sqlite3, a strict JSON
response) accepts a lone surrogate, which JSON text may carry as ``\\ud800``. A packet's keys, a
topic or an error text can hold either, so whatever goes into a column or a response is passed
through here first: NUL becomes the four characters ``\\x00`` and a lone surrogate ``\\udXXX``
(escaped text: readable, and the original bytes stay in the reject's raw payload). Pure.
"""

from __future__ import annotations

import json
import math
from typing import Any

_MAX_DEPTH = 32


def safe_text(text: str) -> str:
    """``text`` unchanged when storable (the common case, checked cheaply), else escaped."""
    if "\x00" not in text:
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def safe_value(value: Any, depth: int = 0) -> Any:
    """A JSON value with every string (keys too) made safe; non-finite floats and anything that
    is not JSON become text, and nesting is cut at a fixed depth."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return safe_text(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {safe_text(str(k)): safe_value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [safe_value(v, depth + 1) for v in value]
    return safe_text(repr(value)[:300])


def safe_json(value: Any) -> str:
    """``value`` as JSON text that PostgreSQL ``jsonb`` and SQLite accept (see :func:`safe_value`)."""
    return json.dumps(safe_value(value))
