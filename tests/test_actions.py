"""Actions on their own (script runs, payload templates) and the MQTT action end to end through a
real broker (the shared mosquitto on 127.0.0.1:1883, unique topics)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio

from gateway.actions import ActionFailed, MqttAction, ScriptAction, parse_action
from gateway.actions.template import Context, Template
from gateway.health import ComponentHealth
from gateway.processor import Processor
from gateway.rules import parse_rules
from gateway.settings import MqttSettings, ProcessorSettings
from gateway.store import open_store
from gateway.wake import Nudge
from tests.support.pg import db_settings
from tests.test_processor import all_processed, insert, new_messages, wait_until
from tests.test_rules import msg

BROKER = ("127.0.0.1", 1883)


def _exe(tmp_path: Path, body: str) -> str:
    path = tmp_path / f"s{uuid.uuid4().hex[:6]}.py"
    path.write_text(f"#!{sys.executable}\nimport sys, json, time\n{body}")
    path.chmod(0o755)
    return str(path)


async def test_script_success_reads_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    exe = _exe(tmp_path, f"open({str(out)!r}, 'w').write(json.dumps([sys.argv[1:], json.load(sys.stdin)]))")
    action = ScriptAction.parse({"type": "script", "command": [exe, "a b", "$HOME;rm"]})
    await action.run(msg(7), rule="r", key="7:r:0", default_timeout=5)
    argv, stdin = json.loads(out.read_text())
    assert argv == ["a b", "$HOME;rm"]  # no shell: arguments arrive verbatim
    assert stdin == {"rule": "r", "key": "7:r:0", "message_id": 7, "data": msg(7).to_json()}


async def test_script_nonzero_exit_fails_with_last_stderr_line(tmp_path: Path) -> None:
    exe = _exe(tmp_path, "sys.stderr.write('warming up\\nno route to printer\\n'); sys.exit(2)")
    with pytest.raises(ActionFailed) as info:
        await ScriptAction.parse({"type": "script", "command": [exe]}).run(msg(), rule="r", key="k", default_timeout=5)
    assert info.value.action == "script"
    assert info.value.problem == "exit status 2: no route to printer"


async def test_script_timeout_kills_it(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    exe = _exe(tmp_path, f"time.sleep(3); open({str(marker)!r}, 'w')")
    action = ScriptAction.parse({"type": "script", "command": [exe], "timeout": 0.3})
    start = time.monotonic()
    with pytest.raises(ActionFailed, match=r"timed out after 0.3s"):
        await action.run(msg(), rule="r", key="k", default_timeout=60)
    assert time.monotonic() - start < 2.5
    await trio.sleep(3.2)
    assert not marker.exists(), "the process was not killed"
    # The default timeout applies when the action has none.
    with pytest.raises(ActionFailed, match=r"timed out after 0.2s"):
        await ScriptAction.parse({"type": "script", "command": [exe]}).run(
            msg(), rule="r", key="k", default_timeout=0.2
        )


async def test_script_missing_at_run_time(tmp_path: Path) -> None:
    exe = _exe(tmp_path, "pass")
    action = ScriptAction.parse({"type": "script", "command": [exe]})
    await trio.Path(exe).unlink()
    with pytest.raises(ActionFailed, match="cannot run"):
        await action.run(msg(), rule="r", key="k", default_timeout=5)


async def test_script_gets_a_minimal_environment_plus_the_rules_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "MQTT_PASSWORD": "broker-secret",
        "SECRETS_KEY": "fernet-key",
        "DATABASE_URL": "postgresql://u:db-secret@h/db",
        "API_KEYS": "a:admin:00",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
    }.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "env.json"
    exe = _exe(tmp_path, f"import os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))")
    action = ScriptAction.parse({"type": "script", "command": [exe], "env": {"PRINTER": "lab-2", "MODE": "a b=c"}})
    await action.run(msg(), rule="r", key="k", default_timeout=10)
    env = json.loads(out.read_text())
    assert env["PRINTER"] == "lab-2" and env["MODE"] == "a b=c"
    assert env["LANG"] == "C.UTF-8" and env["TZ"] == "UTC" and env["PATH"]
    allowed = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PRINTER", "MODE"}
    # The interpreter may add a few of its own (e.g. LC_CTYPE coercion); nothing from the gateway.
    assert set(env) - allowed <= {"LC_CTYPE"}, set(env) - allowed
    assert not any("secret" in v or "fernet" in v for v in env.values())


@pytest.mark.parametrize("env", [[], {"1X": "a"}, {"A-B": "a"}, {"A": 1}, {"A": "x\x00y"}, {"": "a"}], ids=str)
def test_script_env_table_is_checked(tmp_path: Path, env: object) -> None:
    with pytest.raises(ValueError, match="env"):
        ScriptAction.parse({"type": "script", "command": [_exe(tmp_path, "pass")], "env": env})


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for its reaper is dead too


async def test_script_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    exe = _exe(
        tmp_path,
        "import subprocess\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(30)\n",
    )
    action = ScriptAction.parse({"type": "script", "command": [exe], "timeout": 1.0})
    with pytest.raises(ActionFailed, match="timed out"):
        await action.run(msg(), rule="r", key="k", default_timeout=60)
    grandchild = int(pid_file.read_text())
    with trio.fail_after(5):
        while not _gone(grandchild):
            await trio.sleep(0.05)


async def test_script_that_exits_is_not_held_by_a_background_child(tmp_path: Path) -> None:
    """The script starts a child that keeps its stdout open and exits 0: that is a success,
    reported as soon as the script exited (plus a short grace), not a timeout."""
    pid_file = tmp_path / "bg.pid"
    exe = _exe(
        tmp_path,
        "import subprocess\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)'])\n"  # inherits the pipes
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('queued'); sys.exit(0)\n",
    )
    action = ScriptAction.parse({"type": "script", "command": [exe], "timeout": 5})
    t0 = time.monotonic()
    try:
        await action.run(msg(), rule="r", key="k", default_timeout=60)
        assert time.monotonic() - t0 < 3
    finally:
        import os
        import signal

        os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_script_output_is_bounded_while_it_is_read(tmp_path: Path) -> None:
    """40 MB on stdout and stderr: memory stays small (the output is cut while reading), the
    first bytes of stdout and the last line of stderr are kept."""
    import tracemalloc

    exe = _exe(
        tmp_path,
        "chunk = b'x' * 65536\n"
        "sys.stdout.buffer.write(b'HEAD'); sys.stdout.buffer.flush()\n"
        "for _ in range(320): sys.stdout.buffer.write(chunk); sys.stderr.buffer.write(chunk)\n"
        "sys.stderr.write('\\nthe real reason\\n'); sys.exit(3)\n",
    )
    action = ScriptAction.parse({"type": "script", "command": [exe], "timeout": 60})
    tracemalloc.start()
    try:
        with pytest.raises(ActionFailed) as info:
            await action.run(msg(), rule="r", key="k", default_timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.problem == "exit status 3: the real reason"
    assert peak < 4_000_000, f"peak {peak} bytes while reading 40 MB of output"


def test_template_values_and_errors() -> None:
    t = Template({"a": ["{seq}", {"b": "{battery}%"}], "c": "{{x}}", "d": "{ device_id }", "e": None is None})
    out = t.render(Context(msg(3), rule="r", event_id=9))
    assert out == {"a": [3, {"b": "87.0%"}], "c": "{x}", "d": "dev-1", "e": True}
    assert Template("{event_id}/{message_id}/{rule}").render(Context(msg(3), "r", None)) == "/3/r"
    with pytest.raises(ValueError, match="placeholder"):
        Template({"x": "{nope}"})
    with pytest.raises(ValueError, match="unknown key"):
        parse_action({"type": "mqtt", "topic": "x"})


def test_mqtt_payload_without_event_keeps_null_id() -> None:
    action = MqttAction.parse({"type": "mqtt", "payload": {"event_id": "custom"}})
    assert json.loads(action.render(msg(), rule="r", event_id=5)) == {"event_id": "custom"}
    action = MqttAction.parse({"type": "mqtt", "payload": "{device_id}"})
    assert json.loads(action.render(msg(), rule="r", event_id=5)) == "dev-1"


# ------------------------------------------------------------------ real broker


class Subscriber:
    """A plain paho subscriber in its own thread (test side only)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.messages: list[tuple[str, dict[str, Any], int]] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.append((message.topic, json.loads(message.payload), message.qos))

    def __enter__(self) -> Subscriber:
        self.client.connect(*BROKER)
        self.client.loop_start()
        self.client.subscribe(f"{self.topic}/#", qos=1)  # also matches the topic itself
        assert self._subscribed.wait(10), "no SUBACK"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    with Subscriber(f"test/{uuid.uuid4().hex}/events") as sub:
        yield sub


