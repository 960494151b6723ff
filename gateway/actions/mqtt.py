"""The ``mqtt`` action: a QoS 1 JSON publish on ``MQTT_PUBLISH_TOPIC`` or a subtopic of it (pure).

The processor renders the payload inside the transaction that marks the message processed and writes
it to the outbox there, so it can carry the id of the event the same message produced (``event_id``);
delivery is at least once, and that id lets subscribers deduplicate redeliveries.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.actions.base import only_keys
from gateway.actions.template import Context, Template
from gateway.jsonenc import dumps
from gateway.store.base import StoredMessage

_SUBTOPIC = re.compile(r"^[^+#/\x00][^+#\x00]*(?<!/)$")


@dataclass(frozen=True, slots=True)
class MqttAction:
    """Publish a payload for a message.

    Without ``payload`` it is ``{"event_id", "type", "rule", "data": <the message>}``. A templated
    payload that renders to a table gets ``event_id`` added when it has none, so every outbound
    publish carries the event id (``null`` when the message produced no event).
    """

    subtopic: str | None = None
    payload: Template | None = None

    type = "mqtt"

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> MqttAction:
        """Build from a rules-file table; raises ValueError naming the problem."""
        only_keys(spec, {"type", "subtopic", "payload"})
        subtopic = spec.get("subtopic")
        if subtopic is not None and (
            not isinstance(subtopic, str) or len(subtopic) > 200 or not _SUBTOPIC.match(subtopic)
        ):
            raise ValueError(
                f"subtopic must be a topic suffix without wildcards (+ #) or leading/trailing '/' (got {subtopic!r})"
            )
        payload = Template(spec["payload"]) if "payload" in spec else None
        return cls(subtopic=subtopic, payload=payload)

    def render(
        self,
        message: StoredMessage,
        *,
        rule: str,
        event_id: int | None,
        as_json: dict[str, Any] | None = None,
        as_bytes: bytes | None = None,
    ) -> bytes:
        """The JSON payload for ``message``.

        ``as_json``: its ``to_json()`` if the caller has it; ``as_bytes``: that dict encoded
        (:func:`gateway.jsonenc.dumps`), which the default payload embeds as it is.
        """
        value: Any
        if self.payload is None:
            if as_bytes is not None:
                # The same bytes as encoding the dict below, without encoding the message again.
                return b"".join(
                    (
                        b'{"event_id":',
                        b"null" if event_id is None else str(event_id).encode(),
                        b',"type":"packet","rule":',
                        _json_text(rule),
                        b',"data":',
                        as_bytes,
                        b"}",
                    )
                )
            data = as_json if as_json is not None else message.to_json()
            value = {"event_id": event_id, "type": "packet", "rule": rule, "data": data}
        else:
            value = self.payload.render(Context(message=message, rule=rule, event_id=event_id))
            if isinstance(value, dict) and "event_id" not in value:
                value = {"event_id": event_id, **value}
        return dumps(value)


@functools.lru_cache(maxsize=256)
def _json_text(text: str) -> bytes:
    # Rule names: few, each encoded once.
    return dumps(text)
