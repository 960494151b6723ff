"""The latest reading per device (gateway.latest): what ingest and the API feed it, and its bound."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.latest import LatestReadings
from gateway.store.base import InsertOutcome, NewMessage


def _message(device: str, seq: int) -> NewMessage:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    return NewMessage(device, now, seq, f"seq:{seq}", {"t": float(seq)}, "ok", None, "mqtt", now)


def test_a_batch_keeps_each_devices_last_new_reading() -> None:
    latest = LatestReadings()
    batch = [_message("d1", 1), _message("d0", 2), _message("d1", 3), _message("d0", 4)]
    # d0's last reading is a redelivery: its last new one is seq 2.
    outcomes = [InsertOutcome(10, False), InsertOutcome(11, False), InsertOutcome(12, False), InsertOutcome(5, True)]
    latest.stored(batch, outcomes)
    assert latest.devices == 2
    got = latest.latest()
    assert list(got) == ["d0", "d1"]  # sorted by device id
    assert (got["d0"]["id"], got["d0"]["seq"]) == (11, 2)
    assert (got["d1"]["id"], got["d1"]["seq"]) == (12, 3)
    assert got["d1"] == batch[2].to_json(12)
    latest.stored([_message("d2", 1)], [InsertOutcome(7, True)])  # only a duplicate: nothing new
    assert latest.devices == 2


def test_remember_replaces_and_the_view_is_bounded() -> None:
    latest = LatestReadings(max_devices=2)
    latest.remember([{"device_id": "d1", "seq": 1}, {"device_id": "d1", "seq": 2}, {"device_id": "d0"}])
    assert latest.latest() == {"d0": {"device_id": "d0"}, "d1": {"device_id": "d1", "seq": 2}}
    latest.remember([{"device_id": "d1", "seq": 3}, {"no": "device"}])
    latest.remember([{"device_id": "d2"}])  # over the bound: d0, updated longest ago, is forgotten
    assert list(latest.latest()) == ["d1", "d2"] and latest.latest()["d1"]["seq"] == 3
