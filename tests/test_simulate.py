"""The sensor simulator: packet realism, exact invalid share, and real publishing to the shared broker."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from gateway.errors import PacketInvalid
from gateway.mqtt import Inbound
from gateway.packets import DEVICE_ID_PATTERN, parse_packet
from gateway.simulate import (
    INVALID_KINDS,
    Fleet,
    LinkOptions,
    SimOptions,
    add_arguments,
    main,
    open_link,
    percentile,
    simulate,
)

BROKER = "mqtt://127.0.0.1:1883"
REPO = Path(__file__).resolve().parents[1]


def test_fleet_invalid_share_is_exact_and_every_packet_classifies() -> None:
    fleet = Fleet(7, invalid_ratio=0.25, seed=3)
    packets = [fleet.next_packet() for _ in range(4000)]
    invalid = [p for p in packets if not p.valid]
    assert len(invalid) == 1000
    assert {p.kind for p in invalid} == set(INVALID_KINDS)
    for p in packets:
        if p.valid:
            packet = parse_packet(p.payload)
            assert packet.device_id == p.device_id and packet.seq == p.seq
        else:
            with pytest.raises(PacketInvalid):
                parse_packet(p.payload)


def test_fleet_devices_count_seq_and_drift_realistically() -> None:
    fleet = Fleet(3, seed=1)
    seqs: dict[str, list[int]] = {}
    readings = []
    for _ in range(30000):
        p = fleet.next_packet()
        packet = parse_packet(p.payload)
        assert re.fullmatch(DEVICE_ID_PATTERN, packet.device_id)
        seqs.setdefault(packet.device_id, []).append(packet.seq or 0)
        readings.append(packet)
    assert sorted(seqs) == ["esp32-sim-0001", "esp32-sim-0002", "esp32-sim-0003"]
    assert all(s == list(range(1, 10001)) for s in seqs.values())
    temps = [r.measurements["temperature"] for r in readings]
    assert min(temps) > 10 and max(temps) < 32
    assert all(0 <= r.measurements["humidity"] <= 100 for r in readings)
    assert all(950 < r.measurements["pressure"] < 1070 for r in readings)
    # A random walk, not noise: consecutive readings of one device stay close.
    first = [r.measurements["temperature"] for r in readings if r.device_id == "esp32-sim-0001"]
    assert max(abs(a - b) for a, b in itertools.pairwise(first)) < 0.5
    battery = [r.battery for r in readings if r.device_id == "esp32-sim-0002"]
    assert battery[-1] is not None and battery[0] is not None
    assert battery[-1] < battery[0] or max(battery) == 100.0  # drains (or was replaced once)
    statuses = {r.status for r in readings}
    assert "ok" in statuses and sum(r.status == "ok" for r in readings) > 0.9 * len(readings)


def test_fleet_split_across_workers_gives_disjoint_devices() -> None:
    a = Fleet(2, first_index=1, stride=2)
    b = Fleet(2, first_index=2, stride=2)
    assert [d.device_id for d in a.devices] == ["esp32-sim-0001", "esp32-sim-0003"]
    assert [d.device_id for d in b.devices] == ["esp32-sim-0002", "esp32-sim-0004"]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0


async def test_simulate_publishes_every_packet_to_a_real_subscriber() -> None:
    prefix = f"test-sim-{uuid.uuid4().hex[:8]}"
    received: list[Inbound] = []
    all_in = trio.Event()

    def on_message(msg: Inbound) -> None:
        received.append(msg)
        if len(received) >= 400:
            all_in.set()

    async with open_link(LinkOptions(url=BROKER, subscribe=f"{prefix}/+/data"), on_message=on_message):
        opts = SimOptions(
            devices=4,
            rate=400,
            duration=1.0,
            invalid_ratio=0.2,
            seed=7,
            topic_template=prefix + "/{device_id}/data",
            link=LinkOptions(url=BROKER),
        )
        summary = await simulate(opts)
        with trio.fail_after(10):
            await all_in.wait()
        await trio.sleep(0.2)  # nothing more than was sent arrives
    assert summary.sent == 400 and summary.acked == 400 and summary.unacked == 0
    assert summary.invalid == 80 and summary.valid == 320
    assert 0.9 < summary.elapsed < 2.0  # paced to the rate, not a burst
    assert summary.puback_p50_ms is not None and summary.puback_p99_ms is not None
    assert len(received) == 400
    valid = 0
    for msg in received:
        device = msg.topic.split("/")[1]
        try:
            packet = parse_packet(msg.payload)
        except PacketInvalid:
            continue
        assert packet.device_id == device
        valid += 1
    assert valid == 320


async def test_simulate_mqtt_311_and_qos0() -> None:
    prefix = f"test-sim-{uuid.uuid4().hex[:8]}"
    opts = SimOptions(
        devices=2,
        rate=200,
        duration=0.25,
        qos=0,
        topic_template=prefix + "/{device_id}/data",
        link=LinkOptions(url=BROKER, protocol="3.1.1"),
    )
    summary = await simulate(opts)
    assert summary.sent == 50 and summary.acked == 0 and summary.unacked == 0


def test_cli_multiprocess_json_and_record(tmp_path: Path) -> None:
    prefix = f"test-sim-{uuid.uuid4().hex[:8]}"
    record = tmp_path / "rec.txt"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.simulate",
            "--processes",
            "2",
            "--devices",
            "4",
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--invalid-ratio",
            "0.1",
            "--url",
            BROKER,
            "--json",
            "--record",
            str(record),
            "--topic-template",
            prefix + "/{device_id}/data",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    summary = json.loads(out.stdout)
    assert summary["processes"] == 2
    assert summary["sent"] == 100 and summary["acked"] == 100
    assert summary["invalid"] == 10
    lines = record.read_text().splitlines()
    assert len(lines) == summary["valid"] == 90
    devices = {line.split()[0] for line in lines}
    assert devices == {f"esp32-sim-000{i}" for i in range(1, 5)}


def test_main_reports_unreachable_broker(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--url", "mqtt://127.0.0.1:1", "--duration", "0.1"])
    assert main(args) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_arguments_are_validated() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--invalid-ratio", "1.5"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "0"])


def test_gateway_cli_runs_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main as gateway_main

    prefix = f"test-sim-{uuid.uuid4().hex[:8]}"
    code = gateway_main(
        [
            "simulate",
            "--devices",
            "2",
            "--rate",
            "40",
            "--duration",
            "0.5",
            "--url",
            BROKER,
            "--topic-template",
            prefix + "/{device_id}/data",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sent"] == 20 and summary["acked"] == 20
    assert 35 <= summary["achieved_rate"] <= 41


def test_devices_start_at_a_random_seq_unless_told(tmp_path: Path) -> None:
    rebooted = Fleet(50, seed=4, seq_start=None)
    firsts = {rebooted.next_packet().seq for _ in range(50)}
    assert len(firsts) > 40  # each device resumes at its own point, as after a reboot
    again = Fleet(50, seed=4, seq_start=None)
    assert {again.next_packet().seq for _ in range(50)} == firsts  # repeatable with a seed
    fixed = Fleet(3, seq_start=99)
    assert [fixed.next_packet().seq for _ in range(3)] == [100, 100, 100]


def test_cli_progress_lines_seq_start_and_broker_from_dot_env(tmp_path: Path) -> None:
    prefix = f"test-sim-{uuid.uuid4().hex[:8]}"
    record = tmp_path / "rec.txt"
    # The broker comes from ./.env, as `gateway serve` would read it (no --url).
    (tmp_path / ".env").write_text(f"MQTT_URL={BROKER}\nMQTT_PROTOCOL=3.1.1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.simulate",
            "--devices",
            "2",
            "--rate",
            "20",
            "--duration",
            "2.6",
            "--progress",
            "1",
            "--seq-start",
            "41",
            "--record",
            str(record),
            "--topic-template",
            prefix + "/{device_id}/data",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    progress = [line for line in out.stderr.splitlines() if line.startswith("simulate:")]
    assert len(progress) >= 2, out.stderr
    assert re.search(r"sent \d+  acked \d+  refused 0  \d+ msg/s", progress[-1])
    seqs = sorted(int(line.split()[1]) for line in record.read_text().splitlines())
    assert seqs[:2] == [42, 42]
    # A .env that points nowhere is used too (the error names its broker).
    (tmp_path / ".env").write_text("MQTT_URL=mqtt://127.0.0.1:1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "gateway.simulate", "--duration", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert bad.returncode == 1 and "127.0.0.1:1" in bad.stderr


def test_help_explains_the_topic_template() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    assert "{device_id}" in text and "sensors/{device_id}/data" in text


def test_malformed_packets_rotate_over_the_fleet() -> None:
    fleet = Fleet(20, invalid_ratio=0.05, seed=2)
    packets = [fleet.next_packet() for _ in range(2000)]
    good = {p.device_id for p in packets if p.valid}
    bad = {p.device_id for p in packets if not p.valid}
    assert len(good) == 20  # every device also sends good readings
    assert len(bad) == 20  # and the bad ones do not all come from one device
