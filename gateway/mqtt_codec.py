"""MQTT 3.1.1 / 5 frames as bytes: decode a received stream, encode what the hot path sends.

Pure (no sockets, no paho, no clock), in the style of hypercorn's protocol/I-O split: the caller
:meth:`FrameDecoder.feed` s whatever bytes it read and takes whole frames out with
:meth:`FrameDecoder.next`; the encoders return bytes for the caller to write. A malformed frame
raises :class:`MqttCodecError`, after which the stream is unusable (the connection must close).

Only PUBLISH is decoded here (the hot path); every other packet comes out whole as a
:class:`Frame` for a full client (paho) to handle.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

MAX_PACKET = 268435460
"""The largest packet MQTT can frame (4-byte remaining length plus 5 header bytes)."""
KEEP = 65536
"""Payload bytes kept of a PUBLISH over the decoder's ``max_packet`` (the rest is skipped)."""
_HEAD = 2 + 65535 + 2 + 4
"""Room for a PUBLISH's variable header: topic length and topic, packet id, properties length."""

PUBLISH = 0x30
PUBACK = 0x40

_PUBACK = struct.Struct(">BBH")
_U16 = struct.Struct(">H")


class MqttCodecError(ValueError):
    """The peer sent a malformed frame; the connection cannot go on."""


@dataclass(slots=True)
class Publish:
    """A decoded PUBLISH. ``mid`` is 0 at QoS 0; ``truncated_from`` is the payload's size on the
    wire when only its first :data:`KEEP` bytes were kept (a packet over ``max_packet``)."""

    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool
    mid: int
    truncated_from: int | None = None


@dataclass(slots=True)
class Frame:
    """Any other packet, whole as received (fixed header included)."""

    first: int
    data: bytes

    @property
    def kind(self) -> int:
        """The packet type (1 CONNECT … 15 AUTH)."""
        return self.first >> 4


