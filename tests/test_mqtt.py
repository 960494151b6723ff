"""MqttBridge against real mosquitto brokers: delivery, acks, sessions, publishing, TLS, sharing."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway import metrics
from gateway.errors import ConfigError, MqttUnavailable
from gateway.health import ComponentHealth
from gateway.ingest import to_records
from gateway.mqtt import TAKEOVER_REPEATS, Inbound, MqttBridge
from gateway.settings import MqttSettings, load_settings
from gateway.store.base import MessageQuery, Store
from tests.support.mqtt import MosquittoServer, TlsFiles, eventually, free_port, packet, pipeline, publish


def settings_for(server: MosquittoServer | None, **kw: Any) -> MqttSettings:
    base: dict[str, Any] = {
        "url": server.url if server else f"mqtt://127.0.0.1:{free_port()}",
        "client_id": "test-gateway",
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "connect_timeout": 5.0,
        "keepalive": 5,
    }
    base.update(kw)
    return MqttSettings(**base)


@asynccontextmanager
async def running(
    settings: MqttSettings, health: ComponentHealth | None = None
) -> AsyncIterator[tuple[MqttBridge, trio.MemoryReceiveChannel[list[Inbound]]]]:
    """Start a bridge in a nursery (waiting for started), cancel it on exit."""
    bridge = MqttBridge(settings, health or ComponentHealth("mqtt"))
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        yield bridge, recv
        nursery.cancel_scope.cancel()


async def collect(recv: trio.MemoryReceiveChannel[list[Inbound]], n: int, wait: float = 10) -> list[Inbound]:
    out: list[Inbound] = []
    with trio.move_on_after(wait):
        while len(out) < n:
            out.extend(await recv.receive())
    return out


async def quiet(recv: trio.MemoryReceiveChannel[list[Inbound]], seconds: float = 0.5) -> list[Inbound]:
    """Whatever arrives within ``seconds`` (expected: nothing)."""
    return await collect(recv, 10**9, seconds)


async def pub(server: MosquittoServer, payloads: list[bytes], **kw: Any) -> int:
    result = await trio.to_thread.run_sync(lambda: publish(server.host, server.port, payloads, **kw))
    return result.count


async def test_receives_acks_and_is_not_redelivered(mosquitto: MosquittoServer) -> None:
    health = ComponentHealth("mqtt")
    settings = settings_for(mosquitto)
    received = metrics.MQTT_RECEIVED._value.get()
    async with running(settings, health) as (bridge, recv):
        assert bridge.connected and health.state == "ok" and health.detail["connected"] is True
        assert metrics.MQTT_CONNECTED._value.get() == 1
        assert await pub(mosquitto, [packet("d1", i) for i in range(300)], topic="sensors/d1/data") == 300
        got = await collect(recv, 300)
        assert [m.payload for m in got] == [packet("d1", i) for i in range(300)]  # arrival order kept
        assert {m.qos for m in got} == {1} and got[0].topic == "sensors/d1/data"
        assert got[0].received_at.tzinfo is not None
        assert metrics.MQTT_RECEIVED._value.get() - received == 300
        assert metrics.MQTT_INFLIGHT._value.get() == 300
        bridge.ack(got)
        assert metrics.MQTT_INFLIGHT._value.get() == 0
        await trio.sleep(0.3)  # let the PUBACKs go out
    assert not bridge.connected and metrics.MQTT_CONNECTED._value.get() == 0
    async with running(settings) as (_, recv):
        assert await quiet(recv) == []


async def test_unacked_messages_are_redelivered_and_old_acks_ignored(mosquitto: MosquittoServer) -> None:
    settings = settings_for(mosquitto)
    async with running(settings) as (bridge, recv):
        await pub(mosquitto, [packet("d2", i) for i in range(50)], topic="sensors/d2/data")
        first = await collect(recv, 50)
        bridge.ack(first[:20])
        await trio.sleep(0.3)
    async with running(settings) as (bridge2, recv):
        again = await collect(recv, 30)
        assert [m.payload for m in again] == [packet("d2", i) for i in range(20, 50)]
        assert all(m.dup for m in again)
        assert again[0].generation == 1  # a new bridge counts from 1 again
        bridge2.ack(again)
        await trio.sleep(0.3)
    async with running(settings) as (_, recv):
        assert await quiet(recv) == []


async def test_session_kept_while_stopped_mqtt5_and_311(mosquitto: MosquittoServer) -> None:
    for protocol in ("5", "3.1.1"):
        settings = settings_for(mosquitto, protocol=protocol, client_id=f"sess-{protocol}")
        async with running(settings):
            pass  # creates the session and the subscription
        await pub(mosquitto, [packet("d3", i) for i in range(100)], topic="sensors/d3/data")
        async with running(settings) as (bridge, recv):
            got = await collect(recv, 100)
            assert sorted(m.payload for m in got) == sorted(packet("d3", i) for i in range(100)), protocol
            bridge.ack(got)
            await trio.sleep(0.2)


async def test_lost_session_logs_a_warning(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = MosquittoServer(tmp_path / "b")
    server.start()
    try:
        settings = settings_for(server)
        async with running(settings):
            pass
        caplog.clear()
        async with running(settings):
            pass
        assert not [r for r in caplog.records if "no session on the broker" in r.getMessage()]
        server.stop()
        for f in server.directory.glob("mosquitto.db"):
            f.unlink()  # the broker forgets every session
        server.start()
        caplog.clear()
        with caplog.at_level(logging.INFO, "gateway.mqtt"):
            async with running(settings):
                pass
        warnings = [r for r in caplog.records if "no session on the broker" in r.getMessage()]
        assert warnings and warnings[0].levelno == logging.WARNING
    finally:
        server.kill()


async def test_starts_degraded_without_broker_then_connects(tmp_path: Any) -> None:
    server = MosquittoServer(tmp_path / "late")
    health = ComponentHealth("mqtt")
    async with running(settings_for(server), health) as (bridge, recv):
        assert not bridge.connected and health.state == "degraded"
        assert health.last_error and "broker" in health.last_error
        server.start()
        try:
            await eventually(lambda: bridge.connected, 10)
            assert health.state == "ok" and bridge.reconnects == 0  # the first real connection
            await pub(server, [packet("d4", 1)], topic="sensors/d4/data")
            assert len(await collect(recv, 1)) == 1
        finally:
            server.kill()


async def test_reconnects_after_broker_restart(mosquitto: MosquittoServer) -> None:
    health = ComponentHealth("mqtt")
    async with running(settings_for(mosquitto), health) as (bridge, recv):
        mosquitto.stop()
        await eventually(lambda: not bridge.connected, 10)
        assert health.state == "degraded"
        mosquitto.start()
        await eventually(lambda: bridge.connected, 10)
        assert bridge.reconnects == 1 and health.detail["reconnects"] == 1
        await pub(mosquitto, [packet("d5", i) for i in range(10)], topic="sensors/d5/data")
        got = await collect(recv, 10)
        assert len(got) == 10 and got[0].generation == 2
        bridge.ack(got)


async def test_publish_confirmed_and_resent_after_outage(mosquitto: MosquittoServer) -> None:
    listener = settings_for(mosquitto, client_id="listener", subscribe_topic="gateway/events/#")
    sender = settings_for(mosquitto, client_id="sender", subscribe_topic="nothing/here")
    async with running(listener) as (lbridge, lrecv), running(sender) as (bridge, _):
        await bridge.publish(b'{"n": 1}')
        bridge.publish_nowait(b'{"n": 2}', "alerts")
        got = await collect(lrecv, 2)
        assert [(m.topic, m.payload) for m in got] == [
            ("gateway/events", b'{"n": 1}'),
            ("gateway/events/alerts", b'{"n": 2}'),
        ]
        lbridge.ack(got)
        mosquitto.stop()
        await eventually(lambda: not bridge.connected, 10)
        for i in range(3, 53):
            bridge.publish_nowait(f'{{"n": {i}}}'.encode())  # queued while the broker is down
        mosquitto.start()
        want = {f'{{"n": {i}}}'.encode() for i in range(3, 53)}
        got = []
        with trio.move_on_after(15):
            # Redeliveries of n=1, 2 may come too (the listener's acks can die with the broker).
            while not want <= {m.payload for m in got}:
                got.extend(await lrecv.receive())
        assert want <= {m.payload for m in got}
        lbridge.ack(got)


async def test_publish_nowait_refuses_when_queue_full(tmp_path: Any) -> None:
    bridge = MqttBridge(settings_for(None, outbound_queue=2), ComponentHealth("mqtt"))
    bridge.publish_nowait(b"1")
    bridge.publish_nowait(b"2")
    with pytest.raises(MqttUnavailable):
        bridge.publish_nowait(b"3")


async def test_share_group_splits_the_stream(mosquitto: MosquittoServer) -> None:
    a = settings_for(mosquitto, client_id="inst-a", share_group="gw")
    b = settings_for(mosquitto, client_id="inst-b", share_group="gw")
    async with running(a) as (ba, ra), running(b) as (bb, rb):
        await pub(mosquitto, [packet("d6", i) for i in range(200)], topic="sensors/d6/data")
        got_a: list[Inbound] = []
        got_b: list[Inbound] = []
        with trio.move_on_after(5):
            while len(got_a) + len(got_b) < 200:
                with trio.move_on_after(0.05):
                    got_a.extend(await ra.receive())
                with trio.move_on_after(0.05):
                    got_b.extend(await rb.receive())
        assert len(got_a) + len(got_b) == 200
        assert got_a and got_b  # both instances got a share
        assert {m.payload for m in got_a}.isdisjoint({m.payload for m in got_b})
        ba.ack(got_a)
        bb.ack(got_b)


async def test_tls_right_ca(mosquitto_tls: MosquittoServer, mqtt_tls_files: TlsFiles) -> None:
    settings = settings_for(mosquitto_tls, ca_file=mqtt_tls_files.ca)
    async with running(settings) as (bridge, recv):
        assert bridge.connected
        await pub(
            mosquitto_tls, [packet("t", i) for i in range(500)], topic="sensors/t/data", ca_file=mqtt_tls_files.ca
        )
        got = await collect(recv, 500)
        assert len(got) == 500  # nothing stuck in the SSL buffer
        bridge.ack(got)


async def test_tls_wrong_ca_refused(mosquitto_tls: MosquittoServer, mqtt_tls_files: TlsFiles) -> None:
    health = ComponentHealth("mqtt")
    settings = settings_for(mosquitto_tls, ca_file=mqtt_tls_files.other_ca)
    async with running(settings, health) as (bridge, _):
        assert not bridge.connected and health.state == "degraded"
        assert health.last_error and "CERTIFICATE_VERIFY_FAILED" in health.last_error


async def test_tls_hostname_is_verified(mosquitto_tls: MosquittoServer, mqtt_tls_files: TlsFiles) -> None:
    health = ComponentHealth("mqtt")
    # The certificate names localhost and 127.0.0.1, not this address.
    settings = settings_for(mosquitto_tls, url=f"mqtts://127.0.0.2:{mosquitto_tls.port}", ca_file=mqtt_tls_files.ca)
    async with running(settings, health) as (bridge, _):
        assert not bridge.connected and health.state == "degraded"


async def test_tls_client_certificate(mosquitto_mtls: MosquittoServer, mqtt_tls_files: TlsFiles) -> None:
    without = settings_for(mosquitto_mtls, ca_file=mqtt_tls_files.ca)
    async with running(without) as (bridge, _):
        assert not bridge.connected
    with_cert = settings_for(
        mosquitto_mtls,
        ca_file=mqtt_tls_files.ca,
        cert_file=mqtt_tls_files.client_cert,
        key_file=mqtt_tls_files.client_key,
    )
    async with running(with_cert) as (bridge, _):
        assert bridge.connected


async def test_password_never_logged(mosquitto: MosquittoServer, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(mosquitto, username="gw", password="s3cret-pw")
    with caplog.at_level(logging.DEBUG):
        async with running(settings) as (bridge, _):
            assert bridge.connected
    assert "s3cret-pw" not in caplog.text


# ------------------------------------------------------------------- device_id from the topic


@pytest.mark.parametrize(
    ("topic", "setting", "level"),
    [
        ("sensors/+/data", None, 1),  # unset: on, exactly one "+"
        ("+/data", None, 0),
        ("site/+/#", None, 1),
        ("sensors/#", None, None),  # no "+": nothing to compare
        ("a/+/b/+", None, None),  # two: which one would it be?
        ("sensors/dev/data", None, None),
        ("sensors/+/data", "false", None),
        ("sensors/+/data", "true", 1),
    ],
)
def test_device_from_topic_default_follows_the_filter(topic: str, setting: str | None, level: int | None) -> None:
    env = {"MQTT_SUBSCRIBE_TOPIC": topic}
    if setting is not None:
        env["MQTT_DEVICE_FROM_TOPIC"] = setting
    assert load_settings(None, env).mqtt.device_level == level


@pytest.mark.parametrize("topic", ["sensors/#", "a/+/b/+"])
def test_device_from_topic_on_needs_exactly_one_plus(topic: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"MQTT_SUBSCRIBE_TOPIC": topic, "MQTT_DEVICE_FROM_TOPIC": "true"})
    assert info.value.variable == "MQTT_DEVICE_FROM_TOPIC" and "exactly one +" in str(info.value)


_DEVICE = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)


@given(device=_DEVICE, claimed=_DEVICE)
@hypothesis_settings(max_examples=200, deadline=None)
def test_topic_device_decides_reading_or_reject(device: str, claimed: str) -> None:
    m = Inbound(f"sensors/{device}/data", packet(claimed, 1), datetime.now(UTC), 1, 1, False, 1, device)
    messages, rejects = to_records([m], 65536)
    if device == claimed:
        assert [r.device_id for r in messages] == [claimed] and rejects == []
    else:
        assert messages == [] and [r.reason for r in rejects] == ["topic_mismatch"]
        assert rejects[0].errors[0]["loc"] == ["device_id"] and rejects[0].topic == m.topic
        assert rejects[0].payload == m.payload  # kept as received


async def test_forged_device_id_stored_as_topic_mismatch(mosquitto: MosquittoServer, store: Store) -> None:
    """Through a real broker, shared subscription included: only the topic's own device is stored."""
    cases = [
        ("sensors/A/data", packet("B", 1), "topic_mismatch"),  # A writes as B
        ("sensors/A/data", packet("A", 2), None),
        ("sensors/B/data", packet("B", 3), None),
        ("sensors/B/data", packet("A", 3), "topic_mismatch"),  # also cannot shadow A's seq 3
    ]
    for share in (None, "grp"):
        before = len((await store.query_rejects(100)).items)
        settings = settings_for(mosquitto, client_id=f"gw-topic-{share}", share_group=share)
        async with pipeline(settings, store) as p:
            res = await trio.to_thread.run_sync(
                lambda: publish(mosquitto.host, mosquitto.port, [c[1] for c in cases], topics=[c[0] for c in cases])
            )
            assert res.count == len(cases)
            await eventually(lambda: p.ingest.committed >= len(cases), 15)
        rejects = (await store.query_rejects(100)).items
        new = sorted((r.topic, r.payload) for r in rejects[: len(rejects) - before])
        assert new == sorted((t, b) for t, b, why in cases if why)
        assert {r.reason for r in rejects} == {"topic_mismatch"}
        stored = (await store.query_messages(MessageQuery(limit=100))).items
        assert sorted((m.device_id, m.seq) for m in stored) == [("A", 2), ("B", 3)]  # redelivery-safe


