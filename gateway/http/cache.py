"""In-memory views kept by the HTTP layer: a short-lived cache of message pages and the latest
reading of each device.

The cache key includes a generation counter that every commit bumps (:meth:`LiveView.stored` /
:meth:`LiveView.invalidate`), so a new insert makes every cached page stale at once; entries also
expire after ``ttl`` seconds because processing changes rows (``processed_at``) without an insert.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CachedBody:
    """A serialised response body and its strong ETag."""

    body: bytes
    etag: str


def etag_for(body: bytes) -> str:
    """A strong ETag for ``body`` (quoted, as sent in the header)."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class LiveView:
    """Message-page cache plus latest reading per device. Plain data, Trio-thread only."""

    def __init__(self, *, ttl: float = 1.0, max_entries: int = 256, max_devices: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_devices = max_devices
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._pages: OrderedDict[Hashable, tuple[int, float, CachedBody]] = OrderedDict()
        self._latest: dict[str, dict[str, Any]] = {}
        # /ping's backlog figures, reused for up to a second: monitors poll, the database needn't.
        self.backlog: tuple[float, Any] | None = None

    def invalidate(self) -> None:
        """Make every cached page stale (call after anything new was committed)."""
        self.generation += 1
        self._pages.clear()

    def stored(self, readings: Iterable[Mapping[str, Any]] = ()) -> None:
        """Record committed readings (dicts with ``device_id``) and drop cached pages."""
        self.invalidate()
        for reading in readings:
            device = reading.get("device_id")
            if isinstance(device, str):
                if device not in self._latest and len(self._latest) >= self.max_devices:
                    # Forget the oldest device seen rather than grow without bound.
                    self._latest.pop(next(iter(self._latest)))
                self._latest.pop(device, None)
                self._latest[device] = dict(reading)

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest reading per device (a copy, sorted by device id)."""
        return {k: self._latest[k] for k in sorted(self._latest)}

    def get(self, key: Hashable) -> CachedBody | None:
        """A cached page for ``key`` if it is from this generation and fresh."""
        entry = self._pages.get(key)
        if entry is None:
            self.misses += 1
            return None
        generation, expires, cached = entry
        if generation != self.generation or time.monotonic() >= expires:
            del self._pages[key]
            self.misses += 1
            return None
        self._pages.move_to_end(key)
        self.hits += 1
        return cached

    def put(self, key: Hashable, generation: int, body: bytes) -> CachedBody:
        """Cache ``body`` for ``key`` if nothing was committed since ``generation`` was read."""
        cached = CachedBody(body, etag_for(body))
        if generation == self.generation:
            self._pages[key] = (generation, time.monotonic() + self.ttl, cached)
            self._pages.move_to_end(key)
            while len(self._pages) > self.max_entries:
                self._pages.popitem(last=False)
        return cached
