"""API keys, roles, rate limits and live reload (``rereadenv``) over a real socket."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from gateway.errors import ConfigError
from tests.support.http import ApiServer, key_entry
from tests.test_http_api import assert_problem, packet

# (method, path, role needed)
PROTECTED = [
    ("POST", "/api/v1/packets", "write"),
    ("GET", "/api/v1/rereadenv", "admin"),
    ("POST", "/api/v1/rereadenv", "admin"),
    ("GET", "/api/v1/messages", "read"),
    ("GET", "/api/v1/rejects", "read"),
    ("GET", "/api/v1/latest", "read"),
    ("GET", "/api/v1/events", "read"),
    ("GET", "/metrics", "read"),
]
RANK = {"read": 1, "write": 2, "admin": 3}
Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]


@pytest.mark.parametrize(("method", "path", "role"), PROTECTED)
async def test_auth_missing_invalid_and_wrong_role(api: ApiServer, method: str, path: str, role: str) -> None:
    async with api.client() as c:
        r = await c.request(method, path, json=packet())
        assert_problem(r, 401, "auth_missing")
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await c.request(method, path, json=packet(), headers={"X-API-Key": "not-a-key"})
        assert_problem(r, 401, "auth_invalid")
        r = await c.request(method, path, json=packet(), headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert_problem(r, 401, "auth_invalid")
        for have in RANK:
            if RANK[have] < RANK[role]:
                r = await c.request(method, path, json=packet(), headers={"X-API-Key": api.keys[have]})
                assert_problem(r, 403, "forbidden")


async def test_bearer_header_and_higher_roles_are_accepted(api: ApiServer) -> None:
    async with api.client() as c:
        for role in ("read", "write", "admin"):
            r = await c.get("/api/v1/messages", headers={"Authorization": f"Bearer {api.keys[role]}"})
            assert r.status_code == 200
        # access_token in the query is for the SSE stream only.
        r = await c.get("/api/v1/messages", params={"access_token": api.keys["read"]})
        assert_problem(r, 401, "auth_missing")


async def test_no_keys_configured_refuses_everything_but_public(api_factory: Factory) -> None:
    async with api_factory(env={"API_KEYS": None}) as server, server.client() as c:
        assert (await c.get("/api/v1/ping")).status_code == 200
        assert (await c.get("/api/v1/schema/packet")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200
        body = assert_problem(await c.get("/api/v1/messages"), 401, "auth_missing")
        assert "no API keys are configured" in body["detail"]
        r = await c.get("/api/v1/messages", headers={"X-API-Key": "anything"})
        assert_problem(r, 401, "auth_invalid")


async def test_rate_limit_429_with_one_retry_after(api_factory: Factory) -> None:
    async with api_factory(env={"RATE_LIMIT": "5/minute"}) as server:
        async with server.client("read") as c:
            codes = [(await c.get("/api/v1/messages")).status_code for _ in range(5)]
            assert codes == [200] * 5
            r = await c.get("/api/v1/messages")
            assert_problem(r, 429, "rate_limited")
            assert r.headers.get_list("retry-after") == ["12"]  # one token per 12 s
        # Per key: another key (and an anonymous client address) have their own buckets.
        async with server.client("write") as c:
            assert (await c.get("/api/v1/messages")).status_code == 200
        async with server.client() as c:
            assert (await c.get("/api/v1/ping")).status_code == 200


async def test_rereadenv_rotates_keys_and_rate_limit_live(api: ApiServer) -> None:
    new_key = "rotated-admin-key"
    old_entries = api.ctx.settings.http.api_keys
    entries = [f"{k.name}:{k.role}:{k.sha256}" for k in old_entries]
    env = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in api.env_file.read_text().splitlines()}
    # Step 1: add the new key alongside the old ones.
    env["API_KEYS"] = ",".join([*entries, key_entry("admin2", "admin", new_key)])
    api.write_env(env)
    async with api.client("admin") as c:
        r = await c.post("/api/v1/rereadenv")
        assert r.status_code == 200, r.text
        assert r.json() == {"changed": ["API_KEYS"], "restarted": []}
        assert new_key not in r.text
    async with api.client(headers={"X-API-Key": new_key}) as c:
        assert (await c.get("/api/v1/messages")).status_code == 200
        # Step 2: remove the old admin key, and tighten the rate limit.
        env["API_KEYS"] = ",".join([e for e in entries if ":admin:" not in e] + [key_entry("admin2", "admin", new_key)])
        env["RATE_LIMIT"] = "2/hour"
        api.write_env(env)
        r = await c.get("/api/v1/rereadenv")
        assert sorted(r.json()["changed"]) == ["API_KEYS", "RATE_LIMIT"]
        assert (await c.get("/api/v1/messages")).status_code == 200
        assert (await c.get("/api/v1/messages")).status_code == 200
        assert_problem(await c.get("/api/v1/messages"), 429, "rate_limited")
    async with api.client("admin") as c:
        assert_problem(await c.get("/api/v1/messages"), 401, "auth_invalid")


async def test_rereadenv_refuses_bad_config_and_keeps_running_one(api: ApiServer) -> None:
    before = api.ctx.settings
    env = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in api.env_file.read_text().splitlines()}
    env["MQTT_URL"] = "ftp://nowhere"
    api.write_env(env)
    async with api.client("admin") as c:
        r = await c.post("/api/v1/rereadenv")
        body = assert_problem(r, 400, "config_invalid")
        assert body["variable"] == "MQTT_URL"
        assert api.ctx.settings is before
        assert (await c.get("/api/v1/messages")).status_code == 200


async def test_rereadenv_reports_restarts_and_never_echoes_secrets(api: ApiServer) -> None:
    async def reload() -> dict[str, Any]:
        return {"changed": ["MQTT_URL", "MQTT_PASSWORD"], "restarted": ["mqtt"]}

    api.ctx.reload = reload
    async with api.client("admin") as c:
        r = await c.get("/api/v1/rereadenv")
    assert r.json() == {"changed": ["MQTT_URL", "MQTT_PASSWORD"], "restarted": ["mqtt"]}

    async def broken() -> dict[str, Any]:
        raise ConfigError("API_KEYS", "each entry must be name:role:sha256hex")

    api.ctx.reload = broken
    async with api.client("admin") as c:
        body = assert_problem(await c.get("/api/v1/rereadenv"), 400, "config_invalid")
    assert body["detail"] == "API_KEYS: each entry must be name:role:sha256hex"
