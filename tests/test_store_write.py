"""The write side shared by both stores: in-batch dedupe, JSON and time text, and values a store
must refuse as data (so ingest isolates them) rather than crash on or half-store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import StoreRefused
from gateway.store._common import Deduped, json_text, ts_text
from gateway.store.base import InsertOutcome, MessageQuery, NewMessage, Store

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def msg(device: str, n: int, **kw: Any) -> NewMessage:
    values: dict[str, Any] = {
        "device_id": device,
        "device_ts": T0 + timedelta(seconds=n),
        "seq": n,
        "dedupe_key": f"seq:{n}",
        "measurements": {"t": n},
        "status": "ok",
        "battery": None,
        "source": "mqtt",
        "received_at": T0,
        "topic": f"sensors/{device}/data",
    }
    values.update(kw)
    return NewMessage(**values)


# ---- shared helpers ---------------------------------------------------------------------------


def test_deduped_keeps_first_of_each_key_and_reports_the_rest_as_duplicates() -> None:
    batch = [msg("a", 1), msg("b", 1), msg("a", 1), msg("a", 2), msg("b", 1)]
    d = Deduped(batch)
    assert d.unique == [batch[0], batch[1], batch[3]]
    out = d.outcomes([InsertOutcome(10, False), InsertOutcome(11, True), InsertOutcome(12, False)])
    assert out == [(10, False), (11, True), (10, True), (12, False), (11, True)]
    plain = [msg("a", i) for i in range(3)]
    assert Deduped(plain).unique == plain
    assert Deduped(plain).outcomes([InsertOutcome(i, False) for i in range(3)]) == [(0, False), (1, False), (2, False)]
    assert Deduped([]).unique == [] and Deduped([]).outcomes([]) == []


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(_JSONISH)
def test_json_text_is_json_dumps(value: Any) -> None:
    assert json_text(value) == json.dumps(value)


@given(st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), None])))
def test_ts_text_fast_path_is_the_general_one(ts: datetime) -> None:
    aware = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    try:
        general = aware.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    except OverflowError:
        return
    assert ts_text(ts) == general


async def test_refused_values_are_data_errors_on_both_stores(store: Store) -> None:
    # Values no validated packet has, but a store must refuse as data (StoreRefused: ingest then
    # isolates the message) and never crash on or half-store: a lone surrogate, a huge seq, and on
    # PostgreSQL a NUL (SQLite stores that one).
    bad_values: list[dict[str, Any]] = [{"dedupe_key": "k\ud800"}, {"seq": 2**64}]
    if store.kind == "postgres":
        bad_values.append({"device_id": "a\x00b"})
    for bad in bad_values:
        with pytest.raises(StoreRefused):
            await store.write_batch([msg("ok", 1), msg("x", 2, **bad)], [])
    assert (await store.query_messages(MessageQuery(limit=1))).total == 0
    # Nothing was half-stored, and the store is fine afterwards.
    [out] = await store.write_batch([msg("ok", 1)], [])
    assert not out.duplicate
