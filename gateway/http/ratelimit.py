"""A small in-memory token-bucket rate limiter, one bucket per client identity.

Written here rather than using quart-rate-limiter, whose 429 carries ``Retry-After`` twice
(FACTS.md). Limits are passed on every call so a reload changes them live.
"""

from __future__ import annotations

import math
import time


class RateLimiter:
    """``count`` requests per ``period`` seconds per identity, with bursts up to ``count``."""

    def __init__(self, *, max_identities: int = 50_000) -> None:
        self.max_identities = max_identities
        self._limit: tuple[int, float] | None = None
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, identity: str, count: int, period: float, now: float | None = None) -> float:
        """Take one token for ``identity``. Returns 0 when allowed, else seconds until one is free."""
        if (count, period) != self._limit:
            # A new limit (reload) starts everyone with a full bucket.
            self._limit = (count, period)
            self._buckets.clear()
        now = time.monotonic() if now is None else now
        rate = count / period
        tokens, last = self._buckets.get(identity, (float(count), now))
        tokens = min(float(count), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[identity] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_identities:
                self._prune(now, count, rate)
            return 0.0
        self._buckets[identity] = (tokens, now)
        return (1.0 - tokens) / rate

    def _prune(self, now: float, count: int, rate: float) -> None:
        """Forget buckets that have refilled completely (they behave like new ones)."""
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * rate >= count]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.max_identities:
            self._buckets.pop(next(iter(self._buckets)))


def retry_after_header(wait: float) -> str:
    """``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
