"""A value read at most once per period whatever the request rate: ``/ping``'s backlog figures.

Monitors poll ``/ping``; the database needn't answer each of them. One request reads; requests
meanwhile get the previous value (or, before the first one, wait for that read). A failure is
kept for the period too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

from gateway.errors import StoreError

T = TypeVar("T")


class Memo(Generic[T]):
    """The last result of a store read (None: it failed), read again once ``every`` seconds passed."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._value: tuple[float, T | None] | None = None  # (monotonic time, result)
        self._reading: trio.Event | None = None

    async def get(self, read: Callable[[], Awaitable[T]]) -> T | None:
        """The memoised result, calling ``read()`` when it is older than ``every`` and nobody reads
        yet; None when the last read raised StoreError."""
        while True:
            cached = self._value
            if cached is not None and (time.monotonic() - cached[0] < self.every or self._reading is not None):
                return cached[1]
            if self._reading is None:
                break
            await self._reading.wait()
        self._reading = done = trio.Event()
        try:
            value: T | None
            try:
                value = await read()
            except StoreError:
                value = None
            self._value = (time.monotonic(), value)
        finally:  # cancelled too: whoever waits reads it themselves
            self._reading = None
            done.set()
        return value
