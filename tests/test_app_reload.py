"""Reloading the configuration of a running gateway (``GET /api/v1/rereadenv``), in process.

Real broker, real store (both dialects), real HTTP: the whole gateway (:func:`gateway.app.build`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway import metrics
from gateway.app import build
from gateway.settings import DatabaseSettings, load_settings
from gateway.store import open_store
from gateway.store.base import NewMessage, NewReject
from tests.support.http import key_entry
from tests.support.mqtt import MosquittoServer, eventually, packet, publish


def _write_env(path: Path, values: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")


async def test_reload_applies_ingest_settings_to_the_held_batch_and_strands_nothing(
    store_settings: DatabaseSettings, mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    admin = f"admin-{tmp_path.name}"
    env = {
        "DATABASE_URL": store_settings.url.get_secret_value(),
        "MQTT_URL": mosquitto.url,
        "MQTT_CLIENT_ID": f"reload-{tmp_path.name}"[:60],
        "MQTT_SESSION_EXPIRY": "60",
        "HTTP_PORT": "0",
        "API_KEYS": key_entry("ops", "admin", admin),
        "LOG_FILE": "",
        # Nothing is written until 1000 messages or 10 s: the first burst stays held in memory.
        "INGEST_BATCH_SIZE": "1000",
        "INGEST_FLUSH_MS": "10000",
    }
    env_file = tmp_path / "gateway.env"
    _write_env(env_file, env)
    settings = load_settings(env_file)
    sizes: list[int] = []

    async with open_store(settings.database) as store:
        real_write = store.write_batch

        async def recording_write(messages: list[NewMessage], rejects: list[NewReject]) -> Any:
            out = await real_write(messages, rejects)
            sizes.append(len(messages) + len(rejects))
            return out

        store.write_batch = recording_write  # type: ignore[method-assign]  # records, then the real write
        gw = build(settings, store, env_file=str(env_file))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.run)
            api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": admin}, timeout=10)
            async with api:
                await trio.to_thread.run_sync(
                    lambda: publish("127.0.0.1", mosquitto.port, [packet("dev", i) for i in range(50)])
                )
                await eventually(lambda: gw.ingest is not None and gw.ingest.held == 50)
                ingest = gw.ingest
                assert ingest is not None and ingest.committed == 0 and sizes == []

                _write_env(env_file, {**env, "INGEST_BATCH_SIZE": "10", "INGEST_FLUSH_MS": "5"})
                r = await api.get("/api/v1/rereadenv")
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["changed"] == ["INGEST_BATCH_SIZE", "INGEST_FLUSH_MS"]
                assert body["restarted"] == [] and body["requires_restart"] == []
                # The held 50 are committed in batches of the new size, long before the old 10 s.
                await eventually(lambda: ingest.committed == 50, 5)
                assert sizes == [10] * 5 and gw.ingest is ingest

                # New messages follow the new settings: a partial batch waits 5 ms, not 10 s.
                await trio.to_thread.run_sync(
                    lambda: publish("127.0.0.1", mosquitto.port, [packet("dev", i) for i in range(50, 75)])
                )
                await eventually(lambda: ingest.committed == 75, 5)
                assert sum(sizes) == 75 and max(sizes) <= 10
                # Every message was acked after its commit: none is left for a redelivery.
                await eventually(lambda: metrics.MQTT_INFLIGHT._value.get() == 0, 5)
                assert ingest.held == 0

                # The channel is built with the group: its size is applied at the next restart.
                live = {**env, "INGEST_BATCH_SIZE": "10", "INGEST_FLUSH_MS": "5"}
                _write_env(env_file, {**live, "INGEST_CHANNEL_SIZE": "8"})
                body = (await api.get("/api/v1/rereadenv")).json()
                assert body["changed"] == ["INGEST_CHANNEL_SIZE"] and body["requires_restart"] == ["ingest"]
                assert body["restarted"] == []

                page = (await api.get("/api/v1/messages", params={"limit": 1000})).json()
                assert page["total"] == 75
            gw.request_stop()
