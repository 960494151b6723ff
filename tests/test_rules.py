"""Rules: loading, checking (errors name the rule and problem), and evaluation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.actions import MqttAction, ScriptAction, SseAction
from gateway.errors import RuleError
from gateway.rules import load_rules, parse_rules
from gateway.store.base import StoredMessage

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rules.toml"


def msg(mid: int = 1, **kw: Any) -> StoredMessage:
    """A stored message with sensible defaults (shared by the processor/action tests)."""
    now = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    base: dict[str, Any] = dict(
        id=mid,
        device_id="dev-1",
        device_ts=now,
        received_at=now,
        seq=mid,
        measurements={"temperature": 21.5, "humidity": 40.0},
        status="ok",
        battery=87.0,
        source="mqtt",
    )
    base.update(kw)
    return StoredMessage(**base)


def rules(body: str) -> Any:
    return parse_rules(body)


def names(rs: Any, m: StoredMessage) -> list[str]:
    return [p.rule for p in rs.evaluate(m) if p.index == 0]


def test_default_rules_packet_and_mqtt() -> None:
    rs = load_rules(None)
    planned = rs.evaluate(msg())
    assert [type(p.action) for p in planned] == [SseAction, MqttAction]
    ev = planned[0].action.build(msg())  # type: ignore[union-attr]
    assert ev.type == "packet" and ev.data == msg().to_json() and ev.message_id == 1 and ev.device_id == "dev-1"


@pytest.mark.parametrize(
    ("cond", "match", "nomatch"),
    [
        (
            '{field = "measurements.temperature", op = ">", value = 30}',
            {"measurements": {"temperature": 31}},
            {"measurements": {"temperature": 30}},
        ),
        (
            '{field = "measurements.temperature", op = ">=", value = 30}',
            {"measurements": {"temperature": 30}},
            {"measurements": {"humidity": 99}},
        ),
        ('{field = "battery", op = "<", value = 20}', {"battery": 19.5}, {"battery": None}),
        ('{field = "battery", op = "<=", value = 20}', {"battery": 20}, {"battery": 21}),
        ('{field = "status", op = "in", value = ["error", "warning"]}', {"status": "error"}, {"status": "ok"}),
        ('{field = "status", op = "!=", value = "ok"}', {"status": "maintenance"}, {"status": "ok"}),
        ('{field = "device_id", op = "==", value = "a"}', {"device_id": "a"}, {"device_id": "b"}),
        ('{field = "seq", op = "exists"}', {"seq": 0}, {"seq": None}),
        ('{field = "seq", op = "exists", value = false}', {"seq": None}, {"seq": 1}),
        ('{field = "source", value = "api"}', {"source": "api"}, {"source": "mqtt"}),
        ('{field = "measurements.co2", op = "!=", value = 1}', {"measurements": {"co2": 2}}, {"measurements": {}}),
        (
            '{any = [{field = "battery", op = "<", value = 10}, {field = "status", value = "error"}]}',
            {"status": "error"},
            {"battery": 50},
        ),
        (
            '{all = [{field = "battery", op = "<", value = 10}, {any = [{field = "status", value = "error"},'
            ' {field = "seq", op = ">", value = 5}]}]}',
            {"battery": 5, "seq": 9},
            {"battery": 5, "seq": 1},
        ),
        ('{not = {field = "status", value = "ok"}}', {"status": "error"}, {"status": "ok"}),
        (
            '[{field = "battery", op = ">", value = 10}, {field = "battery", op = "<", value = 20}]',
            {"battery": 15},
            {"battery": 25},
        ),
    ],
)
def test_conditions(cond: str, match: dict[str, Any], nomatch: dict[str, Any]) -> None:
    rs = rules(f'[[rule]]\nname = "r"\nwhen = {cond}\nactions = [{{type = "sse", event = "alert"}}]\n')
    assert names(rs, msg(**match)) == ["r"]
    assert names(rs, msg(**nomatch)) == []


def test_order_all_matching_rules_and_stop() -> None:
    body = """
