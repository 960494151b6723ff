"""Exponential backoff with full jitter, shared by everything that retries.

Pure: no sleeping and no clock here; the caller sleeps ``next()`` seconds (``trio.sleep``), so the
timing is testable on ``autojump_clock`` and deterministic with a seeded ``rng``.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays that grow by ``factor`` from ``min`` up to ``max``, each drawn uniformly at random.

    The n-th call of :meth:`next` (from 0) returns a delay in ``[min, min(max, min * factor**n)]``:
    "full jitter" above the floor, so many clients that failed together do not retry together,
    while no retry comes sooner than ``min``. :meth:`reset` starts over after a success.
    """

    __slots__ = ("_attempt", "_ceiling", "_rng", "factor", "max", "min")

    def __init__(self, min: float, max: float, *, factor: float = 2.0, rng: random.Random | None = None) -> None:
        if not 0 < min <= max:
            raise ValueError(f"need 0 < min <= max, got min={min} max={max}")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.min = min
        self.max = max
        self.factor = factor
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0
        self._ceiling = min

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last reset."""
        return self._attempt

    def next(self) -> float:
        """Return the next delay in seconds and grow the ceiling for the one after."""
        ceiling = self._ceiling
        self._attempt += 1
        # Grow by multiplication (not factor**n) so it never overflows, however long the outage.
        self._ceiling = self.max if ceiling * self.factor >= self.max else ceiling * self.factor
        return self._rng.uniform(self.min, ceiling)

    def reset(self) -> None:
        """Start again from ``min`` (call after a success)."""
        self._attempt = 0
        self._ceiling = self.min


def retry_delay(attempt: int, retry_min: float, retry_max: float) -> float:
    """Seconds before retry number ``attempt`` (1-based): exponential from ``retry_min``, jittered."""
    backoff = Backoff(retry_min, max(retry_min, retry_max))
    delay = 0.0
    for _ in range(min(attempt, 64)):
        delay = backoff.next()
    return delay
