"""Generated payloads through the real ingest on both stores: whatever arrives, each message ends
as exactly one reading (or a duplicate of one) or one reject, with no exception (so no restart)
and everything stored readable and servable as strict UTF-8 JSON.

Examples per store: ``HYPOTHESIS_EXAMPLES`` (default 60; ``just fuzz`` runs more). Hypothesis
runs in a worker thread and hands each batch to the Trio thread, so one store serves every example.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.health import ComponentHealth
from gateway.ingest import Ingest
from gateway.mqtt import Inbound
from gateway.settings import IngestSettings
from gateway.store.base import InsertOutcome, MessageQuery, NewMessage, Store
from tests.support.mqtt import packet

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))

# Any code point, lone surrogates and NUL included.
_CHARS = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None)
_TEXT = st.text(_CHARS, max_size=20) | st.sampled_from(["\x00", "\ud800", "a\udfffb", "temperature", "ok"])
_NUMBERS = (
    st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -0.0, 1e308, 2**63, 2**64, 10**300, 1.79e12, 253402300800000])
)
_JSON = st.recursive(
    st.none() | st.booleans() | _NUMBERS | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_FIELDS = ["device_id", "timestamp", "seq", "measurements", "status", "battery"]


@st.composite
def _packet_like(draw: st.DrawFn) -> bytes:
    """A valid packet with any field replaced, removed or added, encoded in one of several ways."""
    body: dict[str, Any] = json.loads(packet(draw(st.sampled_from(["fz-1", "fz-2"])), draw(st.integers(0, 50))))
    for name in draw(st.lists(st.sampled_from([*_FIELDS, "extra"]), max_size=3)):
        choice = draw(st.integers(0, 2))
        if choice == 0:
            body.pop(name, None)
        elif choice == 1:
            body[name] = draw(_JSON)
        else:
            body[draw(_TEXT)] = draw(_JSON)
    if draw(st.booleans()):
        body["measurements"] = {draw(_TEXT): draw(_NUMBERS | _JSON)}
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # lone surrogates raw: invalid UTF-8


_DEEP = st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n) | st.integers(1, 5000).map(
    lambda n: b'{"a":' * n + b"1" + b"}" * n
)
_PAYLOADS = (
    st.binary(max_size=200)
    | st.text(_CHARS, max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | _JSON.map(lambda v: json.dumps(v).encode())
    | _packet_like()
    | _DEEP
    | st.sampled_from([b'{"\\u0000":1}', b'{"\\ud800":1}', b"1e999", b"-" + b"9" * 5000, b"null"])
)
_BATCHES = st.lists(st.tuples(_PAYLOADS, _TEXT.map(lambda t: "sensors/" + t)), min_size=1, max_size=12)


async def _ingest(store: Store, batch: list[tuple[bytes, str]]) -> None:
    before_msgs = (await store.query_messages(MessageQuery(limit=1))).total
    before_rej = (await store.query_rejects(limit=1)).total
    now = datetime.now(UTC)
    items = [Inbound(topic, payload, now, i, 1, False, 1) for i, (payload, topic) in enumerate(batch)]
    acked: list[Inbound] = []
    stored: list[tuple[list[NewMessage], list[InsertOutcome]]] = []
    ingest = Ingest(
        IngestSettings(batch_size=100, flush_ms=5.0),
        store,
        acked.extend,
        lambda: None,
        ComponentHealth("ingest"),
        on_stored=lambda m, o: stored.append((m, o)),
    )
    send, recv = trio.open_memory_channel[list[Inbound]](4)
    await send.send(items)
    await send.aclose()
    with trio.fail_after(60):
        await ingest.run(recv)  # returns once the closed channel is drained; raises on any failure
    assert acked == items
    outcomes = [o for _, outs in stored for o in outs]
    new_msgs = (await store.query_messages(MessageQuery(limit=100))).total - before_msgs
    rejects = await store.query_rejects(limit=100)
    new_rej = rejects.total - before_rej
    assert new_msgs == sum(not o.duplicate for o in outcomes)
    assert new_msgs + new_rej + sum(o.duplicate for o in outcomes) == len(items)
    # Whatever was stored reads back and serves as strict UTF-8 JSON.
    for r in rejects.items[:new_rej]:
        json.dumps(r.to_json(), ensure_ascii=False).encode("utf-8")
        assert r.topic is not None and "\x00" not in r.topic
    for o in outcomes:
        message = await store.get_message(o.id)
        assert message is not None
        json.dumps(message.to_json(), ensure_ascii=False).encode("utf-8")


async def test_any_payload_ends_as_one_reading_or_one_reject(store: Store) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(_BATCHES)
    def check(batch: list[tuple[bytes, str]]) -> None:
        trio.from_thread.run(_ingest, store, batch)

    await trio.to_thread.run_sync(check)
