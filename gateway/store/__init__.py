"""Storage backends behind the :class:`~gateway.store.base.Store` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.health import ComponentHealth
from gateway.settings import DatabaseSettings
from gateway.store.base import Store


@asynccontextmanager
async def open_store(settings: DatabaseSettings, health: ComponentHealth | None = None) -> AsyncIterator[Store]:
    """Open the store the URL selects. Call ``store.run()`` in a nursery to connect it.

    The store keeps ``health`` (default: a new ``database`` record) up to date itself.

    For PostgreSQL this also opens the trio-asyncio loop; tasks that use the store must run
    inside this context (nurseries opened within it inherit the loop).
    """
    if settings.kind == "sqlite":
        from gateway.store.sqlite import SqliteStore

        yield SqliteStore(settings, health)
    else:
        from gateway.store.postgres import open_postgres

        async with open_postgres(settings, health) as pg:
            yield pg
