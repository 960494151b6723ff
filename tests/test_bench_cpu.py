"""The pipeline benchmark's measuring pieces: the /proc CPU reader, line counting, result tables.

Cheap on purpose: no broker, no gateway (the scenarios themselves are run by ``just bench``).
"""

from __future__ import annotations

import os
import sys
import time
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench import cpu, stages
from bench.scenarios.pipeline import pipeline_table, write_burst
from gateway.packets import parse_packet
from gateway.store.base import StoredMessage

# A real /proc/<pid>/stat line with a command name holding a space and a ")".
STAT = (
    "4242 (gate way) x) S 4000 4242 4000 0 -1 4194560 9061 0 0 0 "
    "1234 567 0 0 20 0 3 0 123456 987654321 12345 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0"
)


def test_parse_stat_takes_ppid_utime_stime_after_the_last_paren() -> None:
    assert cpu.parse_stat(STAT) == (4000, 1234, 567)


def fake_proc(tmp_path: Path, procs: dict[int, tuple[int, int, int]]) -> Path:
    """A /proc with ``pid: (ppid, utime, stime)`` entries (and a non-process entry to skip)."""
    for pid, (ppid, utime, stime) in procs.items():
        (tmp_path / str(pid)).mkdir()
        line = (
            STAT.replace("4242 (", f"{pid} (")
            .replace(" S 4000 ", f" S {ppid} ")
            .replace("1234 567", f"{utime} {stime}")
        )
        (tmp_path / str(pid) / "stat").write_text(line)
    (tmp_path / "self").mkdir()
    return tmp_path


def test_cpu_seconds_and_tree(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {10: (1, 100, 50), 11: (10, 20, 5), 12: (11, 1, 1), 13: (1, 7, 7)})
    assert cpu.cpu_seconds(10, proc) == pytest.approx(150 * cpu.TICK)
    assert cpu.cpu_seconds(99, proc) is None  # gone
    assert sorted(cpu.descendants(10, proc)) == [10, 11, 12]
    assert cpu.tree_seconds(10, proc) == pytest.approx(177 * cpu.TICK)
    assert cpu.sys_seconds(10, proc) == pytest.approx(50 * cpu.TICK)
    assert cpu.sys_seconds(99, proc) == 0.0


def test_cpu_seconds_of_this_process_grows_with_work() -> None:
    before = cpu.cpu_seconds(os.getpid())
    assert before is not None
    # 50 ms of CPU, not of wall time: on a loaded host 50 ms of wall time may get less than a tick.
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    after = cpu.cpu_seconds(os.getpid())
    assert after is not None and after > before


def test_snapshot_since() -> None:
    before = cpu.Snapshot({"gateway": 1.0, "broker": 0.5})
    after = cpu.Snapshot({"gateway": 3.5, "broker": 0.75})
    assert after.since(before) == {"gateway": 2.5, "broker": 0.25}


def test_line_counter_across_chunk_boundaries() -> None:
    stream = b'retry: 1000\n\nid: 1\nevent: packet\ndata: {}\n\nid: 2\nevent: packet\ndata: {"id": 3}\n\n'
    for step in (1, 2, 3, 7, len(stream)):
        counter = cpu.LineCounter(b"id:")
        for i in range(0, len(stream), step):
            counter.feed(stream[i : i + step])
        assert counter.count == 2, step
    partial = cpu.LineCounter(b"{")
    assert partial.feed(b'{"a": 1}\n{"b"') == 1  # the second line counts once its newline arrives
    assert partial.feed(b": 2}\nprobe\n") == 2


def test_per_item_and_ratio() -> None:
    assert cpu.per_item_us(0.5, 1000) == pytest.approx(500.0)
    assert cpu.per_item_us(1.0, 0) is None
    assert cpu.ratio(700.0, 28.0) == pytest.approx(25.0)
    assert cpu.ratio(None, 1.0) is None and cpu.ratio(1.0, 0.0) is None


def test_burst_is_valid_packets_from_many_devices(tmp_path: Path) -> None:
    path = tmp_path / "burst.txt"
    write_burst(path, 300, "t-")
    packets = [parse_packet(line) for line in path.read_bytes().splitlines()]
    assert len(packets) == 300
    assert len({p.device_id for p in packets}) == 100


