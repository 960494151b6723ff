"""ops/audit.py (`just audit`): how answers and failures of the vulnerability service become exit codes.

The service itself is replaced here (tests reach no network); `just audit` runs it for real in CI.
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ops_audit", ROOT / "ops" / "audit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ops_audit"] = module
    spec.loader.exec_module(module)
    return module


audit = _load()
PINS = {"trio": "0.35.0", "jinja2": "3.1.6", "quart": "0.22.0"}


def clean_pip_audit(**vulns: list[dict[str, Any]]) -> dict[str, Any]:
    return {"dependencies": [{"name": n, "version": v, "vulns": vulns.get(n, [])} for n, v in PINS.items()]}


def project(version: str, *vulns: dict[str, Any]) -> dict[str, Any]:
    return {"info": {"version": version}, "vulnerabilities": list(vulns)}


def no_network(name: str) -> Mapping[str, Any]:
    raise urllib.error.URLError("Name or service not known")


def test_all_audited_and_clean_is_0() -> None:
    report = audit.classify(PINS, clean_pip_audit(), no_network, {})
    assert report.exit_code == audit.CLEAN and report.audited == 3 and not report.unaudited


def test_a_known_vulnerability_is_1_unless_ignored_by_id_or_alias() -> None:
    vuln = {"id": "PYSEC-2099-1", "aliases": ["CVE-2099-0001"], "fix_versions": ["3.1.7"]}
    report = audit.classify(PINS, clean_pip_audit(jinja2=[vuln]), no_network, {})
    assert report.exit_code == audit.VULNERABLE and list(report.vulnerable) == ["jinja2"]
    assert "VULNERABLE jinja2: PYSEC-2099-1 (fixed in: 3.1.7)" in audit.render(report, 3)
    assert audit.classify(PINS, clean_pip_audit(jinja2=[vuln]), no_network, {"CVE-2099-0001": "n/a"}).exit_code == 0


def test_skipped_packages_fall_back_to_the_latest_release_answer() -> None:
    result = {
        "dependencies": [
            {"name": "trio", "skip_reason": "Dependency not found on PyPI"},
            {"name": "Jinja2", "skip_reason": "Dependency not found on PyPI"},
            {"name": "quart", "skip_reason": "Dependency not found on PyPI"},
        ]
    }
    answers = {
        "trio": project("0.35.0"),
        "jinja2": project("3.1.6", {"id": "GHSA-x", "fixed_in": ["3.1.7"], "withdrawn": None}),
        "quart": project("0.23.1"),  # the pin is older than the only version the service answers for
    }
    report = audit.classify(PINS, result, lambda n: answers[n], {})
    assert report.by_fallback == 2 and report.audited == 2
    assert list(report.vulnerable) == ["jinja2"] and list(report.unaudited) == ["quart"]
    assert report.exit_code == audit.VULNERABLE
    # Without the vulnerable one, a partial answer is INCOMPLETE (3), never "clean".
    answers["jinja2"] = project("3.1.6", {"id": "GHSA-x", "fixed_in": ["3.1.7"], "withdrawn": "2026-01-01"})
    report = audit.classify(PINS, result, lambda n: answers[n], {})
    assert report.exit_code == audit.INCOMPLETE
    assert "NOT AUDITED quart: pinned 0.22.0" in audit.render(report, 3)
    assert "INCOMPLETE" in audit.render(report, 3)


def test_unreachable_service_is_3_with_every_package_listed() -> None:
    report = audit.classify(PINS, None, no_network, {})
    assert report.exit_code == audit.INCOMPLETE and report.audited == 0
    assert sorted(report.unaudited) == sorted(PINS)
    assert all("no answer from the vulnerability service" in why for why in report.unaudited.values())


def test_main_exit_code_when_nothing_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("trio==0.35.0 \\\n    --hash=sha256:00\nquart==0.22.0 ; python_version >= '3.11' \\\n")
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("# comment\nGHSA-abc  accepted until 2027-01: not reachable from outside\n")
    assert audit.read_pins(lock) == {"trio": "0.35.0", "quart": "0.22.0"}
    assert audit.read_ignores(ignore) == {"GHSA-abc": "accepted until 2027-01: not reachable from outside"}
    seen: dict[str, Any] = {}

    def fake_pip_audit(locks: Any, ignores: Any) -> None:
        seen.update(locks=list(locks), ignores=list(ignores))
        return None

    monkeypatch.setattr(audit, "run_pip_audit", fake_pip_audit)
    monkeypatch.setattr(audit, "fetch_project_json", no_network)
    assert audit.main([str(lock), "--ignore-file", str(ignore)]) == audit.INCOMPLETE
    assert seen == {"locks": [lock], "ignores": ["GHSA-abc"]}


def test_the_repository_lock_files_parse() -> None:
    pins = audit.read_pins(ROOT / "requirements.lock")
    assert pins.get("trio") and pins.get("paho-mqtt") and pins.get("asyncpg")