[[rule]]
name = "a"
actions = [{type = "sse", event = "a"}]
[[rule]]
name = "b"
when = {field = "status", value = "error"}
actions = [{type = "sse", event = "b"}]
stop = true
[[rule]]
name = "c"
actions = [{type = "sse", event = "c"}, {type = "mqtt"}]
"""
    rs = rules(body)
    assert [(p.rule, p.index) for p in rs.evaluate(msg())] == [("a", 0), ("c", 0), ("c", 1)]
    assert [p.rule for p in rs.evaluate(msg(status="error"))] == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "rule", "problem"),
    [
        ('[[rule]]\nname = "x"\nactions = [{type = "sms"}]', "x", "type must be one of"),
        ('[[rule]]\nname = "x"\nactions = [{type = "sse", evnt = "a"}]', "x", "unknown key(s) ['evnt']"),
        ('[[rule]]\nname = "x"\nactions = [{type = "sse", event = "reset"}]', "x", "reserved"),
        (
            '[[rule]]\nname = "x"\nwhen = {field = "temp", op = ">", value = 1}\nactions = []',
            "x",
            "unknown field 'temp'",
        ),
        ('[[rule]]\nname = "x"\nwhen = {field = "battery", op = "~", value = 1}\nactions = []', "x", "unknown op"),
        (
            '[[rule]]\nname = "x"\nwhen = {field = "battery", op = ">", value = "high"}\nactions = []',
            "x",
            "is a number",
        ),
        (
            '[[rule]]\nname = "x"\nwhen = {field = "status", op = ">", value = "ok"}\nactions = []',
            "x",
            "needs a numeric field",
        ),
        ('[[rule]]\nname = "x"\nwhen = {field = "status", value = "broken"}\nactions = []', "x", "is never"),
        (
            '[[rule]]\nname = "x"\nwhen = {field = "status", op = "in", value = "ok"}\nactions = []',
            "x",
            "non-empty list",
        ),
        ('[[rule]]\nname = "x"\nwhen = {all = []}\nactions = []', "x", "non-empty list"),
        ('[[rule]]\nname = "x"\nwhen = {field = "battery", op = "<"}\nactions = []', "x", "'value' is required"),
        ('[[rule]]\nname = "x"\nactions = [{type = "mqtt", subtopic = "a/#"}]', "x", "without wildcards"),
        (
            '[[rule]]\nname = "x"\nactions = [{type = "mqtt", payload = {t = "{measurement.t}"}}]',
            "x",
            "placeholder {measurement.t}",
        ),
        (
            '[[rule]]\nname = "x"\nactions = [{type = "script", command = ["/nonexistent/exe"]}]',
            "x",
            "not an executable",
        ),
        ('[[rule]]\nname = "x"\nactions = [{type = "script", command = "/bin/true"}]', "x", "list of strings"),
        ('[[rule]]\nname = "x"\nactions = [{type = "script", command = ["/bin/true"], timeout = 0}]', "x", "timeout"),
        (
            '[[rule]]\nname = "x"\nactions = [{type = "sse", fields = ["id"], rename = {seq = "s"}}]',
            "x",
            "not selected",
        ),
        ('[[rule]]\nname = "x"\nactions = [{type = "sse"}]\nstop = "yes"', "x", "stop must be"),
        ('[[rule]]\nname = "x"\nactions = [{type = "sse"}]\n[[rule]]\nname = "x"\nactions = []', "x", "duplicate"),
        ("[[rule]]\nactions = []", "#1", "name is required"),
        ('[[rule]]\nname = "x"\nwhen = {field = "battery", op = ">", value = 1}', "x", "actions is required"),
        ('[[rule]]\nname = "x"\nactions = []\nwhenn = {}', "x", "unknown key(s) ['whenn']"),
        ("[[rules]]\nname = 'x'", "<rules>", "unknown top-level key"),
        ("[[rule]\nname = 'x'", "<rules>", "invalid TOML"),
    ],
)
def test_invalid_rules_name_rule_and_problem(body: str, rule: str, problem: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rules(body)
    assert info.value.rule == rule
    assert problem in info.value.problem
    assert rule in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "nope.toml")


def test_sse_fields_and_rename() -> None:
    rs = rules(
        '[[rule]]\nname = "r"\nactions = [{type = "sse", event = "alert", '
        'fields = ["device_id", "measurements.temperature", "measurements.co2"], '
        'rename = {"measurements.temperature" = "temp"}}]'
    )
    ev = rs.evaluate(msg())[0].action.build(msg())
    assert ev.type == "alert"
    assert ev.data == {"device_id": "dev-1", "temp": 21.5, "measurements.co2": None}
    rs = rules('[[rule]]\nname = "r"\nactions = [{type = "sse", rename = {device_id = "sensor"}}]')
    data = rs.evaluate(msg())[0].action.build(msg()).data
    assert data["sensor"] == "dev-1" and "device_id" not in data and data["id"] == 1


def test_mqtt_template_payload() -> None:
    rs = rules(
        '[[rule]]\nname = "hot"\nactions = [{type = "mqtt", subtopic = "alerts/hot", payload = '
        '{device = "{device_id}", t = "{measurements.temperature}", text = "{device_id} at {measurements.temperature} C'
        ' {{literal}} {measurements.co2}", rule = "{rule}", n = 3, list = ["{seq}", true]}}]'
    )
    action = rs.evaluate(msg())[0].action
    assert isinstance(action, MqttAction) and action.subtopic == "alerts/hot"
    out = json.loads(action.render(msg(), rule="hot", event_id=None))
    assert out == {
        "event_id": None,
        "device": "dev-1",
        "t": 21.5,
        "text": "dev-1 at 21.5 C {literal} ",
        "rule": "hot",
        "n": 3,
        "list": [1, True],
    }
    default = json.loads(MqttAction().render(msg(), rule="default", event_id=7))
    assert default == {"event_id": 7, "type": "packet", "rule": "default", "data": msg().to_json()}


def test_script_action_parses_path_lookup() -> None:
    rs = rules('[[rule]]\nname = "s"\nactions = [{type = "script", command = ["true"], timeout = 2.5}]')
    action = rs.evaluate(msg())[0].action
    assert isinstance(action, ScriptAction) and action.timeout == 2.5 and action.command == ("true",)


def test_example_rules_file_loads() -> None:
    rs = load_rules(EXAMPLE)
    assert len(rs) >= 3
    hot = msg(measurements={"temperature": 35.0})
    assert "high-temperature" in [p.rule for p in rs.evaluate(hot)]


def test_fixed_plan_only_when_no_condition_decides() -> None:
    rs = load_rules(None)
    assert rs.fixed is not None and list(rs.fixed) == rs.evaluate(msg())
    assert (
        rules(
            '[[rule]]\nname = "a"\nactions = [{type = "sse"}]\n[[rule]]\nname = "b"\n'
            'when = {field = "status", value = "ok"}\nactions = [{type = "sse"}]'
        ).fixed
        is None
    )
    # A condition after a stopping rule never decides.
    rs = rules(
        '[[rule]]\nname = "a"\nstop = true\nactions = [{type = "sse"}]\n[[rule]]\nname = "b"\n'
        'when = {field = "status", value = "ok"}\nactions = [{type = "sse"}]'
    )
    assert rs.fixed is not None and [p.rule for p in rs.fixed] == ["a"] == names(rs, msg())


def test_default_payload_embeds_the_one_encoding() -> None:
    from gateway.jsonenc import dumps

    m = msg()
    as_json = m.to_json()
    for event_id in (7, None):
        for rule in ("default", 'quo"te é'):
            fast = MqttAction().render(m, rule=rule, event_id=event_id, as_json=as_json, as_bytes=dumps(as_json))
            assert fast == MqttAction().render(m, rule=rule, event_id=event_id)
            assert json.loads(fast) == {"event_id": event_id, "type": "packet", "rule": rule, "data": as_json}
    ev = SseAction().build(m, as_json, dumps(as_json))
    assert ev.data is as_json and ev.json == dumps(as_json)
    renamed = SseAction(rename={"device_id": "dev"}).build(m, as_json, dumps(as_json))
    assert renamed.json is not None and json.loads(renamed.json) == renamed.data and "dev" in renamed.data
