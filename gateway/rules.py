"""Processing rules: which actions run for which message, from an optional TOML file (pure).

A rules file (``RULES_FILE``) is a list of ``[[rule]]`` tables::

    [[rule]]
    name = "hot"
    when = { all = [ { field = "measurements.temperature", op = ">", value = 30 },
                     { field = "status", op = "in", value = ["ok", "warning"] } ] }
    actions = [ { type = "sse", event = "alert", fields = ["device_id", "measurements.temperature"] },
                { type = "mqtt", subtopic = "alerts", payload = { device = "{device_id}" } } ]
    stop = true            # optional: later rules are not evaluated for a message this rule matched

Conditions are structured predicates, never code: ``{field, op, value}`` with ``op`` among
``== != < <= > >= in exists``; ``{all = [...]}``, ``{any = [...]}``, ``{not = {...}}`` nest freely; a
list is ``all``; no ``when`` matches every message. A comparison on an absent field (a measurement the
message lacks, a missing battery or seq) is false, whatever the operator; ``exists`` tests presence.

Rules are evaluated in file order; every matching rule contributes its actions. Without a file every
message becomes a ``packet`` event and an MQTT publish (:func:`default_rules`). Anything wrong in the file
raises :class:`~gateway.errors.RuleError` naming the rule and the problem.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.actions import Action, MqttAction, SseAction, parse_action
from gateway.actions.base import CONDITION_FIELDS, check_field, field_value, is_numeric_field, only_keys
from gateway.errors import RuleError
from gateway.store.base import StoredMessage

Predicate = Callable[[StoredMessage], bool]

_ORDER_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_OPS = frozenset({"==", "!=", "in", "exists", *_ORDER_OPS})
_ALLOWED_TEXT: dict[str, frozenset[str]] = {
    "status": frozenset({"ok", "warning", "error", "maintenance"}),
    "source": frozenset({"mqtt", "api"}),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: a name, a condition (None: always), its actions, and whether it stops evaluation."""

    name: str
    when: Predicate | None
    actions: tuple[Action, ...]
    stop: bool = False
    description: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedAction:
    """An action to run for one message, and where it came from (``index`` in the rule's list)."""

    rule: str
    index: int
    action: Action

    @property
    def key(self) -> str:
        """Stable per (message, rule, action) apart from the message id; used for idempotency."""
        return f"{self.rule}:{self.index}"


class RuleSet:
    """An ordered list of rules. Immutable; hot reload swaps the whole set.

    ``fixed`` is the plan every message gets when no condition can change it (the default rules),
    so a batch needs no evaluation; None when some rule's ``when`` decides.
    """

    def __init__(self, rules: Sequence[Rule], *, source: Path | None = None) -> None:
        self.rules = tuple(rules)
        self.source = source
        # Each rule's planned actions, built once (not per message).
        self._plans = tuple(
            (rule, tuple(PlannedAction(rule.name, i, a) for i, a in enumerate(rule.actions))) for rule in self.rules
        )
        self.fixed = self._fixed()

    def _fixed(self) -> tuple[PlannedAction, ...] | None:
        """The plan of every message when no condition can change it (no rule up to the first
        stopping one has a ``when``, e.g. the default rules), else None."""
        planned: list[PlannedAction] = []
        for rule, actions in self._plans:
            if rule.when is not None:
                return None
            planned.extend(actions)
            if rule.stop:
                break
        return tuple(planned)

    def evaluate(self, message: StoredMessage) -> list[PlannedAction]:
        """The actions to run for ``message``, in rule order then action order."""
        planned: list[PlannedAction] = []
        for rule, actions in self._plans:
            if rule.when is None or rule.when(message):
                planned.extend(actions)
                if rule.stop:
                    break
        return planned

    def __len__(self) -> int:
        return len(self.rules)

    def describe(self) -> list[dict[str, Any]]:
        """A JSON-ready summary (names, action types) for logs and the admin API."""
        return [{"name": r.name, "actions": [a.type for a in r.actions], "stop": r.stop} for r in self.rules]


def default_rules() -> RuleSet:
    """Every message becomes a ``packet`` SSE event and an MQTT publish on ``MQTT_PUBLISH_TOPIC``."""
    return RuleSet([Rule("default", None, (SseAction(event="packet"), MqttAction()))])


def load_rules(path: Path | None) -> RuleSet:
    """Load and check the rules file at ``path``; None gives :func:`default_rules`.

    Raises RuleError naming the rule (or the file, for problems outside any rule) and the problem.
    """
    if path is None:
        return default_rules()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RuleError(str(path), f"cannot read the rules file: {exc.strerror or exc}") from exc
    return parse_rules(raw.decode("utf-8", "replace"), source=path)