# --------------------------------------------------------------------------- default client id


def test_default_client_id_is_per_database_and_never_shows_the_url(tmp_path: Any) -> None:
    def cid(url: str | None, **extra: str) -> str:
        env = {"DATABASE_URL": url, **extra} if url else dict(extra)
        return load_settings(None, env).mqtt.client_id

    host = socket.gethostname()
    pg_a = cid("postgresql://gw:s3cret@db.example:5432/plant_a")
    assert pg_a.startswith(f"gateway-{host}-") and len(pg_a) == len(f"gateway-{host}-") + 8
    assert "s3cret" not in pg_a and "plant_a" not in pg_a and "db.example" not in pg_a
    assert pg_a == cid("postgresql://gw:s3cret@db.example:5432/plant_a")  # stable
    assert pg_a == cid("postgres://gw:rotated@db.example/plant_a")  # a new password keeps the session
    assert pg_a != cid("postgresql://gw:s3cret@db.example:5432/plant_b")
    assert pg_a != cid("postgresql://gw:s3cret@db2.example:5432/plant_a")
    assert cid(f"sqlite:///{tmp_path}/a.db") != cid(f"sqlite:///{tmp_path}/b.db")
    assert cid(None) == cid("sqlite:///data/gateway.db") == MqttSettings().client_id
    assert cid("postgresql://gw@db/x", MQTT_CLIENT_ID="mine") == "mine"  # explicit wins


