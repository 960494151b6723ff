"""The batch pieces of the ingest path: one store function for MQTT and API input, and metrics
counted per batch rather than per message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.ingest import Posted, Stored, observe, observe_many, store_batch
from gateway.mqtt import Inbound
from gateway.store.base import InsertOutcome, NewMessage, NewReject, Store
from tests.support.mqtt import packet

# ---- metrics per batch ------------------------------------------------------------------------


def _samples(h: Histogram) -> dict[str, object]:
    return {
        f"{s.name}{s.labels}": pytest.approx(s.value)
        for metric in h.collect()
        for s in metric.samples
        if "created" not in s.name
    }


@pytest.mark.parametrize("amount", [0.0, 0.0004, 0.003, 0.7, 99.0, 1e9])
def test_observe_many_is_repeated_observe(amount: float) -> None:
    one, many = (Histogram("h", "h", registry=CollectorRegistry(), buckets=(0.001, 0.01, 1, 10)) for _ in range(2))
    for _ in range(7):
        one.observe(amount)
    observe_many(many, amount, 7)
    observe_many(many, amount * 2, 1)
    one.observe(amount * 2)
    assert _samples(one) == _samples(many)


def test_observe_counts_per_receive_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, int]] = []
    monkeypatch.setattr("gateway.ingest.observe_many", lambda h, amount, count: seen.append((amount, count)))
    now = datetime.now(UTC)
    bursts = [now - timedelta(seconds=3), now - timedelta(seconds=2), now - timedelta(seconds=1)]
    batch = [Inbound("t", b"", bursts[i // 4], i, 1, False, 1) for i in range(10)]  # bursts of 4, 4, 2
    observe(batch, Stored([], [], []), "mqtt")
    assert [count for _, count in seen] == [4, 4, 2]
    assert [round(amount) for amount, _ in seen] == [3, 2, 1]


# ---- one store function for both sources ------------------------------------------------------


async def test_store_batch_serves_api_input(store: Store) -> None:
    now = datetime.now(UTC)
    good = Posted(packet("api-1", 1), now)
    stored = await store_batch(store.write_batch, [good, Posted(b"{nope", now), good], "api", 65536)
    assert [(m.device_id, m.source, m.topic) for m in stored.messages] == [("api-1", "api", None)] * 2
    assert [o.duplicate for o in stored.outcomes] == [False, True]
    assert stored.outcomes[0].id == stored.outcomes[1].id
    assert [(r.reason, r.source, r.topic, r.payload) for r in stored.rejects] == [("bad_json", "api", None, b"{nope")]
    got = await store.get_message(stored.outcomes[0].id)
    assert got is not None and got.source == "api"


async def test_a_refused_api_packet_ends_as_an_unstorable_reject(store: Store) -> None:
    # The database refuses the reading (here a value no validated packet has): the same path as
    # MQTT's stores it as an `unstorable` reject instead.
    async def write(messages: list[NewMessage], rejects: list[NewReject]) -> list[InsertOutcome]:
        return await store.write_batch([m._replace(dedupe_key="k\ud800") for m in messages], rejects)

    stored = await store_batch(write, [Posted(packet("v", 1), datetime.now(UTC))], "api", 65536)
    assert [r.reason for r in stored.rejects] == ["unstorable"] and stored.outcomes == []
    [kept] = (await store.query_rejects(limit=10)).items
    assert (kept.reason, kept.source, kept.payload) == ("unstorable", "api", packet("v", 1))
