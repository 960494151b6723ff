"""What the HTTP layer needs from the rest of the gateway, handed in once by the composition root."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.health import Health
from gateway.http.cache import LiveView
from gateway.hub import Hub
from gateway.publish import Publisher
from gateway.settings import Settings
from gateway.store.base import Store


@dataclass
class AppContext:
    """Everything the API serves from.

    ``settings`` is replaced on reload; handlers read ``settings.http`` on every request, so API keys,
    the rate limit and the body limit change live. ``hub.subscribe(last_event_id=, types=, device_id=)``
    is an async context manager yielding an async iterator of :class:`~gateway.store.base.Event`.
    ``on_commit`` is called after ``POST /packets`` stored something (it wakes the processor).
    ``reload`` re-reads the configuration and applies it; it raises ConfigError for an invalid one.
    ``live`` holds the message-query cache generation and the latest reading per device: ingest may
    call ``live.stored(...)`` after each commit so cached pages are dropped at once (otherwise they
    expire after ``live.ttl`` seconds).
    """

    settings: Settings
    store: Store
    hub: Hub
    publisher: Publisher
    health: Health
    on_commit: Callable[[], None]
    reload: Callable[[], Awaitable[dict[str, Any]]]
    version: str
    live: LiveView = field(default_factory=LiveView)
    sse_heartbeat: float = 14.0  # the contract promises a comment at least every 15 s
    sse_retry_ms: int = 3000
