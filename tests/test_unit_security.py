"""The systemd unit: its sandbox scores an exposure of 2.0 or lower, and it says what the gateway needs.

``systemd-analyze`` comes from Debian's ``systemd`` package (Fedora: ``systemd``). In CI (CI=true) a
missing ``systemd-analyze`` is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "gateway.service"
MAX_EXPOSURE = 2.0


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI: `apt-get install -y systemd`")
        pytest.skip("systemd-analyze not installed (apt-get install -y systemd)")
    return exe


def _directives() -> dict[str, list[str]]:
    """Active (uncommented) directives, each with every value it is given."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_exposure_at_most_2(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    proc = subprocess.run(
        [exe, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    # A misspelt directive is ignored by systemd (and would silently drop protection).
    assert "Unknown key" not in proc.stderr, proc.stderr
    assert "Invalid" not in proc.stderr, proc.stderr
    match = re.search(r"Overall exposure level for gateway\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, proc.stdout


def test_unit_runs_the_gateway_as_a_notify_service_with_a_watchdog() -> None:
    d = _directives()
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["/opt/gateway/venv/bin/gateway serve --env-file /etc/gateway/gateway.env"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["WatchdogSec"] == ["30"]
    assert d["Restart"] == ["on-failure"]
    assert "StartLimitBurst" in d and "StartLimitIntervalSec" in d
    assert "TimeoutStopSec" in d
    # Invalid configuration (2) and a refusal at start-up (3): a restart cannot help.
    assert d["RestartPreventExitStatus"] == ["2 3"]


def test_unit_keeps_state_and_logs_in_their_directories() -> None:
    d = _directives()
    assert d["StateDirectory"] == ["gateway"]
    assert d["LogsDirectory"] == ["gateway"]
    assert d["WorkingDirectory"] == ["/var/lib/gateway"]
    env = d["Environment"]
    assert "DATABASE_URL=sqlite:////var/lib/gateway/gateway.db" in env
    assert "LOG_FILE=/var/log/gateway/server.log" in env
    assert d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in d["SystemCallFilter"]


def test_unit_documents_encrypted_credentials() -> None:
    text = UNIT.read_text()
    assert re.search(r"^#LoadCredentialEncrypted=mqtt_password:", text, re.M)
    assert re.search(r"^#Environment=MQTT_PASSWORD_FILE=%d/mqtt_password$", text, re.M)


def test_unit_bounds_memory_and_tasks() -> None:
    d = _directives()
    assert d["MemoryMax"] == ["1G"] and d["MemoryHigh"] == ["768M"]
    assert d["TasksMax"] == ["256"]
