"""Fixtures for the HTTP API: a real gateway HTTP server on port 0 over a real SQLite store and the
real Hub, with a recording publisher and one API key per role.

- ``api`` (function): a running :class:`ApiServer` with default settings.
- ``api_factory`` (function): ``async with api_factory(env={...}, heartbeat=0.2) as server:`` for
  custom settings (rate limits, TLS, no keys, ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.errors import MqttUnavailable
from gateway.health import Health
from gateway.http import AppContext, serve
from gateway.hub import Hub
from gateway.settings import Settings, load_settings
from gateway.store import open_store
from gateway.store.base import Store

ROLES = ("read", "write", "admin")


class RecordingPublisher:
    """A Publisher that records what it is given; ``full=True`` makes ``publish_nowait`` refuse."""

    def __init__(self) -> None:
        self.published: list[tuple[bytes, str | None]] = []
        self.full = False

    async def publish(self, payload: bytes, subtopic: str | None = None) -> None:
        self.published.append((payload, subtopic))

    def publish_nowait(self, payload: bytes, subtopic: str | None = None) -> None:
        if self.full:
            raise MqttUnavailable("outbound queue full")
        self.published.append((payload, subtopic))


def key_entry(name: str, role: str, key: str) -> str:
    """An ``API_KEYS`` entry for ``key``."""
    return f"{name}:{role}:{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass
class ApiServer:
    """A served API: its URL, one key per role, and the parts behind it."""

    url: str
    keys: dict[str, str]
    ctx: AppContext
    store: Store
    hub: Hub
    publisher: RecordingPublisher
    env_file: Path
    stop: trio.Event
    commits: list[float] = field(default_factory=list)
    verify: Any = True

    def client(self, role: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """An httpx client for this server, sending the key of ``role`` (none when None)."""
        headers = dict(kwargs.pop("headers", {}))
        if role is not None:
            headers["X-API-Key"] = self.keys[role]
        kwargs.setdefault("timeout", 10.0)
        kwargs.setdefault("verify", self.verify)
        return httpx.AsyncClient(base_url=self.url, headers=headers, **kwargs)

    def write_env(self, values: Mapping[str, str]) -> None:
        """Replace the .env file that ``reload`` reads."""
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")


def _default_env(tmp: Path, keys: dict[str, str]) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp / 'gateway.db'}",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "0",
        "API_KEYS": ",".join(key_entry(f"test-{role}", role, keys[role]) for role in ROLES),
        "RATE_LIMIT": "100000/second",
        "LOG_FILE": "",
    }


@asynccontextmanager
async def running_api(
    tmp: Path,
    env: Mapping[str, str | None] | None = None,
    *,
    heartbeat: float = 14.0,
    verify: Any = True,
) -> AsyncIterator[ApiServer]:
    """Start store, hub and HTTP server; yield an :class:`ApiServer`; stop them all on exit.

    ``env`` overrides the defaults (a value of None removes the variable). The reload callback
    re-reads the .env file (``server.write_env``) so tests can change settings live.
    """
    keys = {role: f"{role}-key-{tmp.name}" for role in ROLES}
    values: dict[str, str] = _default_env(tmp, keys)
    for k, v in (env or {}).items():
        if v is None:
            values.pop(k, None)
        else:
            values[k] = v
    env_file = tmp / "gateway.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    settings = load_settings(env_file, environ={})
    commits: list[float] = []
    publisher = RecordingPublisher()
    stop = trio.Event()
    async with open_store(settings.database) as store, trio.open_nursery() as nursery:
        await nursery.start(store.run)
        hub = Hub(store, poll_interval=0.05)
        await nursery.start(hub.run)

        async def reload() -> dict[str, Any]:
            new: Settings = load_settings(env_file, environ={})
            changed = sorted(v for variables in ctx.settings.diff(new).values() for v in variables)
            ctx.reconfigure(new.http)
            return {"changed": changed, "restarted": []}

        ctx = AppContext(
            settings=settings,
            store=store,
            hub=hub,
            publisher=publisher,
            health=Health(),
            on_commit=lambda: commits.append(trio.current_time()),
            reload=reload,
            version="test",
            sse_heartbeat=heartbeat,
        )
        port = await nursery.start(lambda task_status: serve(ctx, stop=stop, task_status=task_status))
        scheme = "https" if settings.http.tls else "http"
        host = "localhost" if settings.http.tls else "127.0.0.1"
        server = ApiServer(
            url=f"{scheme}://{host}:{port}",
            keys=keys,
            ctx=ctx,
            store=store,
            hub=hub,
            publisher=publisher,
            env_file=env_file,
            stop=stop,
            commits=commits,
            verify=verify,
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiServer]:
    """A running API with default settings and one key per role."""
    async with running_api(tmp_path) as server:
        yield server


@pytest.fixture
def api_factory(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[ApiServer]]:
    """``async with api_factory(env={...}, heartbeat=...) as server`` for custom settings."""
    counter = iter(range(1000))

    def factory(env: Mapping[str, str | None] | None = None, **kwargs: Any) -> AbstractAsyncContextManager[ApiServer]:
        sub = tmp_path / f"api{next(counter)}"
        sub.mkdir()
        return running_api(sub, env, **kwargs)

    return factory
