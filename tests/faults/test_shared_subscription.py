"""What the broker does with a shared subscription when a member dies (issue 13, scale-out).

Measured on our own mosquitto (2.0): two members of ``$share/g/t`` with persistent MQTT 5 sessions,
as the gateway connects; one loses its connection without DISCONNECT (what SIGKILL does).
mosquitto keeps handing the dead member its turn in the round robin: its share of the stream
waits in its session until it returns, and if the session expires first the broker discards it.
``ops/SCALING.md`` builds on these two facts; if a broker upgrade changes them, these tests say so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.mqtt import MosquittoServer

BURST = 100


class Member:
    """One shared subscriber with a persistent MQTT 5 session; ``got`` is what it received."""

    def __init__(self, broker: MosquittoServer, client_id: str, expiry: int) -> None:
        self.got: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.client.on_message = lambda c, u, m: self.got.append(m.payload.decode())
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = expiry
        self.client.connect(broker.host, broker.port, keepalive=30, clean_start=False, properties=props)
        self.client.subscribe("$share/g/t", qos=1)
        self.client.loop_start()

    def die(self) -> None:
        """Drop the connection without DISCONNECT, as a killed process does."""
        self.client.loop_stop()
        sock: Any = self.client.socket()
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def count(self, prefix: str) -> int:
        return sum(p.startswith(prefix) for p in self.got)


def _publish(broker: MosquittoServer, prefix: str, n: int) -> None:
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}", protocol=paho.MQTTv311)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for i in range(n):
        pub.publish("t", f"{prefix}-{i}", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()


def _settle(predicate: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and nothing more arrives


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_a_dead_members_share_waits_in_its_session_until_it_returns(broker: MosquittoServer) -> None:
    alive, dying = Member(broker, "A", 300), Member(broker, "B", 300)
    time.sleep(0.3)  # both SUBACKed
    dying.die()
    time.sleep(0.3)
    _publish(broker, "dead", BURST)
    _settle(lambda: alive.count("dead") >= BURST // 2)
    assert alive.count("dead") == BURST // 2  # not redistributed: the other half is not given to A
    back = Member(broker, "B", 300)  # the same client id: its session, with the held half
    _settle(lambda: back.count("dead") >= BURST // 2)
    assert back.count("dead") == BURST // 2
    assert alive.count("dead") == BURST // 2
    alive.close()
    back.close()


def test_an_expired_session_discards_what_it_held(broker: MosquittoServer) -> None:
    alive, dying = Member(broker, "A", 300), Member(broker, "B", 1)
    time.sleep(0.3)
    dying.die()
    time.sleep(0.3)
    _publish(broker, "dead", BURST)
    time.sleep(2.5)  # past B's 1 s session expiry
    _publish(broker, "after", BURST)
    _settle(lambda: alive.count("after") >= BURST)
    assert alive.count("dead") == BURST // 2  # the half held for B was never redistributed ...
    assert alive.count("after") == BURST  # ... but once B's session is gone, A gets everything
    back = Member(broker, "B", 300)
    _settle(lambda: bool(back.got), 1.5)
    assert back.count("dead") == 0  # ... and is gone: acked to the publisher, delivered to nobody
    alive.close()
    back.close()
