"""Paging cursors from outside: any text a client sends as ``cursor`` is a page or a 400
``query_invalid``, never a 500, on both stores, over a real socket."""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.store._query import MAX_ID, decode_cursor, encode_cursor
from tests.support.http import ApiServer

Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from([str(MAX_ID), str(MAX_ID + 1), "9999999999999999999", "0", "-0", "+1", "1e9", " 1"]),
    st.text(alphabet="0123456789", min_size=18, max_size=24),
    st.text(max_size=24),
)
CURSORS = st.one_of(
    st.builds(lambda p, n: _b64(f"{p}:{n}"), st.sampled_from(["id", "ID", "", "id "]), _numbers),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=140),
    st.text(max_size=40),  # anything at all, percent-encoded by the client
)


def _expected_ok(cursor: str) -> bool:
    try:
        decode_cursor(cursor)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_generated_cursors_never_give_a_500(
    api_factory: Factory, request: pytest.FixtureRequest, backend: str
) -> None:
    env = {"DATABASE_URL": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    async with api_factory(env=env) as server:
        async with server.client("write") as w:
            for seq in range(3):
                body = {
                    "device_id": "d",
                    "timestamp": 1_800_000_000 + seq,
                    "seq": seq,
                    "measurements": {"t": 1},
                    "status": "ok",
                }
                assert (await w.post("/api/v1/packets", json=body)).status_code == 201
        headers = {"X-API-Key": server.keys["read"]}

        # Hypothesis drives a blocking client from a worker thread while Trio serves the API.
        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(cursor=CURSORS, path=st.sampled_from(["/api/v1/messages", "/api/v1/rejects"]))
        def probe(cursor: str, path: str) -> None:
            with httpx.Client(base_url=server.url, headers=headers, timeout=10) as c:
                r = c.get(path, params={"cursor": cursor})
            assert r.status_code in (200, 400), (cursor, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["code"] == "query_invalid"
                assert r.json()["parameter"] == "cursor"
            assert (r.status_code == 200) == _expected_ok(cursor), cursor

        await trio.to_thread.run_sync(probe)

        # The edges by name: the largest id is a page, one past it is a 400.
        async with server.client("read") as c:
            for path in ("/api/v1/messages", "/api/v1/rejects"):
                assert (await c.get(path, params={"cursor": encode_cursor(MAX_ID)})).status_code == 200
                for bad in (_b64(f"id:{MAX_ID + 1}"), _b64("id:9999999999999999999")):
                    r = await c.get(path, params={"cursor": bad})
                    assert r.status_code == 400 and r.json()["code"] == "query_invalid", r.text


def test_decode_cursor_round_trip_and_range() -> None:
    for n in (0, 1, 12345, MAX_ID):
        assert decode_cursor(encode_cursor(n)) == n
    for bad in (_b64(f"id:{MAX_ID + 1}"), _b64("id:-1"), _b64("id:"), _b64("x:1"), "", "a" * 129, "id:1"):
        with pytest.raises(ValueError):
            decode_cursor(bad)
