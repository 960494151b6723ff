"""Logging: a rotating file plus stderr (journald), text or JSON, with secret redaction.

Every line carries a timestamp, the level, the logger (the log type: ``gateway.mqtt``,
``gateway.http``, ...) and the message with key=value context. The handlers sit on the root
logger, so every library's records (asyncpg, hypercorn, quart, ...) pass the same
:class:`RedactingFilter` on each handler, which removes passwords, API keys, DSN passwords and
bearer tokens before anything is written, whatever the call site passed in.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.settings import MASK as _MASK
from gateway.settings import URL_PASSWORD_IN_TEXT, LogSettings

# A configured secret this long is masked wherever it appears; a shorter one (``postgres``) only
# where it stands as a secret (URL password, ``password=``), or every such word would be masked.
_LITERAL_MIN = 12

# Patterns for secrets that may appear in free text: DSN passwords, bearer tokens, key=value pairs.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (URL_PASSWORD_IN_TEXT, r"\1" + _MASK + "@"),
    (re.compile(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]+)"), r"\1" + _MASK),
    (
        re.compile(
            r"(?i)((?:password|passwd|pwd|secret|token|api[_-]?key|access_token|apikey|x-api-key)"
            r"[\"']?\s*[=:]\s*[\"']?)([^\s\"'&,;]+)"
        ),
        r"\1" + _MASK,
    ),
)


class RedactingFilter(logging.Filter):
    """Removes secrets from a record's message (and exception text) before any handler formats it.

    Known secret values (passwords, keys from the configuration) are replaced wherever they appear;
    patterns catch DSN passwords, bearer tokens and ``password=...``-style pairs.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """Replace the literal secret values masked wherever they appear (longest first; values
        shorter than ``_LITERAL_MIN`` are left to the context patterns)."""
        self._secrets = sorted({s for s in secrets if len(s) >= _LITERAL_MIN}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """Return ``text`` with every known secret and secret-looking value masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Render the message once, redact it, and freeze it on the record.

        Every handler carries this filter: a record already redacted by one is passed as it is
        (the work would be the same, about half an access line's cost)."""
        if getattr(record, "_redacted", False):
            return True
        record._redacted = True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


# Characters that could end a line or fake one (C0, DEL, C1, Unicode line/paragraph separators).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_control(text: str) -> str:
    """``text`` with control characters written as ``\\n``, ``\\x1b``, ``\\u2028``...

    Applied by both formatters to every rendered message, so a path, topic, device id or header
    from outside can never start a fake log line or drive a terminal, whichever logger logs it.
    """
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


class TextFormatter(logging.Formatter):
    """``2026-11-27T09:00:00.123Z INFO gateway.mqtt connected host=... session_present=True``.

    One record is one line; a traceback follows on lines indented by two spaces, so only a record
    starts a line at column 0.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"{ts} {record.levelname} {record.name} {escape_control(record.getMessage())}"
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            line += "".join("\n  " + escape_control(part) for part in exc.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` and the parsed key=value context."""

    _KV = re.compile(r"(\w+)=(\S+)")

    def format(self, record: logging.LogRecord) -> str:
        message = escape_control(record.getMessage())
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
        }
        context = dict(self._KV.findall(message))
        if context:
            out["ctx"] = context
        exc = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exc:
            out["exc"] = exc
        return json.dumps(out, ensure_ascii=False)


_installed: list[logging.Handler] = []
_filter = RedactingFilter()


_LIBRARIES = ("hypercorn", "hypercorn.error", "quart", "asyncio", "trio_asyncio", "asyncpg", "paho")


def setup_logging(settings: LogSettings, secrets: Iterable[str] = (), *, stderr: bool = True) -> None:
    """Install the gateway's handlers on the root logger (replacing earlier ones): every logger,
    a library's too, goes through the redacting handlers. ``gateway.*`` logs at the configured level,
    libraries from WARNING.

    Creates the log directory when needed. Safe to call again on reload (level, format, secrets).
    """
    root = logging.getLogger()
    gateway = logging.getLogger("gateway")
    for handler in _installed:
        for logger in (root, gateway, *(logging.getLogger(name) for name in _LIBRARIES)):
            logger.removeHandler(handler)
        handler.close()
    _installed.clear()
    _filter.set_secrets(secrets)
    formatter: logging.Formatter = JsonFormatter() if settings.format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    if settings.file is not None:
        Path(settings.file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                settings.file, maxBytes=settings.max_bytes, backupCount=settings.backup_count, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.addFilter(_filter)
        handler.setFormatter(formatter)
        root.addHandler(handler)
        _installed.append(handler)
    root.setLevel(logging.WARNING)  # any other library: warnings and worse
    gateway.setLevel(settings.level)
    gateway.propagate = True
    # Libraries we know log through their own loggers; keep their noise out unless it is a warning.
    for name in _LIBRARIES:
        lib = logging.getLogger(name)
        lib.setLevel(logging.WARNING)
        lib.propagate = True


def set_level(level: str) -> None:
    """Change the gateway's log level live."""
    logging.getLogger("gateway").setLevel(level)


def redact(text: str) -> str:
    """Mask secrets in ``text`` with the installed filter (for error bodies and messages)."""
    return _filter.redact(text)
