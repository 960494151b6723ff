"""Shared test configuration: environment isolation and the fixture plugins of each area."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Each area owns its support module (fixtures and helpers); listed here so every test sees them.
pytest_plugins = [
    "tests.support.pg",
    "tests.support.mqtt",
    "tests.support.http",
]

_OUR_PREFIXES = (
    "DATABASE_",
    "MQTT_",
    "HTTP_",
    "API_KEYS",
    "RATE_LIMIT",
    "PROCESSOR_",
    "RULES_FILE",
    "LOG_",
    "INGEST_",
    "RESTART_",
    "SHUTDOWN_",
    "SECRETS_",
    "EVENT_RETENTION",
    "NOTIFY_SOCKET",
    "WATCHDOG_",
    "CREDENTIALS_DIRECTORY",
    "API_QUERY_TIMEOUT",
    "API_TOTAL_LIMIT",
    "REJECT_RETENTION",
    "MESSAGE_RETENTION",
    "DISK_MIN_FREE",
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A developer's environment or .env never leaks into a test: our variables are removed and
    the working directory is a fresh temp dir (so no ./.env is found)."""
    for key in list(os.environ):
        if key.startswith(_OUR_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
