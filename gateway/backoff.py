"""Exponential backoff, shared by everything that retries.

Pure: no sleeping and no clock here; the caller sleeps the delay (``trio.sleep``), so the timing is
testable on ``autojump_clock`` and deterministic with a seeded ``rng``.
"""

from __future__ import annotations

import math
import random
from typing import Literal

Jitter = Literal["floor", "equal", "full"]


class Backoff:
    """Delays whose ceiling grows by ``factor`` per attempt from ``min`` up to ``max``.

    Attempt ``n`` (from 0) has the ceiling ``c = min(max, min * factor**n)``; its delay is drawn
    uniformly at random, so many clients that failed together do not retry together, from

    - ``"floor"`` (default): ``[min, c]``, "full jitter" above the floor, no retry sooner than ``min``;
    - ``"equal"``: ``[c/2, c]``, half fixed, half random (delays still grow with every attempt);
    - ``"full"``: ``[0, c]``, classic full jitter.

    :meth:`delay` is the delay of any attempt number (for callers that keep the count themselves,
    e.g. in the database); :meth:`next` counts attempts itself and :meth:`reset` starts over after
    a success.
    """

    __slots__ = ("_attempt", "_cap_at", "_rng", "factor", "jitter", "max", "min")

    def __init__(
        self,
        min: float,
        max: float,
        *,
        factor: float = 2.0,
        jitter: Jitter = "floor",
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min <= max:
            raise ValueError(f"need 0 < min <= max, got min={min} max={max}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.min = min
        self.max = max
        self.factor = factor
        self.jitter: Jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0
        # The first attempt whose ceiling is max: no factor**n is ever computed past it (no overflow).
        self._cap_at = 0 if min == max or factor == 1 else math.ceil(math.log(max / min, factor))

    @property
    def attempt(self) -> int:
        """How many delays :meth:`next` handed out since the last reset."""
        return self._attempt

    def ceiling(self, attempt: int) -> float:
        """The largest delay of attempt ``attempt`` (0-based): ``min(max, min * factor**attempt)``."""
        if attempt >= self._cap_at:
            return self.min if self.factor == 1 else self.max
        return min(self.max, self.min * self.factor ** max(attempt, 0))

    def delay(self, attempt: int) -> float:
        """The delay in seconds before retry ``attempt`` (0-based), jittered as configured."""
        ceiling = self.ceiling(attempt)
        low = self.min if self.jitter == "floor" else ceiling / 2 if self.jitter == "equal" else 0.0
        return self._rng.uniform(low, ceiling)

    def next(self) -> float:
        """Return the next delay in seconds and count the attempt."""
        delay = self.delay(self._attempt)
        self._attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the first attempt (call after a success)."""
        self._attempt = 0
