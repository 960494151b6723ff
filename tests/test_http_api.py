"""REST API v1 over a real socket: every endpoint's success and error answers."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import trio

from gateway.errors import StoreUnavailable
from tests.support.http import ApiServer

PROBLEM = "application/problem+json"


def packet(device: str = "dev-1", seq: int | None = 1, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device,
        "timestamp": "2026-11-27T09:00:00Z",
        "measurements": {"temperature": 21.5},
        "status": "ok",
        "battery": 87,
    }
    if seq is not None:
        body["seq"] = seq
    body.update(over)
    return body


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    assert body["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text
    return body


# ---- POST /packets ----------------------------------------------------------------------------


async def test_post_unstorable_text_or_value_is_400_never_500(api: ApiServer) -> None:
    # NUL and lone surrogates in keys reach the field errors; a value the database refuses
    # (here a trigger stands for any such value) makes an `unstorable` reject, not a 500.
    import sqlite3

    raw = b'{"\\u0000": 1, "device_id": "x"}'
    path = api.ctx.settings.database.sqlite_path
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.seq = 13"
            " BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
        )
    async with api.client("write") as c:
        r = await c.post("/api/v1/packets", content=raw, headers={"Content-Type": "application/json"})
        body = assert_problem(r, 400, "packet_invalid")
        r.content.decode("utf-8")  # strict UTF-8
        assert ["\\x00"] in [e["loc"] for e in body["errors"]], body
        surrogate = b'{"\\ud800": {"\\udfff": 1}, "device_id": "x"}'
        r = await c.post("/api/v1/packets", content=surrogate, headers={"Content-Type": "application/json"})
        assert_problem(r, 400, "packet_invalid")
        r.content.decode("utf-8")
        refused = await c.post("/api/v1/packets", json=packet(seq=13))
        assert assert_problem(refused, 400, "packet_invalid")["reason"] == "unstorable"
        assert (await c.post("/api/v1/packets", json=packet(seq=14))).status_code == 201
    page = await api.store.query_rejects(10)
    assert [r.reason for r in page.items] == ["unstorable", "schema", "schema"]
    assert json.loads(page.items[0].payload) == packet(seq=13)


async def test_post_packet_stores_wakes_processor_and_dedupes(api: ApiServer) -> None:
    async with api.client("write") as c:
        r = await c.post("/api/v1/packets", json=packet(seq=7))
        assert r.status_code == 201, r.text
        new_id = r.json()["id"]
        assert r.json() == {"id": new_id, "duplicate": False}
        again = await c.post("/api/v1/packets", json=packet(seq=7))
        assert again.status_code == 200
        assert again.json() == {"id": new_id, "duplicate": True}
    stored = await api.store.get_message(new_id)
    assert stored is not None and stored.source == "api" and stored.seq == 7
    assert stored.measurements == {"temperature": 21.5}
    # The processor was woken once (not for the duplicate); it, not the API, publishes (one path).
    assert api.publisher.published == []
    assert len(api.commits) == 1


async def test_post_invalid_packet_is_400_and_stored_as_reject(api: ApiServer) -> None:
    async with api.client("write") as c:
        r = await c.post("/api/v1/packets", json=packet(status="melting", battery=300))
        body = assert_problem(r, 400, "packet_invalid")
        locs = {tuple(e["loc"]) for e in body["errors"]}
        assert ("status",) in locs and ("battery",) in locs
        bad_json = await c.post("/api/v1/packets", content=b"{not json", headers={"Content-Type": "application/json"})
        assert assert_problem(bad_json, 400, "packet_invalid")["reason"] == "bad_json"
    page = await api.store.query_rejects(10)
    assert page.total == 2
    assert {r.reason for r in page.items} == {"schema", "bad_json"}
    assert all(r.source == "api" for r in page.items)
    assert api.publisher.published == []


async def test_post_packet_size_and_media_type(api: ApiServer) -> None:
    async with api.client("write") as c:
        big = packet(extra="x" * 70_000)
        assert_problem(await c.post("/api/v1/packets", json=big), 413, "payload_too_large")
        r = await c.post("/api/v1/packets", content=json.dumps(packet()), headers={"Content-Type": "text/plain"})
        assert_problem(r, 415, "unsupported_media_type")
        r = await c.post("/api/v1/packets", content=json.dumps(packet()))
        assert_problem(r, 415, "unsupported_media_type")
        # The connection is still usable afterwards (the body was drained before answering).
        r = await c.post("/api/v1/packets", json=packet(seq=99))
        assert r.status_code == 201


async def test_post_packet_db_down_is_503(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("database is down")

    monkeypatch.setattr(api.store, "write_batch", down)
    async with api.client("write") as c:
        r = await c.post("/api/v1/packets", json=packet())
    body = assert_problem(r, 503, "db_unavailable")
    assert "database is down" not in body["detail"]
    assert r.headers["retry-after"]


# ---- GET /ping ----------------------------------------------------------------------------------


async def test_ping_without_and_with_key(api: ApiServer) -> None:
    api.ctx.health.component("database").set("ok")
    async with api.client() as c:
        r = await c.get("/api/v1/ping")
        assert r.status_code == 200
        assert set(r.json()) == {"status", "time"} and r.json()["status"] == "ok"
        # A wrong key on a public endpoint is simply anonymous.
        r = await c.get("/api/v1/ping", headers={"X-API-Key": "nope"})
        assert set(r.json()) == {"status", "time"}
    async with api.client("read") as c:
        await c.post("/api/v1/packets", json=packet())  # read role: refused, but harmless
        body = (await c.get("/api/v1/ping")).json()
    assert body["components"]["database"]["state"] == "ok"
    assert body["backlog"] == {"count": 0, "lag_seconds": 0.0, "dead": 0}
    assert body["version"] == "test" and body["uptime_seconds"] >= 0 and body["sse_clients"] == 0
    api.ctx.health.component("mqtt").set("degraded", "broker down")
    async with api.client() as c:
        assert (await c.get("/api/v1/ping")).json()["status"] == "degraded"


async def test_ping_with_a_wrong_key_says_so_on_both_routes_and_stays_200(api: ApiServer) -> None:
    api.ctx.health.component("database").set("ok")
    refused = 'Bearer realm="gateway", error="invalid_token"'
    async with api.client(headers={"X-API-Key": "nope", "Origin": "https://elsewhere.example"}) as c:
        raw = await c.get("/api/v1/ping")  # gateway.http.fast
        head = await c.head("/api/v1/ping")  # Quart
        bearer = await c.get("/api/v1/ping", headers={"X-API-Key": "", "Authorization": "Bearer nope"})
    for r in (raw, head, bearer):
        assert r.status_code == 200 and r.headers["www-authenticate"] == refused
    assert set(raw.json()) == {"status", "time"}  # the public answer
    async with api.client() as c:
        assert "www-authenticate" not in (await c.get("/api/v1/ping")).headers  # no key: nothing refused
    async with api.client("read") as c:
        assert "www-authenticate" not in (await c.get("/api/v1/ping")).headers
        assert "www-authenticate" not in (await c.head("/api/v1/ping")).headers


async def test_ping_reports_degraded_when_database_fails(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> Any:
        raise StoreUnavailable("gone")

    monkeypatch.setattr(api.store, "backlog", down)
    async with api.client("read") as c:
        r = await c.get("/api/v1/ping")
    assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["backlog"] is None


# ---- GET /messages ------------------------------------------------------------------------------


async def _post_many(api: ApiServer, n: int, device: str = "dev-1", **over: Any) -> list[int]:
    ids = []
    async with api.client("write") as c:
        for i in range(n):
            r = await c.post("/api/v1/packets", json=packet(device, seq=i, **over))
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    return ids


async def test_messages_paging_filters_and_cursor(api: ApiServer) -> None:
    a_ids = await _post_many(api, 5, "dev-a", measurements={"temperature": 20})
    b_ids = await _post_many(api, 3, "dev-b", measurements={"temperature": 30})
    async with api.client("read") as c:
        r = await c.get("/api/v1/messages", params={"limit": 3})
        assert r.status_code == 200
        page = r.json()
        assert page["total"] == 8 and len(page["items"]) == 3 and page["next_cursor"]
        assert [m["id"] for m in page["items"]] == sorted(a_ids + b_ids, reverse=True)[:3]
        seen = [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        while cursor:
            nxt = (await c.get("/api/v1/messages", params={"limit": 3, "cursor": cursor})).json()
            seen += [m["id"] for m in nxt["items"]]
            cursor = nxt["next_cursor"]
        assert seen == sorted(a_ids + b_ids, reverse=True)
        r = await c.get("/api/v1/messages", params={"device_id": "dev-b"})
        assert {m["device_id"] for m in r.json()["items"]} == {"dev-b"} and r.json()["total"] == 3
        r = await c.get("/api/v1/messages", params={"key": "temperature", "value": "30.0"})
        assert sorted(m["id"] for m in r.json()["items"]) == b_ids
        r = await c.get("/api/v1/messages", params={"key": "status", "value": "ok"})
        assert r.json()["total"] == 8
        # Times filter on the device timestamp (09:00Z in every packet here).
        t = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
        window = {"start_time": (t - timedelta(hours=1)).isoformat(), "end_time": "2026-11-27T10:00:00+00:30"}
        assert (await c.get("/api/v1/messages", params=window)).json()["total"] == 8
        r = await c.get("/api/v1/messages", params={"start_time": "2026-11-27T09:00:01Z"})
        assert r.json()["total"] == 0


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"start_time": "2026-11-27T09:00:00"}, "start_time"),
        ({"end_time": "yesterday"}, "end_time"),
        ({"start_time": "2026-11-28T00:00:00Z", "end_time": "2026-11-27T00:00:00Z"}, "end_time"),
        ({"value": "3"}, "value"),
        ({"key": "bad key!", "value": "3"}, "key"),
        ({"device_id": "x" * 65}, "device_id"),
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor"),
        ({"cursor": "%%%"}, "cursor"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_messages_query_invalid_names_the_parameter(
    api: ApiServer, params: dict[str, str], parameter: str
) -> None:
    async with api.client("read") as c:
        r = await c.get("/api/v1/messages", params=params)
    body = assert_problem(r, 400, "query_invalid")
    assert body["parameter"] == parameter


async def test_messages_cache_etag_and_invalidation(api: ApiServer) -> None:
    await _post_many(api, 2)
    async with api.client("read") as c:
        first = await c.get("/api/v1/messages")
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "private, no-cache"
        hits = api.ctx.pages.hits
        second = await c.get("/api/v1/messages")
        assert second.content == first.content and api.ctx.pages.hits == hits + 1
        r304 = await c.get("/api/v1/messages", headers={"If-None-Match": etag})
        assert r304.status_code == 304 and r304.content == b"" and r304.headers["etag"] == etag
        async with api.client("write") as w:
            assert (await w.post("/api/v1/packets", json=packet(seq=50))).status_code == 201
        fresh = await c.get("/api/v1/messages", headers={"If-None-Match": etag})
        assert fresh.status_code == 200 and fresh.json()["total"] == 3 and fresh.headers["etag"] != etag


async def test_latest_reading_per_device(api: ApiServer) -> None:
    await _post_many(api, 3, "dev-x")
    async with api.client("read") as c:
        devices = (await c.get("/api/v1/latest")).json()["devices"]
        assert devices["dev-x"]["seq"] == 2
        assert (await c.get("/api/v1/ping")).json()["devices"] == 1


# ---- rejects, schema, metrics, openapi, docs, dashboard -----------------------------------------


async def test_rejects_paging(api: ApiServer) -> None:
    async with api.client("write") as c:
        for i in range(3):
            await c.post("/api/v1/packets", content=f'{{"bad": {i}}}', headers={"Content-Type": "application/json"})
    async with api.client("read") as c:
        r = await c.get("/api/v1/rejects", params={"limit": 2})
        assert r.status_code == 200
        page = r.json()
        assert page["total"] == 3 and len(page["items"]) == 2 and page["next_cursor"]
        assert page["items"][0]["payload"] == '{"bad": 2}' and page["items"][0]["reason"] == "schema"
        rest = (await c.get("/api/v1/rejects", params={"cursor": page["next_cursor"]})).json()
        assert [x["payload"] for x in rest["items"]] == ['{"bad": 0}']
        assert_problem(await c.get("/api/v1/rejects", params={"limit": "-1"}), 400, "query_invalid")
        assert_problem(await c.get("/api/v1/rejects", params={"cursor": "zzzz"}), 400, "query_invalid")


async def test_schema_openapi_docs_dashboard_are_public(api: ApiServer) -> None:
    async with api.client() as c:
        r = await c.get("/api/v1/schema/packet")
        assert r.status_code == 200 and r.json()["title"] == "Sensor packet"
        spec = (await c.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.1")
        post = spec["paths"]["/api/v1/packets"]["post"]
        assert {"201", "200", "400", "401", "403", "413", "415", "429", "503"} <= post["responses"].keys()
        assert "application/problem+json" in post["responses"]["400"]["content"]
        assert spec["paths"]["/api/v1/ping"]["get"]["security"] == []
        docs = await c.get("/docs")
        assert docs.status_code == 200 and "docs/docs.js" in docs.text  # more in test_http_docs.py
        page = await c.get("/")
        assert page.status_code == 200 and "EventSource" not in page.text and "dashboard.js" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        js = await c.get("/dashboard.js")
        assert "EventSource" in js.text and "access_token" in js.text
        assert "http://" not in page.text + js.text and "https://" not in page.text + js.text  # no CDN


async def test_metrics_needs_read_role(api: ApiServer) -> None:
    async with api.client() as c:
        assert_problem(await c.get("/metrics"), 401, "auth_missing")
    async with api.client("read") as c:
        await c.get("/api/v1/messages")
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'gateway_http_requests_total{method="GET",route="/api/v1/messages",status="200"}' in r.text


async def test_not_found_and_method_not_allowed(api: ApiServer) -> None:
    async with api.client("admin") as c:
        assert_problem(await c.get("/api/v1/nothing"), 404, "not_found")
        r = await c.delete("/api/v1/packets")
        assert_problem(r, 405, "method_not_allowed")
        assert r.headers["allow"].count("POST") == 1


async def test_internal_error_is_500_with_request_id_and_no_trace(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(*args: Any) -> Any:
        raise RuntimeError("secret-detail-xyz")

    monkeypatch.setattr(api.store, "query_rejects", boom)
    with caplog.at_level(logging.ERROR, logger="gateway.http"):
        async with api.client("read") as c:
            r = await c.get("/api/v1/rejects")
    body = assert_problem(r, 500, "internal")
    assert "secret-detail-xyz" not in r.text
    assert any(rec.exc_info and body["request_id"] in rec.getMessage() for rec in caplog.records)


async def test_security_headers_and_access_log(api: ApiServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.http"):
        async with api.client("read") as c:
            r = await c.get("/api/v1/rejects", params={"limit": 5})
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert len(r.headers["x-request-id"]) >= 8
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gateway.http"]
    line = next(x for x in lines if "/api/v1/rejects" in x)
    assert line.startswith("GET /api/v1/rejects?limit=5 200 ") and "key=test-read" in line
    assert r.headers["x-request-id"] in line


async def test_cors_for_configured_origins_only(api_factory: Any) -> None:
    async with api_factory(env={"HTTP_CORS_ORIGINS": "https://ui.example"}) as server:
        async with server.client("read") as c:
            r = await c.get("/api/v1/messages", headers={"Origin": "https://ui.example"})
            assert r.headers["access-control-allow-origin"] == "https://ui.example"
            assert "X-Request-ID" in r.headers["access-control-expose-headers"]
            r = await c.get("/api/v1/messages", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in r.headers
        async with server.client() as c:  # a preflight carries no key
            r = await c.options(
                "/api/v1/messages",
                headers={"Origin": "https://ui.example", "Access-Control-Request-Headers": "x-api-key"},
            )
            assert r.status_code == 200
            assert "X-API-Key" in r.headers["access-control-allow-headers"]


async def test_concurrent_misses_read_the_page_once(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    await _post_many(api, 2)
    reads = 0
    real = api.store.query_messages

    async def slow(query: Any) -> Any:
        nonlocal reads
        reads += 1
        await trio.sleep(0.2)
        return await real(query)

    monkeypatch.setattr(api.store, "query_messages", slow)
    bodies: list[bytes] = []
    async with api.client("read") as c:

        async def get() -> None:
            r = await c.get("/api/v1/messages", params={"limit": 7})
            assert r.status_code == 200
            bodies.append(r.content)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(get)
    assert reads == 1 and len(set(bodies)) == 1 and json.loads(bodies[0])["total"] == 2


async def test_ping_raw_route_answers_like_the_quart_route(api: ApiServer) -> None:
    api.ctx.health.component("database").set("ok")
    async with api.client("admin") as c:
        raw = await c.get("/api/v1/ping")  # answered by gateway.http.fast
        head = await c.head("/api/v1/ping")  # HEAD goes on to Quart
        bad = await c.get("/api/v1/ping", params={"x": "1"})  # so does a query
    assert raw.status_code == head.status_code == 200 and raw.json()["backlog"]["count"] == 0
    same = ("content-type", "cache-control", "x-content-type-options")
    assert {h: raw.headers[h] for h in same} == {h: head.headers[h] for h in same}
    assert raw.headers["x-request-id"] != head.headers["x-request-id"]
    assert_problem(bad, 400, "query_invalid")
    async with api.client("read") as c:
        text = (await c.get("/metrics")).text
    assert 'gateway_http_requests_total{method="GET",route="/api/v1/ping",status="200"}' in text


async def test_messages_raw_route_answers_like_the_quart_route(api: ApiServer) -> None:
    await _post_many(api, 3)
    async with api.client("read") as c:
        raw = await c.get("/api/v1/messages", params={"limit": 2})  # answered by gateway.http.fast
        head = await c.head("/api/v1/messages", params={"limit": 2})  # HEAD goes on to Quart
        r304 = await c.get("/api/v1/messages", params={"limit": 2}, headers={"If-None-Match": raw.headers["etag"]})
    same = ("content-type", "cache-control", "etag", "x-content-type-options")
    assert raw.status_code == head.status_code == 200 and len(raw.json()["items"]) == 2
    assert {h: raw.headers[h] for h in same} == {h: head.headers[h] for h in same}
    assert r304.status_code == 304 and r304.content == b"" and r304.headers["etag"] == raw.headers["etag"]
    async with api.client() as anonymous:
        assert_problem(await anonymous.get("/api/v1/messages"), 401, "auth_missing")  # handed on to Quart
