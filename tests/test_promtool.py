"""Prometheus alerting rules: valid (``promtool check rules``), unit-tested (``promtool test rules``), and
written against metric names the gateway really exports.

promtool comes from Debian's ``prometheus`` package (/usr/bin/promtool). In CI (CI=true) a missing
promtool is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway import metrics

RULES_DIR = Path(__file__).resolve().parent.parent / "ops" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULES_TEST = RULES_DIR / "alerts_test.yml"
# Exported by prometheus-client's default process collector, or by Prometheus itself.
STANDARD = {"up", "process_start_time_seconds"}


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: .ci/run must run `bash ops/install-promtool.sh`")
        pytest.skip("promtool not installed: run `sudo bash ops/install-promtool.sh`")
    return exe


def test_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = sum(1 for line in RULES.read_text().splitlines() if line.lstrip().startswith("- alert:"))
    assert rules >= 12 and f"SUCCESS: {rules} rules found" in proc.stdout, proc.stdout  # every rule loads


def test_rule_unit_tests() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=RULES_DIR,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def _exported_names() -> set[str]:
    names: set[str] = set()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names


# A metric name: followed by a selector, a range, a closing parenthesis or a comparison.
_METRIC_RE = re.compile(r"\b(gateway_[a-z_]+|up|process_[a-z_]+)\b(?=\s*[{\[)]|\s*[<>=])")


def test_rules_use_only_exported_metrics() -> None:
    exported = _exported_names()
    assert "gateway_disk_free_ratio" in exported
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            used = set(_METRIC_RE.findall(rule["expr"]))
            assert used, rule["alert"]
            unknown = used - exported - STANDARD
            assert not unknown, f"{rule['alert']} uses {unknown}, not defined in gateway/metrics.py"


def test_every_builtin_alert_has_a_prometheus_rule() -> None:
    """gateway/alerts.py and alerts.yml raise the same conditions."""
    from gateway.alerts import AlertThresholds, _specs

    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {rule["alert"] for group in groups for rule in group["rules"]}
    for builtin, spec in _specs(AlertThresholds()).items():
        assert spec.prometheus in names, f"no Prometheus rule for built-in alert {builtin}"
