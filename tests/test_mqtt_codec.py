"""The MQTT frame codec against paho's own decoder, on random streams cut anywhere; and the bridge
using it: over real brokers (plain and TLS, MQTT 5 and 3.1.1) and against a broker sending garbage."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.health import ComponentHealth
from gateway.mqtt import Inbound, MqttBridge
from gateway.mqtt_codec import (
    KEEP,
    Frame,
    FrameDecoder,
    MqttCodecError,
    Publish,
    decode_puback,
    encode_pubacks,
    encode_publish,
    packet,
    varint,
)
from tests.support.mqtt import MosquittoServer, TlsFiles, eventually, publish


@dataclass(frozen=True)
class Spec:
    """One PUBLISH to put on the wire, and what a decoder must make of it."""

    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool
    mid: int
    props: dict[str, Any]


def wire(spec: Spec, v5: bool) -> bytes:
    """The PUBLISH as bytes, its properties packed by paho (not by the codec under test)."""
    topic = spec.topic.encode()
    var = len(topic).to_bytes(2, "big") + topic
    if spec.qos:
        var += spec.mid.to_bytes(2, "big")
    if v5:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in spec.props.items():
            setattr(props, name, value)
        var += props.pack()  # type: ignore[no-untyped-call]
    first = 0x30 | (spec.qos << 1) | (8 if spec.dup else 0) | (1 if spec.retain else 0)
    return bytes([first]) + varint(len(var) + len(spec.payload)) + var + spec.payload


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
_props = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": _text,
        "ResponseTopic": _text.filter(bool),
        "CorrelationData": st.binary(max_size=30),
        "UserProperty": st.lists(st.tuples(_text, _text), min_size=1, max_size=3),
        "SubscriptionIdentifier": st.integers(1, 268435455),
    },
)
_payload = st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"x" * 70_000, bytes(range(256)) * 40]))


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    qos = draw(st.integers(0, 1))
    return Spec(
        topic=draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                           min_size=1, max_size=40)),
        payload=draw(_payload),
        qos=qos,
        dup=draw(st.booleans()) if qos else False,
        retain=draw(st.booleans()),
        mid=draw(st.integers(1, 65535)) if qos else 0,
        props=draw(_props),
    )  # fmt: skip


def cut(stream: bytes, points: list[int]) -> list[bytes]:
    """``stream`` in pieces, cut at the given offsets (mod its length)."""
    marks = sorted({p % (len(stream) + 1) for p in points} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(marks)]


class _Pieces:
    """A socket for paho: the pieces one per recv() (at most what paho asks for), then "would block"."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def recv(self, n: int) -> bytes:
        while self.pieces and not self.pieces[0]:
            self.pieces.pop(0)
        if not self.pieces:
            raise BlockingIOError
        head, self.pieces[0] = self.pieces[0][:n], self.pieces[0][n:]
        return head

    def send(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass


def paho_decode(pieces: list[bytes], v5: bool) -> list[tuple[Any, ...]]:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                         manual_ack=True)  # fmt: skip
    got: list[tuple[Any, ...]] = []
    client.on_message = lambda c, u, m: got.append(
        (m._topic.decode("utf-8", "replace"), bytes(m.payload), m.qos, bool(m.dup), bool(m.retain), m.mid)
    )
    sock = _Pieces(pieces)
    client._sock = sock  # type: ignore[assignment]
    while sock.pieces:
        client.loop_read()
    return got


def codec_decode(pieces: list[bytes], v5: bool, max_packet: int = 268435460) -> list[Publish | Frame]:
    decoder = FrameDecoder(v5=v5, max_packet=max_packet)
    out: list[Publish | Frame] = []
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next()) is not None:
            out.append(frame)
    assert decoder.buffered == 0
    return out


def as_tuple(p: Publish | Frame) -> tuple[Any, ...]:
    assert isinstance(p, Publish)
    return (p.topic, p.payload, p.qos, p.dup, p.retain, p.mid)


@given(
    messages=st.lists(specs(), min_size=1, max_size=12),
    points=st.lists(st.integers(0, 10**7), max_size=30),
    v5=st.booleans(),
)
@hypothesis_settings(max_examples=150, deadline=None)
def test_codec_decodes_what_paho_decodes_wherever_the_stream_is_cut(
    messages: list[Spec], points: list[int], v5: bool
) -> None:
    stream = b"".join(wire(m, v5) for m in messages)
    pieces = cut(stream, points)
    ours = [as_tuple(p) for p in codec_decode(pieces, v5)]
    assert ours == paho_decode(pieces, v5)
    assert ours == [(m.topic, m.payload, m.qos, m.dup, m.retain, m.mid) for m in messages]


