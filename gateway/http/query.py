"""Query parameters shared by routes: a refused one is 400 ``query_invalid`` naming it, and the
``types`` filter of ``GET /events``, checked against the event types the gateway emits (pure)."""

from __future__ import annotations

import re

from gateway.actions.sse import SseAction
from gateway.errors import ApiError, ProblemCode
from gateway.http.openapi import EVENT_TYPE_PATTERN
from gateway.rules import RuleSet

# Emitted whatever the rules: ``packet`` (the default action's), ``alert`` (the built-in alerts),
# ``reset`` (the hub, when a resume point is older than what is kept).
BUILTIN_EVENT_TYPES = frozenset({"packet", "alert", "reset"})
MAX_TYPES = 16
_TYPE_RE = re.compile(EVENT_TYPE_PATTERN)


def bad_parameter(param: str, detail: str) -> ApiError:
    """The 400 ``query_invalid`` problem for ``param`` (its ``parameter`` member names it)."""
    return ApiError(ProblemCode.QUERY_INVALID, f"{param}: {detail}", parameter=param)


def event_types(rules: RuleSet) -> frozenset[str]:
    """Every event type the gateway can emit under ``rules``: the built-in ones and each sse action's."""
    emitted = {a.event for rule in rules.rules for a in rule.actions if isinstance(a, SseAction)}
    return BUILTIN_EVENT_TYPES | emitted


def parse_types(raw: str, known: frozenset[str]) -> frozenset[str]:
    """``?types=`` (comma-separated) as a set of event types.

    Raises :class:`ApiError` ``query_invalid`` (parameter ``types``) for a malformed list, more
    than 16 names, or a type the gateway never emits (``known``): a typo would otherwise be a
    stream that silently stays empty.
    """
    names = raw.split(",")
    if len(names) > MAX_TYPES or not all(_TYPE_RE.match(n) for n in names):
        raise bad_parameter("types", f"comma-separated event types (up to {MAX_TYPES})")
    unknown = sorted(set(names) - known)
    if unknown:
        listed = ", ".join(sorted(known))
        raise bad_parameter("types", f"unknown event type {', '.join(unknown)} (known: {listed})")
    return frozenset(names)