def run_row(**over: Any) -> dict[str, Any]:
    row = {
        "backend": "postgres",
        "instances": 1,
        "burst": 1000,
        "sse_received": 1000,
        "mqtt_received": 1000,
        "wall_s": 2.0,
        "rate": 500.0,
        "gateway_cpu_us": 700.0,
        "instance_cpu_us": [700.0],
        "gateway_cores": 0.35,
        "broker_cpu_us": 50.0,
        "database_cpu_us": 150.0,
        "load_cpu_us": 20.0,
    }
    return row | over


def test_pipeline_table_ratio_to_the_mean_bare_client() -> None:
    bare = [
        {
            "tag": "before",
            "received": 1000,
            "wall_s": 0.1,
            "rate": 1e4,
            "cpu_us": 20.0,
            "broker_cpu_us": 9.0,
            "publisher_cpu_s": 0.01,
        },
        {
            "tag": "after",
            "received": 1000,
            "wall_s": 0.1,
            "rate": 1e4,
            "cpu_us": 30.0,
            "broker_cpu_us": 9.0,
            "publisher_cpu_s": 0.01,
        },
    ]
    two = run_row(instances=2, gateway_cpu_us=500.0, instance_cpu_us=[300.0, 200.0])
    text = pipeline_table([run_row(), two], bare, 1000)
    lines = text.splitlines()
    first = next(line for line in lines if line.startswith("postgres, 1 instance"))
    assert "700" in first and "28.0" in first  # 700 / mean(20, 30)
    second = next(line for line in lines if line.startswith("postgres, 2 instances"))
    assert "500 (300 + 200)" in second and "20.0" in second


def test_stage_sums_leave_out_parts_and_other_backends() -> None:
    rows = [
        stages.Stage("frame_decode", "decode", cpu_us=30.0),
        stages.Stage("validation", "of which validation", cpu_us=6.0, counted=False),
        stages.Stage("store_write_sqlite", "write (sqlite)", cpu_us=10.0),
        stages.Stage("store_write_postgres", "write (postgres)", cpu_us=12.0),
        stages.Stage("puback", "puback", error="AttributeError: gone"),
    ]
    data = stages.summarize(rows, ["sqlite", "postgres"])
    assert data["total_cpu_us"] == {"sqlite": 40.0, "postgres": 42.0}
    text = stages.stage_table(data)
    assert "not measured: AttributeError: gone" in text
    assert "sum of stages (postgres)" in text


def test_publish_frames_decode_in_paho() -> None:
    bodies = stages.payloads("pf-", 20)
    client, got = stages.bare_paho(stages.publish_frames(bodies))
    while len(got) < len(bodies):
        assert client.loop_read() == 0
    assert [m.payload for m in got] == bodies
    assert [m.mid for m in got] == list(range(1, 21))
    assert stages.puback_frames([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


def test_host_stat_busy_and_total() -> None:
    text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n"
    busy, total = cpu.parse_host_stat(text)
    assert busy == pytest.approx(150 * cpu.TICK)
    assert total == pytest.approx(1000 * cpu.TICK)
    assert cpu.host_seconds()[1] > 0


def test_stage_frame_decoder_lookup_prefers_a_landed_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    class FrameDecoder:
        def __init__(self, *, v5: bool) -> None:
            self.items: list[int] = []

        def feed(self, data: bytes) -> None:
            self.items = list(range(data.count(b"\x32")))

        def next(self) -> int | None:
            return self.items.pop() if self.items else None

    fake = types.ModuleType("gateway.mqtt_codec")
    fake.FrameDecoder = FrameDecoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gateway.mqtt_codec", fake)
    found = stages._find_codec()
    assert found is not None
    name, decode = found
    assert "FrameDecoder" in name
    assert len(decode(b"\x32\x00\x32\x00")) == 2


async def test_stage_plan_gives_one_event_per_message_with_the_default_rules() -> None:
    now = datetime.now(UTC)
    messages = [StoredMessage(i, "dev", now, now, i, {"temperature": 21.5}, "ok", 80.0, "mqtt") for i in range(1, 4)]
    path, work, events, publishes = await stages.plan(stages._processor(None), messages)
    assert path.startswith("Processor.")
    assert len(work) == len(events) == 3 and publishes is not None
