"""Reject replay (gateway.replay, ``POST /api/v1/rejects/replay``, ``gateway rejects replay``) on
both stores.

A schema fixed after the fact cannot be produced by changing the code inside a test, so the
scenario is built honestly the other way round: rejects are stored through the store as a past
version of the gateway would have stored them (``schema_version`` 0, reason ``schema`` or
``unstorable``) with payloads that today's schema accepts, next to payloads it still refuses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from gateway import cli
from gateway.errors import StoreRefused
from gateway.ingest import Posted, message_from_packet, to_records
from gateway.packets import SCHEMA_VERSION, parse_packet
from gateway.replay import ReplayRequest, replay
from gateway.store import open_store
from gateway.store._query import decode_cursor
from gateway.store.base import DEFAULT_SCHEMA_VERSION, MessageQuery, NewReject, RejectSelection, Store, StoredReject
from gateway.wake import Nudge
from tests.support.http import ApiServer
from tests.support.pg import db_settings
from tests.test_processor import all_processed, make, running, wait_until

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
WINDOW = {"start_time": T0 - timedelta(hours=1), "end_time": T0 + timedelta(hours=1)}


def packet(seq: int, device: str = "dev-1") -> bytes:
    body = {"device_id": device, "timestamp": "2026-11-27T08:00:00Z", "seq": seq, "measurements": {"t": 20 + seq}}
    return json.dumps({**body, "status": "ok"}).encode()


def old_reject(payload: bytes, n: int, reason: str = "schema", topic: str | None = None) -> NewReject:
    """A reject as a past version stored it (schema version 0)."""
    errors = [{"loc": ["status"], "msg": "a past version refused this", "type": "literal_error"}]
    return NewReject(T0 + timedelta(seconds=n), "mqtt", topic, payload, reason, errors, 0)


SCENARIO = [
    old_reject(packet(1), 1),  # valid today
    old_reject(packet(2), 2, reason="unstorable"),  # valid today
    old_reject(b'{"device_id": "dev-1", "timestamp": ', 3),  # still invalid: cut JSON
    old_reject(packet(1), 4),  # the same packet as the first: a duplicate of it
]


async def store_scenario(store: Store) -> list[StoredReject]:
    await store.write_batch([], SCENARIO)
    rows = await store.select_rejects(RejectSelection(**WINDOW), 100)
    assert [r.schema_version for r in rows] == [0, 0, 0, 0]
    return rows


async def run(store: Store, device_level: int | None = None, **kw: Any) -> dict[str, Any]:
    result = await replay(store, ReplayRequest(**kw), max_payload=65536, device_level=device_level)
    return result.to_json()


def counts(result: dict[str, Any]) -> tuple[int, int, int, int, int]:
    keys = ("examined", "passed", "stored", "duplicates", "still_rejected")
    return tuple(result[k] for k in keys)  # type: ignore[return-value]


def test_every_row_names_the_schema_version() -> None:
    assert DEFAULT_SCHEMA_VERSION == SCHEMA_VERSION  # keep the store's default in step
    now = datetime.now(UTC)
    [m], [r] = to_records([Posted(packet(1), now), Posted(b"{", now)], 65536, "api")
    assert m.schema_version == SCHEMA_VERSION == r.schema_version
    assert message_from_packet(parse_packet(packet(1)), "api", now).to_json(7)["schema_version"] == SCHEMA_VERSION


async def test_replay_stores_passing_rejects_once(store: Store) -> None:
    ids = [r.id for r in await store_scenario(store)]
    first = await run(store, **WINDOW)
    assert counts(first) == (4, 3, 2, 1, 1)
    assert first["next_cursor"] is None and first["dry_run"] is False
    page = await store.query_messages(MessageQuery(limit=10))
    assert page.total == 2
    readings = sorted(page.items, key=lambda m: m.seq)
    assert [(m.seq, m.source, m.schema_version) for m in readings] == [(1, "replay", 1), (2, "replay", 1)]
    assert readings[0].to_json()["schema_version"] == SCHEMA_VERSION
    rows = {r.id: r for r in await store.select_rejects(RejectSelection(**WINDOW), 100)}
    # Passed: kept as the audit trail, pointing at the reading (the duplicate at the same one).
    assert [rows[i].message_id for i in (ids[0], ids[1], ids[3])] == [readings[0].id, readings[1].id, readings[0].id]
    assert all(rows[i].replayed_at is not None and rows[i].schema_version == 1 for i in (ids[0], ids[1], ids[3]))
    # Still refused: the fresh reason and errors of today's schema.
    bad = rows[ids[2]]
    assert (bad.reason, bad.schema_version, bad.replayed_at, bad.message_id) == ("bad_json", 1, None, None)
    assert bad.errors[0]["type"] == "bad_json"
    assert bad.to_json()["schema_version"] == 1 and bad.to_json()["replayed_at"] is None

    # Replayed again: every one is a duplicate, nothing is stored twice.
    again = await run(store, **WINDOW)
    assert counts(again) == (4, 3, 0, 3, 1)
    assert (await store.query_messages(MessageQuery(limit=10))).total == 2
    # The readings are unprocessed: the processor's claim takes them.
    claimed = await store.claim("test", 10, 30.0)
    assert sorted(m.id for m in claimed) == [m.id for m in readings]


async def test_dry_run_changes_nothing(store: Store) -> None:
    before = await store_scenario(store)
    result = await run(store, dry_run=True, **WINDOW)
    assert counts(result) == (4, 3, 0, 0, 1) and result["dry_run"] is True
    assert (await store.query_messages(MessageQuery(limit=10))).total == 0
    assert await store.select_rejects(RejectSelection(**WINDOW), 100) == before


async def test_selection_by_ids_window_reason_and_cursor(store: Store) -> None:
    ids = [r.id for r in await store_scenario(store)]
    assert counts(await run(store, ids=(ids[1], ids[2]), dry_run=True)) == (2, 1, 0, 0, 1)
    assert counts(await run(store, reason="unstorable", dry_run=True, **WINDOW)) == (1, 1, 0, 0, 0)
    narrow = {"start_time": T0 + timedelta(seconds=2), "end_time": T0 + timedelta(seconds=4)}  # 2 and 3
    assert counts(await run(store, dry_run=True, **narrow)) == (2, 1, 0, 0, 1)
    later = {"start_time": T0 + timedelta(hours=2), "end_time": T0 + timedelta(hours=3)}
    assert counts(await run(store, dry_run=True, **later)) == (0, 0, 0, 0, 0)
    # Paged: at most `limit`, the cursor continues after the last one examined.
    page = await run(store, limit=3, **WINDOW)
    assert counts(page) == (3, 2, 2, 0, 1) and page["next_cursor"] is not None
    rest = await run(store, after_id=decode_cursor(page["next_cursor"]), **WINDOW)
    assert counts(rest) == (1, 1, 0, 1, 0) and rest["next_cursor"] is None
    # Exactly `limit` left: no cursor when nothing remains.
    assert (await run(store, limit=4, dry_run=True, **WINDOW))["next_cursor"] is None
    with pytest.raises(ValueError):
        await run(store, limit=10_001, **WINDOW)


async def test_topic_rule_applies_as_on_arrival(store: Store) -> None:
    # MQTT_DEVICE_FROM_TOPIC (the topic's level 1 must be the device): still refused under it.
    await store.write_batch([], [old_reject(packet(5), 1, topic="sensors/other/data")])
    result = await run(store, device_level=1, **WINDOW)
    assert counts(result) == (1, 0, 0, 0, 1)
    [row] = await store.select_rejects(RejectSelection(**WINDOW), 10)
    assert row.reason == "topic_mismatch" and row.schema_version == SCHEMA_VERSION
    assert counts(await run(store, device_level=None, **WINDOW)) == (1, 1, 1, 0, 0)
    [m] = (await store.query_messages(MessageQuery(limit=10))).items
    assert m.device_id == "dev-1" and m.source == "replay"


# ---- the endpoint ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def replay_api(
    request: pytest.FixtureRequest, api_factory: Callable[..., AbstractAsyncContextManager[ApiServer]]
) -> Callable[[], AbstractAsyncContextManager[ApiServer]]:
    """An API server over each store."""
    env = {"DATABASE_URL": request.getfixturevalue("pg_url")} if request.param == "postgres" else None
    return lambda: api_factory(env=env)


@asynccontextmanager
async def with_processor(server: ApiServer) -> AsyncIterator[None]:
    async with running(make(server.store, Nudge(), interval=0.05)):
        yield


def body(**kw: Any) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in kw.items()}


async def test_endpoint_replays_and_the_processor_publishes(
    replay_api: Callable[[], AbstractAsyncContextManager[ApiServer]],
) -> None:
    async with replay_api() as server, with_processor(server), server.client("admin") as client:
        await store_scenario(server.store)
        r = await client.post("/api/v1/rejects/replay", json=body(**WINDOW))
        assert r.status_code == 200, r.text
        got = r.json()
        assert counts(got) == (4, 3, 2, 1, 1) and got["next_cursor"] is None
        assert server.commits  # the processor was nudged
        page = (await client.get("/api/v1/messages")).json()
        assert page["total"] == 2 and {m["source"] for m in page["items"]} == {"replay"}
        assert {m["schema_version"] for m in page["items"]} == {SCHEMA_VERSION}
        ids = [m["id"] for m in page["items"]]
        await wait_until(lambda: all_processed(server.store, ids))
        events = await server.store.read_events(0, 100, frozenset({"packet"}))
        assert sorted(e.message_id for e in events if e.message_id is not None) == sorted(ids)
        rejects = (await client.get("/api/v1/rejects")).json()["items"]
        assert sorted(x["message_id"] or 0 for x in rejects) == sorted([0, *ids, min(ids)])
        assert all("replayed_at" in x and "schema_version" in x for x in rejects)

        again = (await client.post("/api/v1/rejects/replay", json=body(**WINDOW))).json()
        assert counts(again) == (4, 3, 0, 3, 1)
        assert (await client.get("/api/v1/messages")).json()["total"] == 2
        dry = (await client.post("/api/v1/rejects/replay", json=body(ids=[ids[0]], dry_run=True))).json()
        assert dry["dry_run"] is True


async def test_endpoint_needs_admin_and_a_valid_selection(api: ApiServer) -> None:
    for role in ("read", "write"):
        async with api.client(role) as client:
            r = await client.post("/api/v1/rejects/replay", json=body(ids=[1]))
            assert r.status_code == 403 and r.json()["code"] == "forbidden"
    later = T0 + timedelta(hours=1)
    cases: list[tuple[Any, str]] = [
        ({}, "start_time"),
        ({"start_time": T0.isoformat()}, "end_time"),
        (body(start_time=later, end_time=T0), "end_time"),
        (body(ids=[1], **WINDOW), "ids"),
        ({"ids": []}, "ids"),
        ({"ids": [0]}, "ids"),
        ({"ids": ["1"]}, "ids"),
        ({"ids": list(range(1, 10_002))}, "ids"),
        (body(limit=0, **WINDOW), "limit"),
        (body(limit=True, **WINDOW), "limit"),
        (body(reason="no spaces", **WINDOW), "reason"),
        (body(cursor="!!", **WINDOW), "cursor"),
        (body(cursor="abc", **WINDOW), "cursor"),
        (body(dry_run="yes", **WINDOW), "dry_run"),
        (body(start_time="yesterday", end_time=T0), "start_time"),
        (body(start_time="2026-11-27T09:00:00", end_time=T0), "start_time"),
        ({"id": [1]}, "id"),
        ([1, 2], "body"),
    ]
    async with api.client("admin") as client:
        for payload, parameter in cases:
            r = await client.post("/api/v1/rejects/replay", json=payload)
            problem = r.json()
            assert (r.status_code, problem["code"], problem.get("parameter")) == (400, "query_invalid", parameter), (
                payload,
                problem,
            )
        r = await client.post("/api/v1/rejects/replay", content=b"{", headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["parameter"]) == (400, "body")
        r = await client.post("/api/v1/rejects/replay", content=b"ids=1", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415


# ---- the command -------------------------------------------------------------------------------


def test_cli_replays_the_configured_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/gateway.db"
    env = tmp_path / "gateway.env"
    env.write_text(f"DATABASE_URL={url}\nLOG_FILE=\n", encoding="utf-8")

    async def setup() -> list[int]:
        async with open_store(db_settings(url)) as st, trio.open_nursery() as nursery:
            await nursery.start(st.run)
            ids = [r.id for r in await store_scenario(st)]
            nursery.cancel_scope.cancel()
        return ids

    async def total() -> int:
        async with open_store(db_settings(url)) as st, trio.open_nursery() as nursery:
            await nursery.start(st.run)
            n = (await st.query_messages(MessageQuery(limit=10))).total
            nursery.cancel_scope.cancel()
        return n

    ids = trio.run(setup)
    since, until = (WINDOW["start_time"].isoformat(), WINDOW["end_time"].isoformat())
    common = ["rejects", "replay", "--env-file", str(env)]
    assert cli.main([*common, "--since", since, "--until", until, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "examined 4, passed 3: stored 0, duplicates 0; still rejected 1 (dry run" in out
    assert trio.run(total) == 0
    assert cli.main([*common, "--ids", f"{ids[0]},{ids[2]}"]) == 0
    assert "examined 2, passed 1: stored 1, duplicates 0; still rejected 1" in capsys.readouterr().out
    assert cli.main([*common, "--since", since, "--reason", "schema", "--limit", "1"]) == 0
    captured = capsys.readouterr()
    assert "examined 1, passed 1: stored 0, duplicates 1; still rejected 0" in captured.out
    assert "more remain" in captured.err
    assert cli.main([*common, "--since", since]) == 0
    assert "examined 4, passed 3: stored 1, duplicates 2; still rejected 1" in capsys.readouterr().out
    assert trio.run(total) == 2
    assert cli.main([*common, "--since", until, "--until", since]) == 2


class _RefusingStore:
    """A real store whose ``replay_rejects`` refuses (StoreRefused, nothing written) any call that
    would store reject ``poison`` as a reading: how a value the database cannot store shows."""

    def __init__(self, inner: Store, poison: int) -> None:
        self._inner = inner
        self._poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def replay_rejects(self, replayed: list[Any], refused: list[Any]) -> Any:
        if any(r.reject_id == self._poison for r in replayed):
            raise StoreRefused("database refused a value")
        return await self._inner.replay_rejects(replayed, refused)


async def test_a_reading_the_database_refuses_stays_an_unstorable_reject(store: Store) -> None:
    ids = [r.id for r in await store_scenario(store)]
    refusing = cast(Store, _RefusingStore(store, ids[1]))
    result = await run(refusing, **WINDOW)
    # The others of the chunk are stored one by one; the refused one is still a reject.
    assert counts(result) == (4, 2, 1, 1, 2)
    rows = {r.id: r for r in await store.select_rejects(RejectSelection(**WINDOW), 100)}
    assert (rows[ids[1]].reason, rows[ids[1]].replayed_at, rows[ids[1]].schema_version) == ("unstorable", None, 1)
    assert rows[ids[2]].reason == "bad_json"
    assert rows[ids[0]].message_id is not None and rows[ids[3]].message_id == rows[ids[0]].message_id
    assert (await store.query_messages(MessageQuery(limit=10))).total == 1
