"""Component health, shared by /ping, metrics, systemd STATUS and alerts.

Each component owns one :class:`ComponentHealth` and updates it; readers only look.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["starting", "ok", "degraded", "stopped"]


@dataclass
class ComponentHealth:
    """State of one component plus free-form detail (counts, last error)."""

    name: str
    state: State = "starting"
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def set(self, state: State, error: str | None = None) -> None:
        """Change state (keeps ``since`` when unchanged); ``error`` is kept for display."""
        if state != self.state:
            self.state = state
            self.since = time.time()
        if error is not None or state == "ok":
            self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out: dict[str, Any] = {"state": self.state, "since": self.since}
        if self.last_error:
            out["last_error"] = self.last_error
        out.update(self.detail)
        return out


class Health:
    """Registry of component health; ``overall`` is ok only when every component is ok."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._components: dict[str, ComponentHealth] = {}

    def component(self, name: str) -> ComponentHealth:
        """Get (creating on first use) the health record for ``name``."""
        if name not in self._components:
            self._components[name] = ComponentHealth(name)
        return self._components[name]

    @property
    def overall(self) -> Literal["ok", "degraded"]:
        """ "ok" when every registered component is ok, else "degraded"."""
        return "ok" if all(c.state == "ok" for c in self._components.values()) else "degraded"

    def as_dict(self) -> dict[str, Any]:
        """Every component's view, by name."""
        return {name: c.as_dict() for name, c in sorted(self._components.items())}
