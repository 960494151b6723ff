"""Test-only fault hooks, inert unless a test arms them explicitly.

The fault suite needs a gateway whose event loop really hangs, to show that the systemd watchdog
notices. :func:`hang_file` returns the path named by ``GATEWAY_TEST_HANG_FILE`` only when
``GATEWAY_TEST_HOOKS`` is also set to exactly :data:`ARMED`; the watchdog task then checks for that
file at each ping and, once it exists, blocks the event loop (a synchronous sleep, as a stuck C call
or a busy loop would). Neither variable is a setting, neither is documented for operators, and one
without the other does nothing, so production cannot trigger it by accident.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("gateway.testhooks")

ARMED = "hang-the-event-loop-on-purpose"


def hang_file(environ: Mapping[str, str]) -> Path | None:
    """The hang trigger file when both variables arm the hook, else None."""
    path = environ.get("GATEWAY_TEST_HANG_FILE")
    if not path or environ.get("GATEWAY_TEST_HOOKS") != ARMED:
        return None
    log.warning("test hook armed: the event loop hangs once %s exists", path)
    return Path(path)


def maybe_hang(trigger: Path | None) -> None:
    """Block the calling thread (the event loop) for an hour if ``trigger`` exists."""
    if trigger is not None and trigger.exists():
        log.warning("test hook: hanging the event loop")
        time.sleep(3600)