@given(messages=st.lists(specs(), min_size=1, max_size=8), v5=st.booleans())
@hypothesis_settings(max_examples=60, deadline=None)
def test_paho_decodes_what_the_codec_encodes(messages: list[Spec], v5: bool) -> None:
    stream = b"".join(encode_publish(m.topic.encode(), m.payload, m.mid or 1, v5=v5, dup=m.dup) for m in messages)
    got = paho_decode(cut(stream, [7, 100, 5000]), v5)
    assert got == [(m.topic, m.payload, 1, m.dup, False, m.mid or 1) for m in messages]


def test_pubacks_are_paho_s_bytes_in_order() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    sent: list[bytes] = []
    client._packet_queue = lambda command, packet, mid, qos, info=None: sent.append(bytes(packet))  # type: ignore[method-assign]
    for mid in (1, 300, 65535):
        client._send_puback(mid)
    assert encode_pubacks([1, 300, 65535]) == b"".join(sent)
    assert encode_pubacks([]) == b""
    frame = codec_decode([encode_pubacks([258])], v5=True)[0]
    assert isinstance(frame, Frame) and frame.kind == 4 and decode_puback(frame, v5=True) == (258, 0)
    refused = codec_decode([packet(0x40, b"\x01\x02\x87\x00")], v5=True)[0]
    assert isinstance(refused, Frame) and decode_puback(refused, v5=True) == (258, 0x87)


def test_other_frames_pass_whole() -> None:
    frames = [packet(0x20, b"\x00\x00\x00"), packet(0xD0, b""), packet(0x90, b"\x00\x01\x00\x01"),
              packet(0xE0, b"\x8e\x00"), packet(0x40, b"\x00\x07")]  # fmt: skip
    got = codec_decode(cut(b"".join(frames), [1, 2, 3, 9, 13]), v5=True)
    assert [f.data for f in got if isinstance(f, Frame)] == frames


def test_topic_alias_is_resolved() -> None:
    alias = b"\x03\x23\x00\x05"  # properties: length 3, Topic Alias 5
    first = packet(0x32, b"\x00\x03a/b\x00\x01" + alias + b"one")
    again = packet(0x32, b"\x00\x00\x00\x02" + alias + b"two")  # empty topic: use the alias
    got = codec_decode([first + again], v5=True)
    assert [as_tuple(p) for p in got] == [("a/b", b"one", 1, False, False, 1), ("a/b", b"two", 1, False, False, 2)]
    with pytest.raises(MqttCodecError, match="unknown topic alias"):
        codec_decode([again], v5=True)


@pytest.mark.parametrize(
    ("data", "v5", "why"),
    [
        (b"\x30\xff\xff\xff\xff\x01", False, "longer than 4 bytes"),
        (packet(0x36, b"\x00\x01a\x00\x01"), False, "QoS 3"),
        (packet(0x32, b"\x00\x09a\x00\x01"), False, "topic longer"),
        (packet(0x32, b"\x00\x01a\x00"), False, "packet identifier"),
        (packet(0x32, b"\x00\x01a\x00\x00x"), False, "identifier 0"),
        (packet(0x30, b"\x00\x00x"), False, "without a topic"),
        (packet(0x30, b"\x00\x01a"), True, "properties length"),
        (packet(0x30, b"\x00\x01a\x05\x01\x01"), True, "properties longer"),
        (packet(0x30, b"\x00\x01a\x02\x7f\x00"), True, "not allowed"),
        (packet(0x30, b"\x00\x01a\x02\x02\x00"), True, "cut short"),
        (packet(0x30, b"\x00\x01a\x03\x23\x00\x00"), True, "alias 0"),
        (packet(0x90, b"\x00" * 5000), True, "over the maximum"),
    ],
)
def test_malformed_frames_raise(data: bytes, v5: bool, why: str) -> None:
    with pytest.raises(MqttCodecError, match=why):
        codec_decode([data], v5=v5, max_packet=4096)