class FrameDecoder:
    """Incremental decoder of the bytes a broker sends.

    ``v5``: MQTT 5 framing (a PUBLISH carries properties; they are skipped by their length, a
    Topic Alias is resolved). ``max_packet``: a PUBLISH over it is never held whole: its head is
    collected, the rest of it skipped as it streams in, and it comes out with the first
    :data:`KEEP` payload bytes and ``truncated_from``; any other packet over it is an error.
    """

    __slots__ = ("_aliases", "_big", "_big_first", "_big_need", "_big_remaining", "_buf", "_discard", "_held",
                 "_max", "_more", "_pos", "_v5")  # fmt: skip

    def __init__(self, *, v5: bool, max_packet: int = MAX_PACKET) -> None:
        self._v5 = v5
        self._max = max_packet
        self._buf = b""
        self._pos = 0
        self._more: list[bytes] = []  # fed since the last next(): joined once, not per feed
        self._aliases: dict[int, str] = {}
        self._big: bytearray | None = None  # head of an oversized PUBLISH being collected
        self._big_first = 0
        self._big_remaining = 0
        self._big_need = 0
        self._discard = 0  # bytes of it still to skip
        self._held: Publish | None = None  # its shortened form, handed out once skipped

    @property
    def buffered(self) -> int:
        """Bytes fed and not consumed yet (possibly an incomplete frame)."""
        return len(self._buf) - self._pos + sum(map(len, self._more))

    def feed(self, data: bytes) -> None:
        """Append bytes read from the connection."""
        self._more.append(data)

    def next(self) -> Publish | Frame | None:
        """The next whole frame, or None until more bytes are fed. Raises :class:`MqttCodecError`."""
        if self._more:
            more = self._more[0] if len(self._more) == 1 else b"".join(self._more)
            self._more = []
            self._buf = more if self._pos >= len(self._buf) else self._buf[self._pos :] + more
            self._pos = 0
        while True:
            if self._big is not None or self._discard:
                if not self._skip_big():
                    return None
                continue
            if self._held is not None:
                held, self._held = self._held, None
                return held
            buf, pos = self._buf, self._pos
            size = len(buf)
            if size - pos < 2:
                return None
            first = buf[pos]
            remaining = buf[pos + 1]
            start = pos + 2
            if remaining & 128:
                remaining &= 127
                shift = 7
                while True:
                    if start >= size:
                        return None
                    byte = buf[start]
                    start += 1
                    remaining |= (byte & 127) << shift
                    if not byte & 128:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttCodecError("remaining length longer than 4 bytes")
            end = start + remaining
            if end - pos > self._max:
                if first & 0xF0 != PUBLISH:
                    raise MqttCodecError(f"packet type {first >> 4} of {end - pos} bytes over the maximum {self._max}")
                self._pos = start
                self._big, self._big_first, self._big_remaining = bytearray(), first, remaining
                self._big_need = min(remaining, _HEAD + KEEP)
                continue
            if end > size:
                return None
            self._pos = end
            if first & 0xF0 == PUBLISH:
                return self._publish(first, buf, start, end)
            return Frame(first, buf[pos:end])

    def _publish(self, first: int, buf: bytes, p: int, end: int, wire: int | None = None) -> Publish:
        """Decode a PUBLISH's variable header and payload ``buf[p:end]``.

        ``wire``: the packet's remaining length when ``buf`` holds only its head (then the
        payload is cut to :data:`KEEP` bytes and ``truncated_from`` set).
        """
        qos = (first >> 1) & 3
        if qos == 3:
            raise MqttCodecError("PUBLISH with QoS 3")
        if end - p < 2:
            raise MqttCodecError("PUBLISH shorter than its topic length")
        tstart = p + 2
        p = tstart + ((buf[p] << 8) | buf[p + 1])
        if p > end:
            raise MqttCodecError("PUBLISH topic longer than the packet")
        topic = buf[tstart:p].decode("utf-8", "replace")
        mid = 0
        if qos:
            if p + 2 > end:
                raise MqttCodecError("PUBLISH without its packet identifier")
            mid = (buf[p] << 8) | buf[p + 1]
            if not mid:
                raise MqttCodecError("PUBLISH with packet identifier 0")
            p += 2
        if self._v5:
            if p >= end:
                raise MqttCodecError("PUBLISH without its properties length")
            plen = buf[p]
            p += 1
            if plen & 128:  # rare: properties of 128 bytes or more
                plen, p = _varint_at(buf, p, end, plen & 127)
            if plen:  # a PUBLISH without properties (the common case) makes no call
                topic = self._properties(buf, p, p + plen, end, wire, topic)
            p += plen
        if not topic:
            raise MqttCodecError("PUBLISH without a topic")
        if wire is None:
            return Publish(topic, buf[p:end], qos, bool(first & 8), bool(first & 1), mid)
        return Publish(topic, bytes(buf[p : p + KEEP]), qos, bool(first & 8), bool(first & 1), mid, max(0, wire - p))

    def _properties(self, buf: bytes, p: int, props_end: int, end: int, wire: int | None, topic: str) -> str:
        """Check a PUBLISH's properties ``buf[p:props_end]``; the topic, resolved through a Topic Alias."""
        if props_end > end:
            if wire is None or props_end > wire:
                raise MqttCodecError("PUBLISH properties longer than the packet")
            return topic  # an oversized PUBLISH's head: its properties were cut off, not checked
        alias = _topic_alias(buf, p, props_end)
        if not alias:
            return topic
        if topic:
            self._aliases[alias] = topic
            return topic
        if alias in self._aliases:
            return self._aliases[alias]
        raise MqttCodecError(f"PUBLISH with unknown topic alias {alias}")

    def _skip_big(self) -> bool:
        """Collect an oversized PUBLISH's head, then skip its rest; False until more bytes come."""
        buf, pos = self._buf, self._pos
        big = self._big
        if big is not None:
            n = min(len(buf) - pos, self._big_need - len(big))
            big += buf[pos : pos + n]
            pos += n
            self._pos = pos
            if len(big) < self._big_need:
                return False
            self._big = None
            self._discard = self._big_remaining - len(big)
            self._held = self._publish(self._big_first, bytes(big), 0, len(big), self._big_remaining)
        if self._discard:
            n = min(len(buf) - pos, self._discard)
            self._pos = pos + n
            self._discard -= n
            if self._discard:
                return False
        return True


