"""The ``sse`` action: turn a message into an event for Server-Sent Events (pure).

The event is appended to the ``events`` table by the processor, in the same transaction that marks
the message processed, so SSE clients can replay it after a reconnect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.actions.base import DATA_FIELDS, check_field, field_value, only_keys
from gateway.jsonenc import dumps
from gateway.store.base import NewEvent, StoredMessage

_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: Event types the gateway itself emits with a special meaning; rules cannot produce them.
RESERVED_TYPES = frozenset({"reset"})


@dataclass(frozen=True, slots=True)
class SseAction:
    """Emit an event of type ``event``.

    Its data is the message as the API returns it, or only ``fields`` (field paths such as
    ``device_id`` or ``measurements.temperature``, each under its path as key) when given; ``rename``
    maps a key (a top-level key, or a selected path) to the name clients see.
    """

    event: str = "packet"
    fields: tuple[str, ...] | None = None
    rename: Mapping[str, str] = field(default_factory=dict)

    type = "sse"

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> SseAction:
        """Build from a rules-file table; raises ValueError naming the problem."""
        only_keys(spec, {"type", "event", "fields", "rename"})
        event = spec.get("event", "packet")
        if not isinstance(event, str) or not _EVENT_TYPE.match(event):
            raise ValueError(f"event must be 1-64 of A-Z a-z 0-9 _ . : - (got {event!r})")
        if event in RESERVED_TYPES:
            raise ValueError(f"event type {event!r} is reserved")
        fields: tuple[str, ...] | None = None
        if "fields" in spec:
            raw = spec["fields"]
            if not isinstance(raw, list) or not raw or not all(isinstance(f, str) for f in raw):
                raise ValueError("fields must be a non-empty list of field names")
            for f in raw:
                if problem := check_field(f, DATA_FIELDS):
                    raise ValueError(f"fields: {problem}")
            fields = tuple(raw)
        rename = spec.get("rename", {})
        if not isinstance(rename, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in rename.items()
        ):
            raise ValueError('rename must be a table of field = "new name"')
        if fields is not None and (unknown := set(rename) - set(fields)):
            raise ValueError(f"rename names fields not selected: {sorted(unknown)}")
        return cls(event=event, fields=fields, rename=dict(rename))

    @property
    def whole_message(self) -> bool:
        """Whether the event's data is the whole message as the API returns it (no selection, no
        renaming): then it can share the message's one JSON encoding."""
        return self.fields is None and not self.rename

    def build(
        self, message: StoredMessage, as_json: dict[str, Any] | None = None, as_bytes: bytes | None = None
    ) -> NewEvent:
        """The event for ``message`` (not yet stored, so without an id), its data encoded.

        ``as_json``: ``message.to_json()`` when the caller already has it, and ``as_bytes`` its
        encoding (used for a :attr:`whole_message` event); shared, never modified.
        """
        if self.whole_message:
            data = as_json if as_json is not None else message.to_json()
            raw = as_bytes if as_bytes is not None and as_json is not None else dumps(data)
        else:
            if self.fields is None:
                whole = as_json if as_json is not None else message.to_json()
                data = {self.rename.get(k, k): v for k, v in whole.items()}
            else:
                data = {self.rename.get(f, f): field_value(message, f) for f in self.fields}
            raw = dumps(data)
        return NewEvent(type=self.event, data=data, message_id=message.id, device_id=message.device_id, json=raw)
