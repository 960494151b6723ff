"""The page cache of ``GET /api/v1/messages``: encoded pages kept for a short while.

How stale a cached page can be, at most:

- a commit by the API itself (:meth:`PageCache.clear`, after ``POST /packets``) drops every page at
  once, so a client reads its own writes;
- an ingest commit (:meth:`PageCache.invalidate`, called per committed batch) lets a page that was
  read before it be served for at most ``max_stale`` seconds (default 0.5) after that page's read
  began: under steady ingest the hot pages are rebuilt a few times a second instead of at every
  batch, and no committed row stays hidden longer than ``max_stale``;
- with no commit at all, a page lives ``ttl`` seconds (processing changes rows without an insert).

A page past half its life is rebuilt in the background by the next request that finds it
(:meth:`PageCache.lookup` says when), and concurrent requests for a page nobody has cached wait for
one read instead of each running their own (:meth:`PageCache.begin`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import trio

MAX_STALE = 0.5  # seconds an ingest commit may stay out of a cached page (documented in the README)


@dataclass(frozen=True, slots=True)
class CachedBody:
    """A serialised response body and its strong ETag."""

    body: bytes
    etag: str


@dataclass(frozen=True, slots=True)
class _Entry:
    generation: int  # PageCache.generation when the read began
    started: float  # monotonic time the read began
    expires: float  # monotonic time the ttl ends
    cached: CachedBody


@dataclass(frozen=True, slots=True)
class Build:
    """A page read under way (see :meth:`PageCache.begin`)."""

    generation: int
    started: float
    done: trio.Event


def etag_for(body: bytes) -> str:
    """A strong ETag for ``body`` (quoted, as sent in the header)."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


class PageCache:
    """Encoded message pages by query (see the module docstring). Plain data, Trio thread only."""

    def __init__(self, *, ttl: float = 1.0, max_stale: float = MAX_STALE, max_entries: int = 256) -> None:
        self.ttl = ttl
        self.max_stale = max_stale
        self.max_entries = max_entries
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._pages: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._builds: dict[Hashable, Build] = {}
        self._cleared_at = -float("inf")  # the last hard invalidation (monotonic)

    # ---- invalidation ------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Something new was committed: pages read before now expire within ``max_stale``."""
        self.generation += 1

    def clear(self) -> None:
        """Something new was committed and must show at once: drop every cached page."""
        self.generation += 1
        self._cleared_at = time.monotonic()
        self._pages.clear()

    # ---- pages -------------------------------------------------------------------------------

    def _deadline(self, entry: _Entry) -> float:
        if entry.generation == self.generation:
            return entry.expires
        return min(entry.expires, entry.started + self.max_stale)

    def lookup(self, key: Hashable) -> tuple[CachedBody | None, bool]:
        """The cached page for ``key`` if still fresh enough, and whether to rebuild it now (it is
        past half its life and nobody rebuilds it yet)."""
        entry = self._pages.get(key)
        if entry is None:
            self.misses += 1
            return None, False
        now = time.monotonic()
        deadline = self._deadline(entry)
        if now >= deadline:
            del self._pages[key]
            self.misses += 1
            return None, False
        self._pages.move_to_end(key)
        self.hits += 1
        refresh = now >= (entry.started + deadline) / 2 and key not in self._builds
        return entry.cached, refresh

    def get(self, key: Hashable) -> CachedBody | None:
        """A cached page for ``key`` if still fresh enough (see the module docstring)."""
        return self.lookup(key)[0]

    def building(self, key: Hashable) -> Build | None:
        """The read of ``key`` under way, if any."""
        return self._builds.get(key)

    def begin(self, key: Hashable) -> Build:
        """Register a read of ``key`` that starts now; :meth:`end` it whatever happens."""
        build = self._builds[key] = Build(self.generation, time.monotonic(), trio.Event())
        return build

    def end(self, key: Hashable, build: Build) -> None:
        """The read ``build`` is over (stored with :meth:`put` or failed): wake whoever waits."""
        if self._builds.get(key) is build:
            del self._builds[key]
        build.done.set()

    def put(self, key: Hashable, generation: int, body: bytes, *, started: float | None = None) -> CachedBody:
        """Cache ``body``, read from ``generation`` (begun at ``started``), unless it is already too
        stale: after a :meth:`clear`, or after an :meth:`invalidate` without ``started``."""
        cached = CachedBody(body, etag_for(body))
        now = time.monotonic()
        if started is None:
            if generation != self.generation:
                return cached
            started = now
        entry = _Entry(generation, started, now + self.ttl, cached)
        if started > self._cleared_at and now < self._deadline(entry):
            self._pages[key] = entry
            self._pages.move_to_end(key)
            while len(self._pages) > self.max_entries:
                self._pages.popitem(last=False)
        return cached
