"""Outbound QoS 1 from the bridge's own encoder: batches, PUBACKs by our decoder, re-sends, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry, Histogram

from gateway import metrics
from gateway.health import ComponentHealth
from gateway.mqtt import Inbound, MqttBridge
from gateway.mqtt_codec import Frame, FrameDecoder, Publish, packet
from gateway.settings import MqttSettings
from tests.support.mqtt import MosquittoServer, eventually


def _settings(url: str, **kw: Any) -> MqttSettings:
    base: dict[str, Any] = {"url": url, "client_id": "out", "reconnect_min": 0.05, "reconnect_max": 0.3,
                            "connect_timeout": 5.0, "keepalive": 5, "subscribe_topic": "nothing/here"}  # fmt: skip
    base.update(kw)
    return MqttSettings(**base)


class _Broker:
    """A scripted broker: CONNACK, SUBACK, then for each PUBLISH what ``answer`` says.

    ``answer(connection number, publish)``: a PUBACK reason code, or None to stay silent. The
    connection is closed after ``close_after`` publishes on it (None: never).
    """

    def __init__(self, v5: bool, answer: Any, close_after: Any = None) -> None:
        self.v5, self.answer, self.close_after = v5, answer, close_after
        self.received: list[list[Publish]] = []

    async def serve(self, listener: trio.SocketListener) -> None:
        while True:
            stream = await listener.accept()
            n = len(self.received)
            got: list[Publish] = []
            self.received.append(got)
            async with stream:
                decoder = FrameDecoder(v5=self.v5)
                while data := await stream.receive_some():
                    decoder.feed(data)
                    out = b""
                    while (frame := decoder.next()) is not None:
                        if isinstance(frame, Frame) and frame.kind == 1:  # CONNECT
                            out += packet(0x20, b"\x00\x00\x00" if self.v5 else b"\x00\x00")
                        elif isinstance(frame, Frame) and frame.kind == 8:  # SUBSCRIBE: granted QoS 1
                            out += packet(0x90, frame.data[2:4] + (b"\x00" if self.v5 else b"") + b"\x01")
                        elif isinstance(frame, Publish):
                            got.append(frame)
                            reason = self.answer(n, frame)
                            if reason is not None:
                                tail = bytes([reason, 0]) if self.v5 else b""
                                out += packet(0x40, frame.mid.to_bytes(2, "big") + tail)
                    if out:
                        await stream.send_all(out)
                    limit = self.close_after(n) if self.close_after else None
                    if limit is not None and len(got) >= limit:
                        break


async def _start(broker: _Broker, nursery: trio.Nursery, **kw: Any) -> MqttBridge:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(broker.serve, listeners[0])
    url = f"mqtt://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    bridge = MqttBridge(_settings(url, protocol="5" if broker.v5 else "3.1.1", **kw), ComponentHealth("mqtt"))
    await nursery.start(bridge.run, trio.open_memory_channel[list[Inbound]](8)[0])
    return bridge


@pytest.mark.parametrize("v5", [True, False])
async def test_unconfirmed_publishes_are_resent_after_reconnect_and_told_once(v5: bool) -> None:
    # First connection: silent, closed after 300 publishes. Second: acks everything.
    broker = _Broker(v5, answer=lambda n, p: 0 if n else None, close_after=lambda n: None if n else 300)
    outcomes: dict[int, list[str | None]] = {}
    async with trio.open_nursery() as nursery:
        bridge = await _start(broker, nursery)
        items = [(f"p{i}".encode(), None, lambda r, i=i: outcomes.setdefault(i, []).append(r)) for i in range(500)]
        await bridge.send_many(items)
        await eventually(lambda: len(outcomes) == 500, 15)
        nursery.cancel_scope.cancel()
    assert all(v == [None] for v in outcomes.values())  # each told once, success
    first, *rest = broker.received
    assert len(first) >= 300 and not any(p.dup for p in first)
    again = [p.payload for conn in rest for p in conn]
    assert set(again) == {f"p{i}".encode() for i in range(500)}  # the unconfirmed ones again, then the rest
    assert all(p.topic == "gateway/events" and p.qos == 1 for conn in broker.received for p in conn)


async def test_refusal_reaches_on_done_and_is_never_counted_as_published() -> None:
    broker = _Broker(True, answer=lambda n, p: 0x87 if p.payload.startswith(b"no") else 0)
    outcomes: dict[bytes, str | None] = {}
    published = metrics.MQTT_PUBLISHED._value.get()
    refused = metrics.MQTT_PUBLISH_REFUSED.labels("0x87")._value.get()
    async with trio.open_nursery() as nursery:
        bridge = await _start(broker, nursery)
        await bridge.send_many([(p, "x", lambda r, p=p: outcomes.__setitem__(p, r)) for p in (b"ok1", b"no", b"ok2")])
        await eventually(lambda: len(outcomes) == 3, 10)
        nursery.cancel_scope.cancel()
    assert outcomes[b"ok1"] is None and outcomes[b"ok2"] is None
    assert outcomes[b"no"] == "broker refused the publish: Not authorized (0x87)"
    assert metrics.MQTT_PUBLISHED._value.get() - published == 2
    assert metrics.MQTT_PUBLISH_REFUSED.labels("0x87")._value.get() - refused == 1
    assert [p.topic for p in broker.received[0]] == ["gateway/events/x"] * 3


async def test_window_bounds_unconfirmed_publishes() -> None:
    broker = _Broker(False, answer=lambda n, p: None)  # never acks
    async with trio.open_nursery() as nursery:
        bridge = await _start(broker, nursery, receive_maximum=20)
        for i in range(100):
            bridge.publish_nowait(str(i).encode())
        await eventually(lambda: len(broker.received[0]) >= 20, 10)
        await trio.sleep(0.3)
        assert len(broker.received[0]) == 20
        assert metrics.MQTT_PUBLISH_QUEUE._value.get() == 100  # waiting or unconfirmed
        nursery.cancel_scope.cancel()


async def test_batch_of_publishes_through_mosquitto(mosquitto: MosquittoServer) -> None:
    """An independent subscriber (mosquitto_sub) gets every publish of a batch, in order."""
    n = 3000
    before = sum(b.get() for b in metrics.MQTT_PUBLISH_LATENCY._buckets)
    done: list[str | None] = []
    lines: list[str] = []

    async def subscriber() -> None:
        cmd = ["mosquitto_sub", "-p", str(mosquitto.port), "-t", "gateway/events", "-q", "1", "-C", str(n)]
        lines.extend((await trio.run_process(cmd, capture_stdout=True)).stdout.decode().split())

    async with trio.open_nursery() as nursery:
        bridge = MqttBridge(_settings(mosquitto.url), ComponentHealth("mqtt"))
        await nursery.start(bridge.run, trio.open_memory_channel[list[Inbound]](8)[0])
        nursery.start_soon(subscriber)
        await trio.sleep(0.5)  # subscribed
        await bridge.send_many([(str(i).encode(), None, done.append) for i in range(n)])
        await eventually(lambda: len(done) == n and bool(lines), 20)
        nursery.cancel_scope.cancel()
    assert done == [None] * n
    assert lines == [str(i) for i in range(n)]
    assert sum(b.get() for b in metrics.MQTT_PUBLISH_LATENCY._buckets) - before == n


def test_observe_many_is_observe_per_value() -> None:
    registry = CollectorRegistry()
    one = Histogram("one", "", buckets=(0.001, 0.01, 0.1), registry=registry)
    many = Histogram("many", "", buckets=(0.001, 0.01, 0.1), registry=registry)
    values = [0.0005, 0.001, 0.005, 0.05, 0.5, 0.01, 2.0]
    for v in values:
        one.observe(v)
    metrics.observe_many(many, values)
    samples = {m.name: [(s.name.split("_")[-1], s.labels, s.value) for s in m.samples if "created" not in s.name]
               for m in registry.collect()}  # fmt: skip
    assert samples["one"] == samples["many"]