def _varint_at(buf: bytes, p: int, end: int, value: int) -> tuple[int, int]:
    """The rest of a PUBLISH's properties length from ``buf[p]`` on (``value``: its first byte's
    low 7 bits); returns (length, the position after it)."""
    shift = 7
    while True:
        if p >= end:
            raise MqttCodecError("PUBLISH properties length cut short")
        byte = buf[p]
        p += 1
        value |= (byte & 127) << shift
        if not byte & 128:
            return value, p
        shift += 7
        if shift > 21:
            raise MqttCodecError("PUBLISH properties length longer than 4 bytes")


def _topic_alias(buf: bytes, p: int, end: int) -> int:
    """Walk PUBLISH properties ``buf[p:end]``; the Topic Alias (0 when absent)."""
    alias = 0
    while p < end:
        pid = buf[p]
        p += 1
        if pid == 0x23:  # Topic Alias (two-byte integer)
            if p + 2 > end:
                raise MqttCodecError("PUBLISH topic alias cut short")
            alias = (buf[p] << 8) | buf[p + 1]
            if not alias:
                raise MqttCodecError("PUBLISH with topic alias 0")
            p += 2
        elif pid == 0x01:  # Payload Format Indicator (byte)
            p += 1
        elif pid == 0x02:  # Message Expiry Interval (four-byte integer)
            p += 4
        elif pid in (0x03, 0x08, 0x09):  # Content Type, Response Topic, Correlation Data
            p = _skip_string(buf, p, end)
        elif pid == 0x26:  # User Property (string pair)
            p = _skip_string(buf, _skip_string(buf, p, end), end)
        elif pid == 0x0B:  # Subscription Identifier (varint)
            for _ in range(4):
                if p >= end:
                    break
                p += 1
                if not buf[p - 1] & 128:
                    break
            else:
                raise MqttCodecError("PUBLISH subscription identifier longer than 4 bytes")
        else:
            raise MqttCodecError(f"property 0x{pid:02x} is not allowed in PUBLISH")
    if p != end:
        raise MqttCodecError("PUBLISH properties cut short")
    return alias


def _skip_string(buf: bytes, p: int, end: int) -> int:
    if p + 2 > end:
        raise MqttCodecError("PUBLISH property cut short")
    return p + 2 + ((buf[p] << 8) | buf[p + 1])


# ------------------------------------------------------------------------------ encoders


def varint(n: int) -> bytes:
    """An MQTT variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (128 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    """An MQTT packet: the first byte, the remaining length (a varint), then ``body``."""
    return bytes((first,)) + varint(len(body)) + body


def encode_pubacks(mids: Iterable[int]) -> bytes:
    """One PUBACK (success, no properties: the same 4 bytes in 3.1.1 and 5) per packet id, in order."""
    pack = _PUBACK.pack
    return b"".join([pack(PUBACK, 2, mid) for mid in mids])


def encode_publish(topic: bytes, payload: bytes, mid: int, *, v5: bool, qos: int = 1, dup: bool = False) -> bytes:
    """A PUBLISH (QoS 1 by default; MQTT 5 with empty properties)."""
    head = _U16.pack(len(topic)) + topic
    if qos:
        head += _U16.pack(mid)
    if v5:
        head += b"\x00"
    return packet(PUBLISH | (qos << 1) | (8 if dup else 0), head + payload)


def decode_puback(frame: Frame, *, v5: bool) -> tuple[int, int]:
    """(packet id, reason code) of a PUBACK frame; reason 0 is success (always so in 3.1.1)."""
    data = frame.data
    start = len(data) - _remaining_length(data)
    if len(data) - start < 2:
        raise MqttCodecError("PUBACK without its packet identifier")
    mid = (data[start] << 8) | data[start + 1]
    reason = data[start + 2] if v5 and len(data) - start > 2 else 0
    return mid, reason


def _remaining_length(data: bytes) -> int:
    n, shift, i = 0, 0, 1
    while True:
        byte = data[i]
        n |= (byte & 127) << shift
        i += 1
        if not byte & 128:
            return n
        shift += 7


__all__ = [
    "KEEP",
    "MAX_PACKET",
    "PUBACK",
    "PUBLISH",
    "Frame",
    "FrameDecoder",
    "MqttCodecError",
    "Publish",
    "decode_puback",
    "encode_pubacks",
    "encode_publish",
    "packet",
    "varint",
]