@given(
    sizes=st.lists(st.sampled_from([0, 10, 300, 3000, 70_000, 200_000]), min_size=1, max_size=8),
    points=st.lists(st.integers(0, 10**7), max_size=20),
    v5=st.booleans(),
)
@hypothesis_settings(max_examples=60, deadline=None)
def test_oversized_publishes_are_cut_wherever_the_stream_splits(sizes: list[int], points: list[int], v5: bool) -> None:
    limit = 65_536
    stream, want = b"", []
    for i, size in enumerate(sizes):
        payload = bytes([65 + i % 26]) * size
        props = b"\x02\x01\x01" if v5 else b""  # length 2: Payload Format Indicator 1
        body = b"\x00\x0esensors/d/data" + (i + 1).to_bytes(2, "big") + props + payload
        stream += packet(0x32, body) + packet(0xD0, b"")  # a PINGRESP between publishes passes
        cut_from = size if len(body) + 5 > limit else None
        want += [("sensors/d/data", payload[:KEEP], i + 1, cut_from), b"\xd0\x00"]
    got = codec_decode(cut(stream, points), v5, max_packet=limit)
    assert [(f.topic, f.payload, f.mid, f.truncated_from) if isinstance(f, Publish) else f.data for f in got] == want


# ------------------------------------------------------------------ the bridge on real brokers


def _settings(url: str, protocol: str, **kw: Any) -> Any:
    from gateway.settings import MqttSettings

    return MqttSettings(url=url, client_id=f"codec-{protocol}", protocol=protocol, reconnect_min=0.05,
                        reconnect_max=0.3, connect_timeout=5.0, keepalive=5, **kw)  # fmt: skip


