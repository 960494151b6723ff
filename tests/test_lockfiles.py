"""The lock files deploys and CI install from agree with pyproject.toml (regenerate with `just lock`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:.|\n)*?)(?=^\S|\Z)", re.MULTILINE)


def _entries(lock: Path) -> dict[str, tuple[str, str]]:
    """``{name: (version, the rest of its entry)}`` of a uv/pip-tools lock file."""
    return {
        canonicalize_name(m.group(1)): (m.group(2), m.group(3))
        for m in _ENTRY.finditer(lock.read_text(encoding="utf-8"))
    }


def _requirements(group: str) -> list[Requirement]:
    """The requirements of ``dependencies`` or of an optional-dependencies group."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    raw = project["dependencies"] if group == "dependencies" else project["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


@pytest.mark.parametrize(("lock", "groups"), [(RUNTIME_LOCK, ["dependencies"]), (DEV_LOCK, ["dependencies", "dev"])])
def test_every_declared_dependency_is_pinned_within_its_range(lock: Path, groups: list[str]) -> None:
    pins = _entries(lock)
    problems: list[str] = []
    for group in groups:
        for req in _requirements(group):
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{req} is not in {lock.name}")
            elif not req.specifier.contains(pins[name][0], prereleases=True):
                problems.append(f"{req} but {lock.name} pins {pins[name][0]}")
    assert not problems, "run `just lock`: " + "; ".join(problems)


def test_dev_lock_uses_the_runtime_versions() -> None:
    runtime, dev = _entries(RUNTIME_LOCK), _entries(DEV_LOCK)
    differ = {n: (v, dev.get(n, ("missing",))[0]) for n, (v, _) in runtime.items() if dev.get(n, ("",))[0] != v}
    assert not differ, f"CI would test other versions than deploy: {differ}; run `just lock`"


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK])
def test_every_pin_carries_hashes(lock: Path) -> None:
    entries = _entries(lock)
    assert len(entries) > 10
    missing = [n for n, (_, rest) in entries.items() if "--hash=sha256:" not in rest]
    assert not missing, f"entries without hashes (pip --require-hashes refuses them): {missing}"
