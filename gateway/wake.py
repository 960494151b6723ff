"""A level-triggered wake-up signal between stages (ingest → processor)."""

from __future__ import annotations

import math

import trio


class Nudge:
    """Wakes a waiting task; several ``set()`` calls before a wait count as one.

    Safe to call ``set()`` from any Trio task (not from other threads).
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        """Wake the waiter (now, or at its next wait)."""
        self._event.set()

    async def wait(self, timeout: float = math.inf) -> bool:  # noqa: ASYNC109 - a wake-or-tick wait
        """Wait until nudged or ``timeout`` seconds pass; returns True when nudged. Resets the signal."""
        with trio.move_on_after(timeout):
            await self._event.wait()
        nudged = self._event.is_set()
        if nudged:
            self._event = trio.Event()
        return nudged
