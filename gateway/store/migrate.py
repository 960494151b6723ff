"""Forward-only SQL migrations: ``db/migrations/{postgres,sqlite}/NNNN_name.sql``.

The files ship inside the package as ``gateway/store/migrations`` (a symlink to
``db/migrations`` in a checkout, real files in a wheel). Each backend applies the pending ones
in version order, each in its own transaction that also records it in ``schema_migrations``;
applying again changes nothing. This module finds and describes them; the stores run them
(``Store.migrate()``, ``Store.migration_status()``: at start-up, and for ``gateway migrate
[--status]`` in :mod:`gateway.cli`). It imports no store, so the stores can import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Literal

from gateway.errors import StoreCorrupt
from gateway.store.base import Migration

Dialect = Literal["sqlite", "postgres"]

_FILE_RE = re.compile(r"^(\d{4})_([A-Za-z0-9_]+)\.sql$")

# Created outside the numbered files: it must exist before the first one is recorded.
BOOTSTRAP: dict[Dialect, str] = {
    "postgres": (
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    ),
    "sqlite": (
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    ),
}


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[MigrationFile]:
    """Every migration file of ``dialect``, in version order.

    Raises StoreCorrupt when the directory is missing or two files share a version.
    """
    folder = resources.files("gateway.store").joinpath("migrations", dialect)
    if not folder.is_dir():
        raise StoreCorrupt(f"migrations for {dialect} not found (looked in {folder})")
    found: dict[int, MigrationFile] = {}
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise StoreCorrupt(f"two {dialect} migrations with version {version:04d}")
        found[version] = MigrationFile(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def merge_status(files: list[MigrationFile], applied: dict[int, tuple[str, datetime]]) -> list[Migration]:
    """Known files plus applied versions (also ones no file describes), in version order."""
    out = {f.version: Migration(f.version, f.name, applied.get(f.version, (f.name, None))[1]) for f in files}
    for version, (name, at) in applied.items():
        out.setdefault(version, Migration(version, name, at))
    return [out[v] for v in sorted(out)]
