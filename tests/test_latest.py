"""The latest reading per device (gateway.latest): what ingest and the API feed it, its bound, and
its start-up load from the store (the whole gateway restarted over each dialect)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.app import build
from gateway.latest import LatestReadings
from gateway.service import Gateway
from gateway.settings import DatabaseSettings, Settings, load_settings
from gateway.store import open_store
from gateway.store.base import InsertOutcome, NewMessage, StoredMessage
from tests.support.http import key_entry
from tests.support.mqtt import MosquittoServer, eventually, publish


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


def _pair(device: str, seq: int) -> tuple[NewMessage, StoredMessage]:
    """A new reading and the row it became (id = seq), processed since."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    new = NewMessage(device, now, seq, f"seq:{seq}", {"t": 1.5}, "ok", 87.0, "mqtt", now)
    return new, StoredMessage(seq, device, now, now, seq, {"t": 1.5}, "ok", 87.0, "mqtt", now, 1)


def test_seed_adds_unknown_devices_oldest_first_and_keeps_live_ones() -> None:
    latest = LatestReadings(max_devices=3)
    latest.remember([{"device_id": "live", "seq": 99}])  # committed since start-up: newer than the store
    pairs = {d: _pair(d, n) for d, n in (("live", 7), ("d3", 3), ("d2", 2), ("d1", 1))}
    assert latest.seed(stored for _, stored in pairs.values()) == 3  # newest first, as the store gives them
    # The bound keeps the newest: d1, seeded first, was dropped; the live reading stays as it was.
    # A seeded reading is what ingest would have kept for it (no processing state).
    assert latest.latest() == {
        "d2": pairs["d2"][0].to_json(2),
        "d3": pairs["d3"][0].to_json(3),
        "live": {"device_id": "live", "seq": 99},
    }
    assert latest.seed([]) == 0 and latest.devices == 3


def _packet(device: str, seq: int, battery: float) -> bytes:
    body = {
        "device_id": device,
        "timestamp": 1_790_000_000 + seq,
        "seq": seq,
        "measurements": {"t": 21},
        "status": "ok",
    }
    return json.dumps(body | {"battery": battery}).encode()


def _batteries(text: str) -> list[str]:
    """The battery values as written in JSON text (87 and 87.0 are different tokens)."""
    return re.findall(r'"battery":\s*([-0-9.eE]+)', text)


async def _run_gateway(
    settings: Settings, env_file: Path, key: str, during: Callable[[Gateway, httpx.AsyncClient], Awaitable[None]]
) -> tuple[str, dict[str, Any]]:
    """Start the whole gateway, run ``during``, then return ``/latest``'s text and ``/ping``; stop it."""
    async with open_store(settings.database) as store:
        gw = build(settings, store, env_file=str(env_file))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.run)
            headers = {"X-API-Key": key}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as api:
                await during(gw, api)
                latest = (await api.get("/api/v1/latest")).text
                ping = (await api.get("/api/v1/ping")).json()
            gw.request_stop()
    return latest, ping


async def test_the_view_survives_a_restart_and_battery_is_one_number_type_everywhere(
    store_settings: DatabaseSettings, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    """The whole gateway (real broker, store of each dialect, HTTP): readings stored before a
    restart show in ``/latest`` and ``/ping``'s ``devices`` after it, as they were; and ``battery``
    (sent as 87 and 87.5) is written the same way by SSE, ``/messages`` and ``/latest``."""
    key = f"read-{tmp_path.name}"
    env = {
        "DATABASE_URL": store_settings.url.get_secret_value(),
        "MQTT_URL": mosquitto.url,
        "MQTT_CLIENT_ID": f"latest-{tmp_path.name}"[:60],
        "HTTP_PORT": "0",
        "API_KEYS": key_entry("reader", "read", key),
        "LOG_FILE": "",
    }
    env_file = tmp_path / "gateway.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    settings = load_settings(env_file)
    sent = [("dev-int", 1, 87), ("dev-float", 1, 87.5), ("dev-int", 2, 87)]
    payloads = [_packet(d, n, b) for d, n, b in sent]
    topics = [f"sensors/{d}/data" for d, _, _ in sent]

    async def traffic(gw: Gateway, api: httpx.AsyncClient) -> None:
        await trio.to_thread.run_sync(lambda: publish("127.0.0.1", mosquitto.port, payloads, topics=topics))
        await eventually(lambda: gw.ctx.latest.devices == 2)
        text = ""  # SSE: the three packet events, replayed from the start
        with trio.fail_after(10):
            async with api.stream("GET", "/api/v1/events", params={"last_event_id": "0"}) as r:
                async for line in r.aiter_lines():
                    text += line + "\n"
                    if text.count("event: packet") == 3 and line == "":
                        break
        assert _batteries(text) == ["87.0", "87.5", "87.0"], text
        messages = (await api.get("/api/v1/messages")).text
        assert _batteries(messages) == ["87.0", "87.5", "87.0"], messages  # newest first

    async def nothing(gw: Gateway, api: httpx.AsyncClient) -> None:
        pass

    before, ping_before = await _run_gateway(settings, env_file, key, traffic)
    after, ping_after = await _run_gateway(settings, env_file, key, nothing)  # a restart, no traffic since
    assert json.loads(after) == json.loads(before)
    assert list(json.loads(after)["devices"]) == ["dev-float", "dev-int"]
    assert json.loads(after)["devices"]["dev-int"]["seq"] == 2
    assert _batteries(before) == _batteries(after) == ["87.5", "87.0"]
    assert ping_before["devices"] == ping_after["devices"] == 2
