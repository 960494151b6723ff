"""GET /api/v1/messages/aggregate over a real socket: parameters, roles, and the same figures
whether the rollups or the raw rows answer."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from tests.support.http import ApiServer
from tests.test_http_api import assert_problem
from tests.test_rollups import T0, expected, fleet, process_all

Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]
WINDOW = {"start_time": "2026-11-22T00:00:00Z", "end_time": "2026-11-25T00:00:00Z"}


async def _get(server: ApiServer, **params: str) -> dict[str, Any]:
    async with server.client("read") as c:
        r = await c.get("/api/v1/messages/aggregate", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_rollup_and_raw_answers_agree(api_factory: Factory) -> None:
    messages = fleet()
    async with api_factory(env={"ROLLUP_INTERVALS": "1h,1d"}) as server:
        await server.store.write_batch(messages, [])
        base = {"device_id": "dev-1", "measurement": "temperature", **WINDOW}
        raw = {agg: await _get(server, **base, agg=agg) for agg in ("avg", "min", "max", "count")}
        await process_all(server.store)
        rolled = {agg: await _get(server, **base, agg=agg) for agg in ("avg", "min", "max", "count")}
        want = expected(messages, "dev-1", "temperature", 3600)
        for agg in raw:
            assert raw[agg]["source"] == "raw" and rolled[agg]["source"] == "rollup"
            assert raw[agg]["bucket"] == "1h" and raw[agg]["agg"] == agg
            assert [i["bucket_start"] for i in raw[agg]["items"]] == [i["bucket_start"] for i in rolled[agg]["items"]]
            assert [i["count"] for i in raw[agg]["items"]] == [len(v) for _, v in sorted(want.items())]
            for a, b in zip(raw[agg]["items"], rolled[agg]["items"], strict=True):
                assert math.isclose(a["value"], b["value"], rel_tol=1e-9)
        first = sorted(want)[0]
        assert rolled["min"]["items"][0] == {
            "bucket_start": first.isoformat().replace("+00:00", "Z"),
            "value": min(want[first]),
            "count": len(want[first]),
        }
        day = await _get(server, **base, bucket="1d", agg="count")
        assert day["source"] == "rollup"
        assert sum(i["value"] for i in day["items"]) == sum(len(v) for v in want.values())
        # An unaligned range is widened to whole buckets.
        odd = await _get(
            server,
            device_id="dev-1",
            measurement="temperature",
            start_time="2026-11-23T00:10:00Z",
            end_time="2026-11-23T02:00:01Z",
        )
        assert (odd["start_time"], odd["end_time"]) == ("2026-11-23T00:00:00Z", "2026-11-23T03:00:00Z")
        assert odd["items"][0]["bucket_start"] == T0.isoformat().replace("+00:00", "Z")


async def test_read_role_needed(api: ApiServer) -> None:
    async with api.client(None) as c:
        r = await c.get("/api/v1/messages/aggregate", params={"device_id": "d", "measurement": "t"})
    assert_problem(r, 401, "auth_missing")
    body = await _get(api, device_id="d", measurement="t")
    assert body["items"] == [] and body["source"] == "raw"  # no ROLLUP_INTERVALS: raw rows


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"measurement": "t"}, "device_id"),
        ({"device_id": "d"}, "measurement"),
        ({"device_id": "bad id", "measurement": "t"}, "device_id"),
        ({"device_id": "d", "measurement": "t", "bucket": "1y"}, "bucket"),
        ({"device_id": "d", "measurement": "t", "bucket": "0h"}, "bucket"),
        ({"device_id": "d", "measurement": "t", "agg": "median"}, "agg"),
        ({"device_id": "d", "measurement": "t", "start_time": "yesterday"}, "start_time"),
        ({"device_id": "d", "measurement": "t", **WINDOW, "start_time": "2026-11-26T00:00:00Z"}, "end_time"),
        ({"device_id": "d", "measurement": "t", **WINDOW, "bucket": "1s"}, "bucket"),
        ({"device_id": "d", "measurement": "t", "end_time": "0001-01-01T00:00:00Z"}, "end_time"),
        ({"device_id": "d", "measurement": "t", "limit": "5"}, "limit"),
    ],
)
async def test_query_invalid_names_the_parameter(api: ApiServer, params: dict[str, str], parameter: str) -> None:
    async with api.client("read") as c:
        r = await c.get("/api/v1/messages/aggregate", params=params)
    body = assert_problem(r, 400, "query_invalid")
    assert body["parameter"] == parameter
