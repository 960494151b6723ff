"""The ``script`` action: run an executable with the event JSON on stdin, never through a shell.

A non-zero exit, a timeout or a program that cannot start raises :class:`ActionFailed`; the message is
then retried with backoff. The program's output goes to the log. Scripts may run again for the same
message (after a failure of another action, or a crash), so stdin carries a stable ``key`` to make them
idempotent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from gateway.actions.base import ActionFailed, only_keys
from gateway.store.base import StoredMessage

log = logging.getLogger("gateway.actions.script")
_OUTPUT_LOGGED = 2000  # characters of stdout/stderr kept in the log and the error


@dataclass(frozen=True, slots=True)
class ScriptAction:
    """Run ``command`` (argv list) with ``timeout`` seconds (None: the processor's default)."""

    command: tuple[str, ...]
    timeout: float | None = None

    type = "script"

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> ScriptAction:
        """Build from a rules-file table; raises ValueError when the command is unusable."""
        only_keys(spec, {"type", "command", "timeout"})
        command = spec.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and "\x00" not in a for a in command)
        ):
            raise ValueError('command must be a non-empty list of strings, e.g. ["/usr/local/bin/x", "arg"]')
        exe = command[0]
        found = exe if os.sep in exe else shutil.which(exe)
        if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise ValueError(f"command {exe!r} is not an executable file")
        timeout = spec.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= 3600
            or math.isnan(timeout)
        ):
            raise ValueError("timeout must be a number of seconds in (0, 3600]")
        return cls(command=tuple(command), timeout=float(timeout) if timeout is not None else None)

    async def run(self, message: StoredMessage, *, rule: str, key: str, default_timeout: float) -> None:
        """Run the command once for ``message``; raises ActionFailed on a non-zero exit or timeout."""
        stdin = json.dumps(
            {"rule": rule, "key": key, "message_id": message.id, "data": message.to_json()},
            separators=(",", ":"),
        ).encode()
        timeout = self.timeout if self.timeout is not None else default_timeout
        ctx = f"rule={rule} message_id={message.id} device_id={message.device_id} command={self.command[0]}"
        result: subprocess.CompletedProcess[bytes] | None = None
        try:
            # The cancel scope is the timeout: trio kills the process when it is cancelled.
            with trio.move_on_after(timeout):
                result = await trio.run_process(
                    list(self.command), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
                )
        except OSError as exc:
            raise ActionFailed("script", f"cannot run {self.command[0]}: {exc}") from exc
        if result is None:
            raise ActionFailed("script", f"timed out after {timeout:g}s")
        out = _text(result.stdout)
        err = _text(result.stderr)
        if out:
            log.info("script output %s stdout=%r", ctx, out)
        if result.returncode != 0:
            if err:
                log.warning("script stderr %s stderr=%r", ctx, err)
            detail = f": {err.strip().splitlines()[-1]}" if err.strip() else ""
            raise ActionFailed("script", f"exit status {result.returncode}{detail}")
        if err:
            log.info("script stderr %s stderr=%r", ctx, err)


def _text(data: bytes | None) -> str:
    return (data or b"")[:_OUTPUT_LOGGED].decode("utf-8", "replace")