@asynccontextmanager
async def bridge(publish_topic: str) -> AsyncIterator[Any]:
    from gateway.mqtt import MqttBridge

    settings = MqttSettings.model_validate(
        {
            "MQTT_URL": f"mqtt://{BROKER[0]}:{BROKER[1]}",
            "MQTT_CLIENT_ID": f"test-gw-{uuid.uuid4().hex[:8]}",
            "MQTT_SUBSCRIBE_TOPIC": f"{publish_topic}/in/+",
            "MQTT_PUBLISH_TOPIC": publish_topic,
            "MQTT_SESSION_EXPIRY": 0,
        }
    )
    b = MqttBridge(settings, ComponentHealth("mqtt"))
    send, _recv = trio.open_memory_channel[Any](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, send)
        assert b.connected
        yield b
        nursery.cancel_scope.cancel()


async def test_mqtt_action_publishes_to_real_broker_with_event_id(tmp_path: Path, subscriber: Subscriber) -> None:
    rules = parse_rules(
        '[[rule]]\nname = "hot"\nwhen = {field = "measurements.temperature", op = ">", value = 30}\n'
        'actions = [{type = "sse", event = "alert", fields = ["device_id", "measurements.temperature"]},\n'
        '  {type = "mqtt", subtopic = "alerts", payload = {device = "{device_id}",'
        ' t = "{measurements.temperature}", text = "{device_id} at {measurements.temperature} C"}}]\n'
        '[[rule]]\nname = "all"\nactions = [{type = "mqtt"}]\n'
    )
    async with (
        open_store(db_settings(f"sqlite:///{tmp_path}/g.db")) as store,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(store.run)
        async with bridge(subscriber.topic) as b:
            from gateway.publish import OutboxPublisher

            outbox = OutboxPublisher(b.settings, store, b, ComponentHealth("outbox"))
            proc = Processor(
                ProcessorSettings.model_validate({"PROCESSOR_INTERVAL": 0.1}),
                store,
                Nudge(),
                ComponentHealth("processor"),
                instance_id="t",
                rules=rules,
                on_outbox=outbox.wake,
            )
            await nursery.start(outbox.run)
            await nursery.start(proc.run)
            ids = await insert(store, new_messages(1, measurements={"temperature": 35.5}))
            ids += await insert(store, new_messages(1, start=1, measurements={"temperature": 20.0}))
            await wait_until(lambda: all_processed(store, ids), seconds=20)
            with trio.fail_after(10):
                while len(subscriber.messages) < 3:
                    await trio.sleep(0.02)
        events = await store.read_events(after_id=0, limit=10)
        nursery.cancel_scope.cancel()
    assert [e.type for e in events] == ["alert"]
    alerts = [(t, p, q) for t, p, q in subscriber.messages if t.endswith("/alerts")]
    assert alerts == [
        (
            f"{subscriber.topic}/alerts",
            {"event_id": events[0].id, "device": "dev-1", "t": 35.5, "text": "dev-1 at 35.5 C"},
            1,
        )
    ]
    plain = sorted(
        (p["data"]["id"], p["event_id"], p["rule"]) for t, p, _ in subscriber.messages if t == subscriber.topic
    )
    # The hot message's plain publish carries the id of the event its message produced; the other has none.
    assert plain == [(ids[0], events[0].id, "all"), (ids[1], None, "all")]