# ------------------------------------------------------------------------------ session takeover


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_two_bridges_with_one_client_id_report_the_takeover(
    mosquitto: MosquittoServer, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(mosquitto, client_id="twin", protocol=protocol, reconnect_min=0.05, reconnect_max=0.4)
    health_a, health_b = ComponentHealth("mqtt"), ComponentHealth("mqtt")
    taken = metrics.MQTT_TAKEOVERS._value.get()
    with caplog.at_level(logging.INFO, "gateway.mqtt"):
        async with running(settings, health_a) as (a, _):
            async with running(settings, health_b) as (b, _):
                await eventually(lambda: a.takeovers + b.takeovers >= 2, 20)
                cause = next(h.last_error for h in (health_a, health_b) if h.last_error and "took" in h.last_error)
                # mosquitto 2.0.11 closes the old connection without a DISCONNECT even on MQTT 5.
                assert "another client with id 'twin'" in cause and "took the session over" in cause
                assert "degraded" in (health_a.state, health_b.state)
                assert health_a.detail["takeovers"] + health_b.detail["takeovers"] >= 2
            # The twin is gone: after a quiet while the survivor says ok again.
            await eventually(lambda: a.connected and health_a.state == "ok", 15)
    assert metrics.MQTT_TAKEOVERS._value.get() - taken >= 2
    said = [r for r in caplog.records if "another client with id 'twin'" in r.getMessage()]
    assert said and said[0].levelno == logging.ERROR
    # The fight slows down: the backoff is not reset by connections that end within seconds.
    attempts = [
        int(r.getMessage().rsplit("attempt=", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("reconnecting in=")
    ]
    assert max(attempts) >= 3


async def test_broker_restarts_are_no_takeover(mosquitto: MosquittoServer) -> None:
    health = ComponentHealth("mqtt")
    async with running(settings_for(mosquitto, protocol="3.1.1"), health) as (bridge, _):
        for _ in range(TAKEOVER_REPEATS + 1):
            mosquitto.stop()
            await eventually(lambda: "refused" in (health.last_error or ""), 10)  # a failed connect
            mosquitto.start()
            await eventually(lambda: bridge.connected, 10)
        assert bridge.takeovers == 0 and health.state == "ok"


async def _scripted_v5_broker(listener: trio.SocketListener, disconnect: bytes) -> None:
    """Accept MQTT 5 clients: CONNACK, SUBACK for their SUBSCRIBE, then ``disconnect`` and close."""
    while True:
        stream = await listener.accept()
        async with stream:
            got = b""
            while len(got) < 2 or len(got) < 2 + got[1]:  # CONNECT (short: one length byte)
                got += await stream.receive_some()
            await stream.send_all(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success, no properties
            rest = got[2 + got[1] :]
            while len(rest) < 4:
                rest += await stream.receive_some()
            assert rest[0] >> 4 == 8, rest  # SUBSCRIBE
            await stream.send_all(bytes([0x90, 4, rest[2], rest[3], 0, 1]))  # SUBACK: granted QoS 1
            await stream.send_all(disconnect)


async def test_mqtt5_disconnect_session_taken_over_is_reported_at_once() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    health = ComponentHealth("mqtt")
    settings = settings_for(None, url=f"mqtt://127.0.0.1:{port}", client_id="twin5", reconnect_max=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_scripted_v5_broker, listeners[0], bytes([0xE0, 2, 0x8E, 0]))
        bridge = MqttBridge(settings, health)
        nursery.start_soon(bridge.run, trio.open_memory_channel[list[Inbound]](1)[0])
        await eventually(lambda: bridge.takeovers >= 1, 10)
        assert health.state == "degraded" and health.last_error is not None
        assert "another client with id 'twin5' took the session over" in health.last_error
        assert "0x8E" in health.last_error
        nursery.cancel_scope.cancel()


# -------------------------------------------------------------- bounded memory, own window


async def test_oversized_publish_is_kept_as_truncated_reject_without_holding_it(
    mosquitto: MosquittoServer, tmp_path: Any
) -> None:
    """MQTT 3.1.1 has no Maximum Packet Size: a 20 MB publish arrives; only its head is ever held."""
    import tracemalloc

    settings = settings_for(mosquitto, protocol="3.1.1", max_packet_size=256 * 1024)
    big = b'{"device_id": "d7", "pad": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    big_file = tmp_path / "big.json"
    big_file.write_bytes(big)
    topic = "sensors/d7/data"
    async with running(settings) as (bridge, recv):
        tracemalloc.start()  # (the big one is published from another process: only ours counts)
        try:
            assert await pub(mosquitto, [packet("d7", 1)], topic=topic) == 1
            await trio.run_process(
                ["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t", topic, "-f", str(big_file)]
            )
            assert await pub(mosquitto, [b"y" * 200_000, packet("d7", 2)], topic=topic) == 2
            got = await collect(recv, 4)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [m.truncated_from for m in got] == [None, len(big), None, None]  # 200 KB is under the cap
        assert len(got[1].payload) == 65536 and got[1].payload == big[:65536]
        assert peak < 4 * 1024 * 1024, peak  # not 20 MB (paho alone used to copy it three times)
        messages, rejects = to_records(got, 65536)
        assert [m.seq for m in messages] == [1, 2]
        assert [r.reason for r in rejects] == ["too_large", "too_large"]
        assert str(len(big)) in rejects[0].errors[0]["msg"] and len(rejects[0].payload) == 65536
        bridge.ack(got)


async def test_mqtt5_maximum_packet_size_makes_the_broker_drop_oversized(mosquitto: MosquittoServer) -> None:
    settings = settings_for(mosquitto, protocol="5", max_packet_size=64 * 1024)
    async with running(settings) as (bridge, recv):
        assert await pub(mosquitto, [b"z" * 100_000, packet("d8", 1)], topic="sensors/d8/data") == 2
        got = await collect(recv, 1)
        assert [m.payload for m in got] == [packet("d8", 1)]  # the big one never reached us
        bridge.ack(got)
        assert await quiet(recv, 0.3) == []


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_inflight_stays_within_our_own_window(mosquitto: MosquittoServer, protocol: str) -> None:
    """The test broker allows 1000 in flight (and mosquitto overshoots Receive Maximum when acks
    come in batches): the bridge itself stops reading at MQTT_RECEIVE_MAXIMUM."""
    cap = 50
    settings = settings_for(mosquitto, protocol=protocol, receive_maximum=cap, client_id=f"win-{protocol}")
    async with running(settings):
        pass  # the session exists, so a backlog queues while we are away
    await pub(mosquitto, [packet("d9", i) for i in range(3000)], topic="sensors/d9/data")
    seen = 0
    most = 0
    async with running(settings) as (bridge, recv):
        held: list[Inbound] = []
        with trio.fail_after(60):
            while seen < 3000:
                batch = await recv.receive()
                seen += len(batch)
                held.extend(batch)
                most = max(most, int(metrics.MQTT_INFLIGHT._value.get()))
                if len(held) >= 40 or seen == 3000:  # acks in batches, as ingest sends them
                    await trio.sleep(0.01)
                    bridge.ack(held)
                    held = []
    assert seen == 3000 and 40 <= most <= cap


async def test_inflight_bytes_budget_stops_reading(mosquitto: MosquittoServer) -> None:
    budget = 256 * 1024
    settings = settings_for(mosquitto, inflight_bytes=budget)
    async with running(settings) as (bridge, recv):
        body = b"b" * 30_000
        assert await pub(mosquitto, [body] * 40, topic="sensors/d10/data") == 40
        first = await collect(recv, 40, 1.0)  # nothing acked: only about the budget comes in
        assert budget <= sum(len(m.payload) for m in first) < budget + len(body)
        assert metrics.MQTT_INFLIGHT_BYTES._value.get() == sum(len(m.payload) for m in first)
        bridge.ack(first)
        total = len(first)
        with trio.fail_after(10):
            while total < 40:  # acking as it comes: the rest flows
                batch = await recv.receive()
                assert metrics.MQTT_INFLIGHT_BYTES._value.get() < budget + len(body)
                total += len(batch)
                bridge.ack(batch)
