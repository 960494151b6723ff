"""The example broker configuration in ops/mosquitto/ works as DEPLOY.md says: a real mosquitto with
that file (only paths and ports rewritten) requires client certificates and enforces the ACL."""

from __future__ import annotations

import queue
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.mqtt import free_port

OPS = Path(__file__).resolve().parent.parent / "ops" / "mosquitto"


@dataclass
class Broker:
    port: int
    ca: Path
    certs: dict[str, tuple[Path, Path]]  # CN -> (cert, key)
    log: Path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed")
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    certs = {}
    for cn in ("gateway", "esp32-kitchen-01", "dashboard"):
        leaf = ca.issue_cert(cn, common_name=cn)
        cert, key = tmp_path / f"{cn}.crt", tmp_path / f"{cn}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        certs[cn] = (cert, key)
    stranger = trustme.CA().issue_cert("intruder", common_name="gateway")  # right CN, wrong CA
    certs["stranger"] = (tmp_path / "stranger.crt", tmp_path / "stranger.key")
    stranger.cert_chain_pems[0].write_to_path(str(certs["stranger"][0]))
    stranger.private_key_pem.write_to_path(str(certs["stranger"][1]))

    port = free_port()
    (tmp_path / "data").mkdir()
    conf = (OPS / "gateway-tls.conf").read_text()
    conf = conf.replace("/etc/mosquitto/certs/", f"{tmp_path}/")
    conf = conf.replace("/etc/mosquitto/gateway.acl", str(OPS / "gateway.acl"))
    conf = conf.replace("/var/lib/mosquitto/", f"{tmp_path}/data/")
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    log = tmp_path / "mosquitto.log"
    conf = f"user root\nlog_dest file {log}\nlog_type all\n" + conf
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while f"port {port}" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "broker did not start"
            time.sleep(0.05)
        yield Broker(port, tmp_path / "ca.crt", certs, log)
    finally:
        proc.terminate()
        proc.wait(10)


def _client(broker: Broker, cn: str | None, received: queue.Queue[tuple[str, bytes]] | None = None) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{cn}", protocol=mqtt.MQTTv5)
    if cn is None:
        c.tls_set(ca_certs=str(broker.ca))
    else:
        cert, key = broker.certs[cn]
        c.tls_set(ca_certs=str(broker.ca), certfile=str(cert), keyfile=str(key))
    if received is not None:
        c.on_message = lambda _c, _u, msg: received.put((msg.topic, msg.payload))
    return c


def _connect(c: mqtt.Client, port: int) -> None:
    connected: queue.Queue[object] = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    rc = connected.get(timeout=5)
    assert not getattr(rc, "is_failure", False), rc


def test_client_certificates_and_acl(broker: Broker) -> None:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    gw = _client(broker, "gateway", got)
    sensor = _client(broker, "esp32-kitchen-01", got)
    dashboard = _client(broker, "dashboard", got)
    clients = (gw, sensor, dashboard)
    try:
        subscribed: queue.Queue[list[ReasonCode]] = queue.Queue()
        for c, topic in ((gw, "sensors/+/data"), (dashboard, "gateway/events/#")):
            _connect(c, broker.port)
            c.on_subscribe = lambda _c, _u, _m, codes, _p: subscribed.put(codes)
            c.subscribe(topic, qos=1)
            assert not any(code.is_failure for code in subscribed.get(timeout=5))

        _connect(sensor, broker.port)
        sensor.publish("sensors/other-device/data", b"forged", qos=1).wait_for_publish(5)  # ACL: dropped
        sensor.publish("sensors/esp32-kitchen-01/data", b"own", qos=1).wait_for_publish(5)
        gw.publish("gateway/events/alerts", b"alert", qos=1).wait_for_publish(5)
        seen = {got.get(timeout=5), got.get(timeout=5)}
        assert seen == {("sensors/esp32-kitchen-01/data", b"own"), ("gateway/events/alerts", b"alert")}
        time.sleep(0.3)
        assert got.empty()  # the forged reading never arrived
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


@pytest.mark.parametrize("cn", [None, "stranger"])
def test_refuses_clients_without_a_certificate_from_our_ca(broker: Broker, cn: str | None) -> None:
    c = _client(broker, cn)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.connect("127.0.0.1", broker.port)
        # TLS 1.3: the server's refusal of the client certificate arrives with the first read.
        for _ in range(20):
            if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError("refused")
    c.loop_stop()


def test_queue_limit_is_raised() -> None:
    conf = (OPS / "gateway-tls.conf").read_text()
    limit = int(next(line.split()[1] for line in conf.splitlines() if line.startswith("max_queued_messages")))
    assert limit >= 100_000


async def test_acl_and_gateway_bind_device_id_to_the_certificate(broker: Broker) -> None:
    """The sensor can only publish on its own topic (ACL), and the gateway refuses a packet on that
    topic that claims another device (MQTT_DEVICE_FROM_TOPIC, on by default)."""
    import trio

    from gateway.health import ComponentHealth
    from gateway.ingest import to_records
    from gateway.mqtt import Inbound, MqttBridge
    from gateway.settings import MqttSettings
    from tests.support.mqtt import packet

    cert, key = broker.certs["gateway"]
    settings = MqttSettings(
        url=f"mqtts://localhost:{broker.port}",
        client_id="gateway-acl",
        ca_file=broker.ca,
        cert_file=cert,
        key_file=key,
        reconnect_min=0.05,
        reconnect_max=0.3,
    )
    assert settings.device_level == 1
    bridge = MqttBridge(settings, ComponentHealth("mqtt"))
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    sensor = _client(broker, "esp32-kitchen-01")
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        assert bridge.connected
        await trio.to_thread.run_sync(_connect, sensor, broker.port)
        try:
            for topic, body in (
                ("sensors/esp32-bedroom-02/data", packet("esp32-bedroom-02", 1)),  # ACL: dropped
                ("sensors/esp32-kitchen-01/data", packet("esp32-bedroom-02", 2)),  # gateway: reject
                ("sensors/esp32-kitchen-01/data", packet("esp32-kitchen-01", 3)),  # its own: stored
            ):
                sensor.publish(topic, body, qos=1).wait_for_publish(5)
        finally:
            sensor.disconnect()
            sensor.loop_stop()
        got: list[Inbound] = []
        with trio.move_on_after(3):
            while len(got) < 3:
                got.extend(await recv.receive())
        assert [m.topic for m in got] == ["sensors/esp32-kitchen-01/data"] * 2
        messages, rejects = to_records(got, 65536)
        assert [(m.device_id, m.seq) for m in messages] == [("esp32-kitchen-01", 3)]
        assert [r.reason for r in rejects] == ["topic_mismatch"]
        bridge.ack(got)
        nursery.cancel_scope.cancel()
