"""The ``script`` action: run an executable with the event JSON on stdin, never through a shell.

A non-zero exit, a timeout or a program that cannot start raises :class:`ActionFailed`; the message is
then retried with backoff. The program's output goes to the log. Scripts may run again for the same
message (after a failure of another action, or a crash), so stdin carries a stable ``key`` to make them
idempotent.

The child gets a minimal environment (``PATH``, ``HOME``, ``LANG``, ``LC_ALL``, ``LC_CTYPE``, ``TZ``,
``TMPDIR`` when set) plus the rule's own ``env`` table: never the gateway's secrets. It runs in its own
session (process group); on a timeout, or when the gateway stops, the whole group is killed, so no
grandchild is left behind. Output is bounded while it is read. A background child that keeps the
pipes open does not hold up a script that has exited: its exit status decides, after a short grace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from gateway.actions.base import only_keys
from gateway.errors import ActionFailed
from gateway.store.base import StoredMessage

log = logging.getLogger("gateway.actions.script")
_OUTPUT_LOGGED = 2000  # bytes of stdout (the first) and stderr (the last) kept, in the log and the error
_READ_CHUNK = 65536
_OUTPUT_GRACE = 0.5  # seconds the pipes may stay open after the script exited (a background child)
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class ScriptAction:
    """Run ``command`` (argv list) with ``timeout`` seconds (None: the processor's default).

    ``env``: extra environment variables for the child, from the rule's ``env`` table.
    """

    command: tuple[str, ...]
    timeout: float | None = None
    env: tuple[tuple[str, str], ...] = ()

    type = "script"

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> ScriptAction:
        """Build from a rules-file table; raises ValueError when the command is unusable."""
        only_keys(spec, {"type", "command", "timeout", "env"})
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
        return cls(
            command=tuple(command),
            timeout=float(timeout) if timeout is not None else None,
            env=_parse_env(spec.get("env", {})),
        )

    def environment(self) -> dict[str, str]:
        """The child's whole environment: the few variables passed on, then the rule's ``env``."""
        env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
        env.setdefault("PATH", _DEFAULT_PATH)
        env.update(self.env)
        return env

    async def run(self, message: StoredMessage, *, rule: str, key: str, default_timeout: float) -> None:
        """Run the command once for ``message``; raises ActionFailed on a non-zero exit or timeout."""
        stdin = json.dumps(
            {"rule": rule, "key": key, "message_id": message.id, "data": message.to_json()},
            separators=(",", ":"),
        ).encode()
        timeout = self.timeout if self.timeout is not None else default_timeout
        ctx = f"rule={rule} message_id={message.id} device_id={message.device_id} command={self.command[0]}"
        try:
            result = await run_bounded(list(self.command), stdin, self.environment(), timeout)
        except OSError as exc:
            raise ActionFailed("script", f"cannot run {self.command[0]}: {exc}") from exc
        if result.returncode is None:
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


def _parse_env(table: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(table, dict):
        raise ValueError('env must be a table of NAME = "value"')
    out: list[tuple[str, str]] = []
    for name, value in table.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(f"env: {name!r} is not a variable name (letters, digits, _)")
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"env: {name} must be a string without NUL")
        out.append((name, value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ScriptResult:
    """What a script left: its exit status (None: killed on timeout) and its bounded output."""

    returncode: int | None
    stdout: bytes
    stderr: bytes


# The limit is the process's own, not the pipes' after it exited: not a caller's cancel scope.
async def run_bounded(
    argv: list[str],
    stdin: bytes,
    env: dict[str, str],
    timeout: float,  # noqa: ASYNC109
) -> ScriptResult:
    """Run ``argv`` in a new session with ``stdin``; keep the first ``_OUTPUT_LOGGED`` bytes of stdout
    and the last of stderr while reading. Returns once it exited (and its pipes closed, or after a
    short grace), or after ``timeout`` with its whole process group killed (``returncode`` None).
    Cancellation kills the group too. Raises OSError when the program cannot start.
    """
    proc = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            drained = [trio.Event(), trio.Event()]
            nursery.start_soon(_feed, proc.stdin, stdin)
            nursery.start_soon(_drain, proc.stdout, out, False, drained[0])
            nursery.start_soon(_drain, proc.stderr, err, True, drained[1])
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.returncode is None:
                timed_out = True
                _kill_group(proc.pid)
            else:
                # A background child may hold the pipes open for ever: the exit decides.
                with trio.move_on_after(_OUTPUT_GRACE):
                    for event in drained:
                        await event.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                _kill_group(proc.pid)
                with trio.move_on_after(5):
                    await proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                await stream.aclose()
    return ScriptResult(None if timed_out else proc.returncode, bytes(out), bytes(err))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, signal.SIGKILL)


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the script does not read its stdin: fine
    finally:
        await stream.aclose()


async def _drain(stream: trio.abc.ReceiveStream, buf: bytearray, keep_tail: bool, done: trio.Event) -> None:
    """Read ``stream`` to its end, keeping at most ``_OUTPUT_LOGGED`` bytes (the head, or the tail)."""
    try:
        while chunk := await stream.receive_some(_READ_CHUNK):
            if keep_tail:
                buf += chunk
                del buf[:-_OUTPUT_LOGGED]
            elif len(buf) < _OUTPUT_LOGGED:
                buf += chunk[: _OUTPUT_LOGGED - len(buf)]
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")
