"""Storage backends behind the :class:`~gateway.store.base.Store` protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.settings import DatabaseSettings
from gateway.store.base import Store


@asynccontextmanager
async def open_store(settings: DatabaseSettings) -> AsyncIterator[Store]:
    """Open the store the URL selects. Call ``store.run()`` in a nursery to connect it.

    For PostgreSQL this also opens the trio-asyncio loop; tasks that use the store must run
    inside this context (nurseries opened within it inherit the loop).
    """
    if settings.kind == "sqlite":
        from gateway.store.sqlite import SqliteStore

        yield SqliteStore(settings)
    else:
        from gateway.store.postgres import open_postgres

        async with open_postgres(settings) as pg:
            yield pg