def _publish_v5(server: MosquittoServer, messages: list[Spec], ca: str | None) -> None:
    """Publish with MQTT 5 properties (the broker forwards them), QoS as given; wait for the acks."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="codec-pub", protocol=paho.MQTTv5)
    if ca:
        client.tls_set(ca_certs=ca)
    client.max_inflight_messages_set(1000)
    done = threading.Event()
    left = {i for i, m in enumerate(messages) if m.qos}
    mids: dict[int, int] = {}

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        left.discard(mids.get(mid, -1))
        if not left:
            done.set()

    client.on_publish = on_publish
    client.connect(server.host, server.port)
    client.loop_start()
    try:
        for i, m in enumerate(messages):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in m.props.items():
                if name != "SubscriptionIdentifier":  # only the broker may set it
                    setattr(props, name, value)
            info = client.publish(m.topic, m.payload, qos=m.qos, properties=props)
            mids[info.mid] = i
        if left:
            assert done.wait(30)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("tls", [False, True])
async def test_bridge_delivers_exactly_what_was_published(
    protocol: str, tls: bool, mosquitto: MosquittoServer, mosquitto_tls: MosquittoServer, mqtt_tls_files: TlsFiles
) -> None:
    import random

    server = mosquitto_tls if tls else mosquitto
    rnd = random.Random(11)
    specs_ = [
        Spec(f"sensors/d{i % 7}/data", rnd.choice([b"", b"p" * rnd.randint(1, 3000), b"big" * 30_000]),
             i % 2, False, False, 0, {"UserProperty": [("k", "v" * i)], "ContentType": "x"} if i % 3 else {})
        for i in range(400)
    ]  # fmt: skip
    settings = _settings(server.url, protocol, ca_file=mqtt_tls_files.ca if tls else None)
    bridge = MqttBridge(settings, ComponentHealth("mqtt"))
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    got: list[Inbound] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        ca = str(mqtt_tls_files.ca) if tls else None
        nursery.start_soon(trio.to_thread.run_sync, _publish_v5, server, specs_, ca)
        with trio.fail_after(30):
            while len(got) < len(specs_):
                batch = await recv.receive()
                assert len({m.received_at for m in batch}) == 1  # one timestamp per read burst
                got.extend(batch)
                bridge.ack(batch)
        nursery.cancel_scope.cancel()
    assert [(m.topic, m.payload, m.qos) for m in got] == [(s.topic, s.payload, s.qos) for s in specs_]
    assert [m.topic_device for m in got] == [s.topic.split("/")[1] for s in specs_]


async def _garbage_broker(listener: trio.SocketListener, garbage: bytes, accepted: list[int]) -> None:
    """Accept clients: CONNACK, SUBACK for their SUBSCRIBE, one good PUBLISH, then ``garbage``."""
    while True:
        stream = await listener.accept()
        accepted.append(1)
        async with stream:
            got = b""
            while len(got) < 2 or len(got) < 2 + got[1]:  # CONNECT (short: one length byte)
                got += await stream.receive_some()
            await stream.send_all(bytes([0x20, 2, 0, 0]))  # CONNACK (3.1.1): accepted
            rest = got[2 + got[1] :]
            while len(rest) < 4:
                rest += await stream.receive_some()
            await stream.send_all(bytes([0x90, 3, rest[2], rest[3], 1]))  # SUBACK: granted QoS 1
            await stream.send_all(packet(0x32, b"\x00\x0bsensors/a/b\x00\x01ok") + garbage)
            with trio.move_on_after(5):
                while await stream.receive_some():  # until the client closes
                    pass


@pytest.mark.parametrize(
    "garbage",
    [b"\x30\xff\xff\xff\xff\x7f", packet(0x36, b"\x00\x01a\x00\x01"), packet(0x32, b"\x00\x40short")],
    ids=["length", "qos3", "topic"],
)
async def test_malformed_frame_closes_the_connection_and_reconnects(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    health = ComponentHealth("mqtt")
    accepted: list[int] = []
    settings = _settings(f"mqtt://127.0.0.1:{port}", "3.1.1")
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_garbage_broker, listeners[0], garbage, accepted)
        bridge = MqttBridge(settings, health)
        nursery.start_soon(bridge.run, send)
        await eventually(lambda: len(accepted) >= 3, 10)  # closed, and reconnected (with backoff)
        lost = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
        assert lost and all("reason=malformed packet from the broker" in m for m in lost), lost
        nursery.cancel_scope.cancel()
    # The good PUBLISH before the garbage was never acked (the broker redelivers it): at most
    # handed over, never anything decoded from the garbage.
    while True:
        try:
            assert all(m.payload == b"ok" for m in recv.receive_nowait())
        except trio.WouldBlock:
            break


async def test_keepalive_holds_while_only_our_decoder_sees_publishes(mosquitto: MosquittoServer) -> None:
    """paho never sees the publishes: its keepalive must still ping (PINGRESP reaches it) and not
    time out, through a stream of publishes and then silence, each longer than the keepalive."""
    settings = _settings(mosquitto.url, "5")  # keepalive 5 s
    bridge = MqttBridge(settings, ComponentHealth("mqtt"))
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    got = 0

    async def drain() -> None:
        nonlocal got
        async for batch in recv:
            got += len(batch)
            bridge.ack(batch)

    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        nursery.start_soon(drain)
        payloads = [b"k%d" % i for i in range(1200)]
        await trio.to_thread.run_sync(lambda: publish(mosquitto.host, mosquitto.port, payloads,
                                                      topic="sensors/k/data", rate=200.0))  # fmt: skip
        await trio.sleep(7.0)  # silence longer than the keepalive
        assert got == 1200
        assert bridge.connected and bridge.reconnects == 0
        nursery.cancel_scope.cancel()


async def test_qos2_publish_goes_through_paho() -> None:
    """Our decoder takes QoS 0/1 only: a QoS 2 PUBLISH (and its PUBREC/PUBREL/PUBCOMP flow) is paho's,
    in stream order with the QoS 1 ones around it; the ack of the batch completes both flows."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[int] = []

    async def broker() -> None:
        stream = await listeners[0].accept()
        decoder = FrameDecoder(v5=False)

        async def frame() -> Frame | Publish:
            while (f := decoder.next()) is None:
                decoder.feed(await stream.receive_some())
            return f

        async with stream:
            assert isinstance(await frame(), Frame)  # CONNECT
            await stream.send_all(bytes([0x20, 2, 0, 0]))
            sub = await frame()
            assert isinstance(sub, Frame) and sub.kind == 8
            await stream.send_all(bytes([0x90, 3, sub.data[2], sub.data[3], 1]))
            await stream.send_all(packet(0x32, b"\x00\x05a/1/b\x00\x01one") + packet(0x34, b"\x00\x05a/2/b\x00\x02two"))
            while True:
                f = await frame()
                assert isinstance(f, Frame)
                seen.append(f.first)
                if f.first == 0x50:  # PUBREC: release it
                    await stream.send_all(packet(0x62, b"\x00\x02") + packet(0x32, b"\x00\x05a/3/b\x00\x03three"))

    settings = _settings(f"mqtt://127.0.0.1:{port}", "3.1.1", subscribe_topic="a/+/b")
    send, recv = trio.open_memory_channel[list[Inbound]](64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker)
        bridge = MqttBridge(settings, ComponentHealth("mqtt"))
        await nursery.start(bridge.run, send)
        got: list[Inbound] = []
        with trio.fail_after(10):
            while len(got) < 3:
                got.extend(await recv.receive())
        assert [(m.payload, m.qos, m.mid, m.topic_device) for m in got] == [
            (b"one", 1, 1, "1"),
            (b"two", 2, 2, "2"),
            (b"three", 1, 3, "3"),
        ]
        bridge.ack(got)
        await eventually(lambda: seen.count(0x40) == 2 and 0x70 in seen, 5)  # two PUBACKs, one PUBCOMP
        nursery.cancel_scope.cancel()