def parse_rules(text: str, *, source: Path | None = None) -> RuleSet:
    """Parse rules from TOML text; raises RuleError as :func:`load_rules` does."""
    where = str(source) if source else "<rules>"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(where, f"invalid TOML: {exc}") from exc
    if unknown := set(doc) - {"rule"}:
        raise RuleError(where, f"unknown top-level key(s) {sorted(unknown)}; rules are [[rule]] tables")
    tables = doc.get("rule", [])
    if not isinstance(tables, list):
        raise RuleError(where, "'rule' must be an array of tables: write [[rule]]")
    rules: list[Rule] = []
    seen: set[str] = set()
    for n, table in enumerate(tables, start=1):
        name = table.get("name") if isinstance(table, dict) else None
        label = name if isinstance(name, str) and name else f"#{n}"
        try:
            rule = _parse_rule(table)
        except ValueError as exc:
            raise RuleError(label, str(exc)) from None
        if rule.name in seen:
            raise RuleError(rule.name, "duplicate rule name")
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(rules, source=source)


def _parse_rule(table: Any) -> Rule:
    if not isinstance(table, dict):
        raise ValueError("a rule must be a table")
    only_keys(table, {"name", "description", "when", "actions", "stop"})
    name = table.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise ValueError("name is required: a non-empty string of at most 100 characters")
    description = table.get("description")
    if description is not None and not isinstance(description, str):
        raise ValueError("description must be a string")
    when = _parse_predicate(table["when"], "when") if "when" in table else None
    raw_actions = table.get("actions")
    if not isinstance(raw_actions, list):
        raise ValueError('actions is required: a list of tables such as [{type = "sse"}]')
    actions = []
    for i, spec in enumerate(raw_actions):
        try:
            actions.append(parse_action(spec))
        except ValueError as exc:
            raise ValueError(f"actions[{i}]: {exc}") from None
    stop = table.get("stop", False)
    if not isinstance(stop, bool):
        raise ValueError("stop must be true or false")
    return Rule(name=name, when=when, actions=tuple(actions), stop=stop, description=description)


def _parse_predicate(spec: Any, where: str) -> Predicate:
    if isinstance(spec, list):
        return _all([_parse_predicate(s, f"{where}[{i}]") for i, s in enumerate(spec)], where)
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a condition must be a table or a list of tables")
    combinators = {"all", "any", "not"} & set(spec)
    if combinators:
        if len(spec) != 1:
            raise ValueError(f"{where}: {sorted(combinators)[0]!r} must be alone in its table")
        ((key, inner),) = spec.items()
        if key == "not":
            child = _parse_predicate(inner, f"{where}.not")
            return lambda m: not child(m)
        if not isinstance(inner, list) or not inner:
            raise ValueError(f"{where}.{key}: must be a non-empty list of conditions")
        children = [_parse_predicate(s, f"{where}.{key}[{i}]") for i, s in enumerate(inner)]
        return _all(children, where) if key == "all" else _any(children)
    return _parse_comparison(spec, where)


def _all(children: list[Predicate], where: str) -> Predicate:
    if not children:
        raise ValueError(f"{where}: an empty list of conditions")
    return lambda m: all(c(m) for c in children)


def _any(children: list[Predicate]) -> Predicate:
    return lambda m: any(c(m) for c in children)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _parse_comparison(spec: dict[str, Any], where: str) -> Predicate:
    only_keys(spec, {"field", "op", "value"})
    field = spec.get("field")
    if not isinstance(field, str):
        raise ValueError(f"{where}: 'field' is required (a field name or measurements.<name>)")
    if problem := check_field(field, CONDITION_FIELDS):
        raise ValueError(f"{where}: {problem}")
    op = spec.get("op", "==")
    if op not in _OPS:
        raise ValueError(f"{where}: unknown op {op!r} (known: {' '.join(sorted(_OPS))})")
    if op == "exists":
        if "value" in spec and not isinstance(spec["value"], bool):
            raise ValueError(f"{where}: exists takes value = true or false (or none)")
        want = spec.get("value", True)
        return lambda m: (field_value(m, field) is not None) == want
    if "value" not in spec:
        raise ValueError(f"{where}: 'value' is required for op {op!r}")
    value = spec["value"]
    numeric = is_numeric_field(field)
    values = value if op == "in" else [value]
    if op == "in" and (not isinstance(value, list) or not value):
        raise ValueError(f"{where}: op 'in' needs a non-empty list as value")
    for v in values:
        if numeric and not _is_number(v):
            raise ValueError(f"{where}: {field} is a number; {v!r} is not")
        if not numeric:
            if not isinstance(v, str):
                raise ValueError(f"{where}: {field} is text; {v!r} is not a string")
            if field in _ALLOWED_TEXT and v not in _ALLOWED_TEXT[field]:
                raise ValueError(f"{where}: {field} is never {v!r} (one of {sorted(_ALLOWED_TEXT[field])})")
    if op in _ORDER_OPS:
        if not numeric:
            raise ValueError(f"{where}: op {op!r} needs a numeric field; {field} is text")
        compare = _ORDER_OPS[op]
        bound = float(value)

        def ordered(m: StoredMessage) -> bool:
            v = field_value(m, field)
            return v is not None and compare(v, bound)

        return ordered
    if op == "in":
        options = frozenset(values)
        return lambda m: (v := field_value(m, field)) is not None and v in options
    if op == "==":
        return lambda m: (v := field_value(m, field)) is not None and v == value
    return lambda m: (v := field_value(m, field)) is not None and v != value
