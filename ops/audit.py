"""Check the lock files against known vulnerabilities (``just audit``; see ops/DEPLOY.md, Patches).

Exit codes: 0 every locked package was audited and none has a known vulnerability; 1 at least one
has (listed with the versions that fix it); 3 the audit could not be completed (the vulnerability
service was unreachable or did not answer for some packages, listed) and found nothing in the rest.

pip-audit asks PyPI's JSON API about each pinned version (``/pypi/NAME/VERSION/json``). Where that
answer is missing (e.g. behind a mirror that serves only the project endpoint), the project
endpoint ``/pypi/NAME/json`` is asked instead: its ``vulnerabilities`` are those of the latest
release, so they count only when the lock pins that release; an older pin stays "not audited".

Accepted risks go in ``ops/audit-ignore.txt``: one vulnerability id (or alias) per line, then the
reason; ``#`` starts a comment.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLEAN, VULNERABLE, INCOMPLETE = 0, 1, 3
PYPI_JSON = "https://pypi.org/pypi/{name}/json"
TIMEOUT = 15.0  # seconds per request to the vulnerability service
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """``{name: version}`` for every ``name==version`` line of a requirements lock file."""
    pins: dict[str, str] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_ignores(path: Path) -> dict[str, str]:
    """``{vulnerability id: reason}`` from the ignore file (missing file: nothing ignored)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            vid, _, reason = line.partition(" ")
            out[vid] = reason.strip()
    return out


@dataclass
class Report:
    """What the audit found: vulnerabilities per package, packages it could not audit."""

    vulnerable: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    unaudited: dict[str, str] = field(default_factory=dict)
    audited: int = 0
    by_fallback: int = 0

    @property
    def exit_code(self) -> int:
        if self.vulnerable:
            return VULNERABLE
        return INCOMPLETE if self.unaudited else CLEAN


def _ignored(vuln: Mapping[str, Any], ignores: Mapping[str, str]) -> bool:
    ids = {vuln.get("id"), *(vuln.get("aliases") or ())}
    return any(i in ignores for i in ids)


def classify(
    pins: Mapping[str, str],
    pip_audit: Mapping[str, Any] | None,
    project_json: Callable[[str], Mapping[str, Any]],
    ignores: Mapping[str, str],
) -> Report:
    """Combine pip-audit's JSON result with the latest-release fallback into one :class:`Report`.

    ``pip_audit`` is None when pip-audit gave no result at all; then every pin goes to the
    fallback. ``project_json(name)`` returns PyPI's project JSON or raises ``OSError``/``ValueError``.
    """
    report = Report()
    retry: list[str] = []
    if pip_audit is None:
        retry = sorted(pins)
    else:
        for dep in pip_audit.get("dependencies", []):
            name = canonical(dep["name"])
            if "skip_reason" in dep:
                retry.append(name)
                continue
            report.audited += 1
            vulns = [v for v in dep.get("vulns", []) if not _ignored(v, ignores)]
            if vulns:
                report.vulnerable[name] = vulns
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: _try(project_json, n), retry))
    for name, answer in zip(retry, answers, strict=True):
        pinned = pins.get(name)
        if isinstance(answer, str) or pinned is None:
            report.unaudited[name] = answer if isinstance(answer, str) else "not pinned in a lock file"
            continue
        latest = str(answer.get("info", {}).get("version", ""))
        if latest != pinned:
            report.unaudited[name] = f"pinned {pinned}; the service answered only for the latest release {latest}"
            continue
        report.audited += 1
        report.by_fallback += 1
        vulns = [
            {"id": v.get("id"), "fix_versions": v.get("fixed_in") or [], "aliases": v.get("aliases") or []}
            for v in answer.get("vulnerabilities") or []
            if not v.get("withdrawn") and not _ignored(v, ignores)
        ]
        if vulns:
            report.vulnerable[name] = vulns
    return report


def _try(fetch: Callable[[str], Mapping[str, Any]], name: str) -> Mapping[str, Any] | str:
    try:
        return fetch(name)
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        return f"no answer from the vulnerability service: {exc}"


def fetch_project_json(name: str) -> Mapping[str, Any]:
    """PyPI's project JSON for ``name``."""
    with urllib.request.urlopen(PYPI_JSON.format(name=name), timeout=TIMEOUT) as resp:  # a fixed https URL
        data: Mapping[str, Any] = json.load(resp)
        return data


def run_pip_audit(locks: Iterable[Path], ignores: Iterable[str]) -> Mapping[str, Any] | None:
    """pip-audit's JSON result for the lock files, or None (with its error printed) if it gave none."""
    cmd = [sys.executable, "-m", "pip_audit", "--disable-pip", "--progress-spinner", "off", "-f", "json"]
    cmd += ["--timeout", str(int(TIMEOUT))]
    for lock in locks:
        cmd += ["-r", str(lock)]
    for vid in ignores:
        cmd += ["--ignore-vuln", vid]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        print("audit: pip-audit did not finish in 600 s", file=sys.stderr)
        return None
    try:
        result: Mapping[str, Any] = json.loads(proc.stdout)
        return result
    except ValueError:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"audit: pip-audit gave no result (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return None


def render(report: Report, total: int) -> str:
    """The human summary printed by ``just audit``."""
    lines: list[str] = []
    for name, vulns in sorted(report.vulnerable.items()):
        for v in vulns:
            fixes = ", ".join(v.get("fix_versions") or []) or "no fixed release yet"
            lines.append(f"VULNERABLE {name}: {v.get('id')} (fixed in: {fixes})")
    for name, why in sorted(report.unaudited.items()):
        lines.append(f"NOT AUDITED {name}: {why}")
    applicable = report.audited + len(report.unaudited)
    lines.append(
        f"audit: {applicable} packages ({total} pinned, the rest only for other platforms), {report.audited} audited "
        f"({report.by_fallback} via the latest-release answer), {len(report.unaudited)} not audited, "
        f"{sum(len(v) for v in report.vulnerable.values())} known vulnerabilities"
    )
    if report.exit_code == INCOMPLETE:
        lines.append("audit: INCOMPLETE: the vulnerability service could not be asked about every package")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("locks", nargs="+", type=Path, help="requirements lock files")
    parser.add_argument("--ignore-file", type=Path, default=Path(__file__).with_name("audit-ignore.txt"))
    args = parser.parse_args(argv)
    pins: dict[str, str] = {}
    for lock in args.locks:
        pins.update(read_pins(lock))
    ignores = read_ignores(args.ignore_file)
    report = classify(pins, run_pip_audit(args.locks, ignores), fetch_project_json, ignores)
    print(render(report, len(pins)))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
