"""Actions a rule can run for a message: ``sse``, ``mqtt`` and ``script``.

Each action type is a frozen dataclass with a ``parse(spec)`` classmethod (a table from the rules file;
raises ValueError) and the method the processor calls: :meth:`SseAction.build` (an event to append),
:meth:`MqttAction.render` (a payload written to the outbox with the commit),
:meth:`ScriptAction.run` (awaited before commit; raises :class:`ActionFailed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.actions.mqtt import MqttAction
from gateway.actions.script import ScriptAction
from gateway.actions.sse import SseAction
from gateway.errors import ActionFailed

Action = SseAction | MqttAction | ScriptAction

_TYPES: dict[str, type[SseAction] | type[MqttAction] | type[ScriptAction]] = {
    "sse": SseAction,
    "mqtt": MqttAction,
    "script": ScriptAction,
}


def parse_action(spec: Any) -> Action:
    """Build one action from its rules-file table; raises ValueError naming the problem."""
    if not isinstance(spec, Mapping):
        raise ValueError('an action must be a table such as {type = "sse", event = "alert"}')
    kind = spec.get("type")
    if kind not in _TYPES:
        raise ValueError(f"type must be one of {sorted(_TYPES)} (got {kind!r})")
    return _TYPES[kind].parse(spec)


__all__ = ["Action", "ActionFailed", "MqttAction", "ScriptAction", "SseAction", "parse_action"]
