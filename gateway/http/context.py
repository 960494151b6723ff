"""What the HTTP layer needs from the rest of the gateway, handed in once by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.health import Health
from gateway.http.cache import PageCache
from gateway.http.memo import Memo
from gateway.http.query import BUILTIN_EVENT_TYPES
from gateway.hub import Hub
from gateway.latest import LatestReadings
from gateway.publish import Publisher
from gateway.settings import HttpSettings, Settings
from gateway.store.base import Backlog, Store


@dataclass
class AppContext:
    """Everything the API serves from.

    Handlers read ``settings.http`` on every request, so what :meth:`reconfigure` changes (API keys,
    the rate limit, CORS origins, the body limit, trusted proxies: ``HttpSettings.LIVE``) applies at
    once. ``hub.subscribe(last_event_id=, types=, device_id=)`` is an async context manager yielding
    an async iterator of :class:`~gateway.store.base.Event`. ``on_commit`` is called after
    ``POST /packets`` stored something (it wakes the processor). ``reload`` re-reads the
    configuration and applies it; it raises ConfigError for an invalid one. ``pages`` caches
    ``/messages`` pages (the app invalidates it per ingest commit), ``latest`` is the latest reading
    per device (ingest feeds it), ``backlog`` keeps ``/ping``'s backlog figures for a second.
    """

    settings: Settings
    store: Store
    hub: Hub
    publisher: Publisher
    health: Health
    on_commit: Callable[[], None]
    reload: Callable[[], Awaitable[dict[str, Any]]]
    version: str
    pages: PageCache = field(default_factory=PageCache)
    latest: LatestReadings = field(default_factory=LatestReadings)
    backlog: Memo[Backlog] = field(default_factory=Memo)
    event_types: Callable[[], frozenset[str]] = field(default=lambda: BUILTIN_EVENT_TYPES)
    """The event types the gateway emits now (``GET /events?types=`` refuses others)."""
    sse_heartbeat: float = 14.0  # the contract promises a comment at least every 15 s
    sse_retry_ms: int = 3000

    def reconfigure(self, http: HttpSettings) -> None:
        """Serve the next requests with ``http`` (the listener keeps its address and TLS files)."""
        self.settings = self.settings.model_copy(update={"http": http})
