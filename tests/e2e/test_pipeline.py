"""The whole product, as a process: MQTT in → stored → processed → SSE out and MQTT out; replay
after a reconnect; live reconfiguration through /rereadenv."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as paho

from tests.e2e.harness import GatewayProcess, api_key
from tests.support.mqtt import packet, publish


class Subscriber:
    """A real MQTT subscriber on the shared broker collecting payloads."""

    def __init__(self, topic: str, port: int = 1883) -> None:
        self.messages: list[dict[str, object]] = []
        self._ready = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._ready.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def read_sse(url: str, headers: dict[str, str], want: int, timeout: float = 30.0) -> list[tuple[int, str, dict]]:
    """Read ``want`` events (id, type, data) from a real SSE stream, then disconnect."""
    events: list[tuple[int, str, dict]] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout)) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in resp.iter_lines():
            if line == "":
                if "data" in current:
                    events.append((int(current["id"]), current.get("event", "message"), json.loads(current["data"])))
                    if len(events) >= want:
                        break
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value.removeprefix(" ")
            if time.monotonic() > deadline:
                break
    return events


def test_mqtt_to_sse_and_mqtt_with_replay_and_reload(tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    sub_topic, pub_topic = f"e2e-{run}/+/data", f"e2e-{run}/events"
    key, entry = api_key("ops", "admin")
    gw = GatewayProcess(
        tmp_path,
        {
            "API_KEYS": entry,
            "MQTT_CLIENT_ID": f"e2e-pipe-{run}",
            "MQTT_SUBSCRIBE_TOPIC": sub_topic,
            "MQTT_PUBLISH_TOPIC": pub_topic,
            "PROCESSOR_INTERVAL": "0.5",
        },
    )
    (tmp_path / ".env").write_text("LOG_LEVEL=INFO\n")
    outbound = Subscriber(pub_topic)
    gw.start()
    try:
        headers = {"X-API-Key": key}
        sse_url = gw.url + "/api/v1/events?types=packet"
        # A live SSE client, connected before anything is published.
        collected: list[tuple[int, str, dict]] = []
        reader = threading.Thread(target=lambda: collected.extend(read_sse(sse_url, headers, 60)))
        reader.start()
        time.sleep(0.5)
        payloads = [packet(f"dev-{i % 3}", i) for i in range(100)]
        topics = [f"e2e-{run}/dev-{i % 3}/data" for i in range(100)]  # the topic names the device
        result = publish("127.0.0.1", 1883, payloads, topics=topics)
        assert len(result.acked) == 100
        reader.join(30)
        # The first client saw 60 events then disconnected; ids only grow.
        assert len(collected) == 60
        ids = [e[0] for e in collected]
        assert ids == sorted(ids) and len(set(ids)) == 60
        assert all(t == "packet" for _, t, _ in collected)
        # Reconnecting with Last-Event-ID replays exactly the rest: no gap, no repeat.
        rest = read_sse(sse_url, {**headers, "Last-Event-ID": str(ids[-1])}, 40)
        assert len(rest) == 40 and rest[0][0] > ids[-1]
        seqs = sorted(e[2]["seq"] for e in collected + rest)
        assert seqs == list(range(100))
        # Every processed message was also published to the outbound topic, carrying its event id.
        deadline = time.monotonic() + 15
        while len(outbound.messages) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(outbound.messages) == 100
        assert all(m.get("event_id") for m in outbound.messages)
        # Stored exactly once, processed, queryable.
        page = httpx.get(gw.url + "/api/v1/messages", params={"limit": 1000}, headers=headers, timeout=10).json()
        assert page["total"] == 100
        assert all(item["processed_at"] for item in page["items"])

        # Live reconfiguration: a broker setting restarts only the MQTT component; ingest goes on.
        (tmp_path / ".env").write_text("LOG_LEVEL=DEBUG\nMQTT_KEEPALIVE=20\n")
        r = httpx.post(gw.url + "/api/v1/rereadenv", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body["changed"]) == {"LOG_LEVEL", "MQTT_KEEPALIVE"}
        assert body["restarted"] == ["mqtt"]
        # An invalid configuration is refused and the running one stays.
        (tmp_path / ".env").write_text("MQTT_KEEPALIVE=-5\n")
        r = httpx.post(gw.url + "/api/v1/rereadenv", headers=headers, timeout=10)
        assert r.status_code == 400 and r.json()["code"] == "config_invalid"
        assert "MQTT_KEEPALIVE" in r.json()["detail"]
        more = [packet("dev-late", i) for i in range(10)]
        deadline = time.monotonic() + 15
        total = 0
        while time.monotonic() < deadline:
            publish("127.0.0.1", 1883, more, topic=f"e2e-{run}/dev-late/data")
            time.sleep(0.5)
            total = httpx.get(gw.url + "/api/v1/messages", headers=headers, timeout=10).json()["total"]
            if total == 110:
                break
        assert total == 110
    finally:
        outbound.close()
        assert gw.stop() == 0, gw.log_text()[-2000:]
    log = (tmp_path / "logs" / "server.log").read_text()
    assert "configuration reloaded" in log and "reload refused" in log
    assert key not in log
