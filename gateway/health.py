"""Component health, shared by /ping, metrics, systemd STATUS and alerts.

Each component owns one :class:`ComponentHealth` and updates it; readers only look, or ask the
registry to be told of every change of state (:meth:`Health.on_change`: the ``component_up`` gauge).

A component that meets an error no retry can fix (refused credentials, an unknown database, an
address already in use) marks it ``refused``: while the gateway is still starting, that ends the
start with a one-line cause (exit code 3); once it runs, it is shown as ``degraded`` and retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["starting", "ok", "degraded", "stopped"]


@dataclass
class ComponentHealth:
    """State of one component plus free-form detail (counts, last error).

    ``last_error`` is free text (it may name users and hosts): only admins see it. ``code`` is the
    stable, generic cause shown to every key.
    """

    name: str
    state: State = "starting"
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    code: str | None = None
    refused: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    on_refused: Callable[[ComponentHealth], None] | None = field(default=None, repr=False, compare=False)
    on_change: Callable[[ComponentHealth], None] | None = field(default=None, repr=False, compare=False)

    def set(self, state: State, error: str | None = None, *, code: str | None = None, refused: bool = False) -> None:
        """Change state (keeps ``since`` when unchanged); ``error`` is kept for display.

        ``code`` is the generic cause (default ``<name>_unavailable`` when degraded); ``refused``
        says no retry can fix it (see the module docstring).
        """
        changed = state != self.state
        if changed:
            self.state = state
            self.since = time.time()
        if error is not None or state == "ok":
            self.last_error = error
        if state == "degraded":
            self.code = code or self.code or f"{self.name}_unavailable"
        elif state == "ok":
            self.code = None
        if state == "degraded" or state == "ok":
            self.refused = refused and state == "degraded"
        if self.refused and self.on_refused is not None:
            self.on_refused(self)
        if changed and self.on_change is not None:
            self.on_change(self)

    def as_dict(self, *, full: bool = True) -> dict[str, Any]:
        """JSON-ready view; without ``full``, no free text (error text, host names), only codes and counts."""
        out: dict[str, Any] = {"state": self.state, "since": self.since}
        if self.code and self.state != "ok":
            out["cause"] = self.code
        if self.last_error and full:
            out["last_error"] = self.last_error
        if full:
            out.update(self.detail)
        else:
            out.update({k: v for k, v in self.detail.items() if isinstance(v, int | float | bool)})
        return out


class Health:
    """Registry of component health; ``overall`` is ok only when every component is ok.

    Made with ``starting=True`` (the gateway does), ``overall`` is ``starting`` until ``started``
    is set, once every component has started. ``refusal`` holds the first component that reported
    a refused error.
    """

    def __init__(self, *, starting: bool = False) -> None:
        self.started_at = time.time()
        self.started = not starting
        self.refusal: ComponentHealth | None = None
        self._on_refusal: list[Callable[[ComponentHealth], None]] = []
        self._on_change: list[Callable[[ComponentHealth], None]] = []
        self._components: dict[str, ComponentHealth] = {}

    def component(self, name: str) -> ComponentHealth:
        """Get (creating on first use) the health record for ``name``."""
        if name not in self._components:
            self.add(ComponentHealth(name))
        return self._components[name]

    def add(self, component: ComponentHealth) -> ComponentHealth:
        """Register a record made elsewhere (a store makes its own), replacing one of that name."""
        component.on_refused = self._refused
        component.on_change = self._changed
        self._components[component.name] = component
        self._changed(component)
        if component.refused:
            self._refused(component)
        return component

    def on_refusal(self, callback: Callable[[ComponentHealth], None]) -> None:
        """Call ``callback(component)`` whenever a component reports a refused error."""
        self._on_refusal.append(callback)

    def on_change(self, callback: Callable[[ComponentHealth], None]) -> None:
        """Call ``callback(component)`` for every component now, when one is added, and whenever
        one changes state."""
        self._on_change.append(callback)
        for component in self._components.values():
            callback(component)

    def _refused(self, component: ComponentHealth) -> None:
        if self.refusal is None:
            self.refusal = component
        for callback in self._on_refusal:
            callback(component)

    def _changed(self, component: ComponentHealth) -> None:
        for callback in self._on_change:
            callback(component)

    @property
    def overall(self) -> Literal["starting", "ok", "degraded"]:
        """ "starting" until the gateway has started, then "ok" when every component is ok, else "degraded"."""
        if not self.started:
            return "starting"
        return "ok" if all(c.state == "ok" for c in self._components.values()) else "degraded"

    def as_dict(self, *, full: bool = True) -> dict[str, Any]:
        """Every component's view, by name (see :meth:`ComponentHealth.as_dict`)."""
        return {name: c.as_dict(full=full) for name, c in sorted(self._components.items())}

    def summary(self) -> str:
        """One line for systemd's ``STATUS=``: overall state, broker, database and backlog."""
        mqtt, db, proc = (self.component(name) for name in ("mqtt", "database", "processor"))
        return f"{self.overall}; mqtt {mqtt.state}; db {db.state}; backlog {proc.detail.get('backlog', '?')}"
