"""Migrations: discovery (checkout and package data), idempotence, concurrency, atomicity,
and the two dialects keeping the same table and column names."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from gateway.errors import StoreCorrupt
from gateway.ingest import message_from_packet
from gateway.packets import parse_packet
from gateway.settings import DatabaseSettings
from gateway.store import migrate, open_store
from gateway.store.base import Migration, NewMessage
from gateway.store.sqlite import _statements
from tests.support.pg import db_settings, psql

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_load_migrations(dialect: migrate.Dialect) -> None:
    files = migrate.load_migrations(dialect)
    assert [f.version for f in files] == sorted(f.version for f in files)
    assert files[0].version == 1 and files[0].name == "initial"
    assert all("CREATE TABLE" in f.sql or f.sql.strip() for f in files)
    # Package data (gateway/store/migrations) is the same as db/migrations in the checkout.
    on_disk = sorted(p.name for p in (REPO / "db" / "migrations" / dialect).glob("*.sql"))
    assert on_disk == [f"{f.version:04d}_{f.name}.sql" for f in files]
    for f in files:
        assert (REPO / "db" / "migrations" / dialect / f"{f.version:04d}_{f.name}.sql").read_text() == f.sql


def test_dialects_have_the_same_migrations() -> None:
    pg = [(f.version, f.name) for f in migrate.load_migrations("postgres")]
    lite = [(f.version, f.name) for f in migrate.load_migrations("sqlite")]
    assert pg == lite


def test_duplicate_versions_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "migrations" / "sqlite").mkdir(parents=True)
    (tmp_path / "migrations" / "sqlite" / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "migrations" / "sqlite" / "0001_b.sql").write_text("SELECT 1;")
    monkeypatch.setattr(migrate.resources, "files", lambda _pkg: tmp_path)
    with pytest.raises(StoreCorrupt, match="0001"):
        migrate.load_migrations("sqlite")


def test_merge_status_keeps_unknown_applied_versions() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    files = [migrate.MigrationFile(1, "initial", ""), migrate.MigrationFile(2, "two", "")]
    assert migrate.merge_status(files, {1: ("initial", at), 9: ("future", at)}) == [
        Migration(1, "initial", at),
        Migration(2, "two", None),
        Migration(9, "future", at),
    ]


def test_sqlite_statement_splitter() -> None:
    script = """
    -- a comment; with a semicolon
    CREATE TABLE a (x TEXT DEFAULT ';');
    CREATE TRIGGER t AFTER INSERT ON a BEGIN
        UPDATE a SET x = 'y;z';
    END;
    -- trailing comment
    """
    statements = list(_statements(script))
    assert len(statements) == 2
    assert "CREATE TRIGGER" in statements[1] and statements[1].rstrip().endswith("END;")
    with pytest.raises(StoreCorrupt):
        list(_statements("CREATE TABLE b (x INT)"))


async def test_sqlite_failed_migration_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "pkg" / "migrations" / "sqlite"
    folder.mkdir(parents=True)
    (folder / "0001_ok.sql").write_text("CREATE TABLE one (x INT);\n")
    (folder / "0002_bad.sql").write_text("CREATE TABLE two (x INT);\nINSERT INTO nowhere VALUES (1);\n")
    monkeypatch.setattr(migrate.resources, "files", lambda _pkg: tmp_path / "pkg")
    db = tmp_path / "gw.db"
    async with open_store(db_settings(f"sqlite:///{db}")) as store:
        with pytest.raises(StoreCorrupt):
            await store.migrate()
        status = await store.migration_status()
    assert [(m.version, m.applied_at is not None) for m in status] == [(1, True), (2, False)]
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "one" in tables and "two" not in tables


async def test_pg_concurrent_migrators(pg_url: str) -> None:
    """Instances starting together: each migration is applied exactly once, nobody fails."""
    results: list[list[Migration]] = []

    async def one() -> None:
        async with open_store(db_settings(pg_url)) as store:
            results.append(await store.migrate())

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
    applied = [m.version for r in results for m in r]
    assert sorted(applied) == [f.version for f in migrate.load_migrations("postgres")]
    async with open_store(db_settings(pg_url)) as store:
        status = await store.migration_status()
    assert all(m.applied_at is not None for m in status)


async def test_same_names_in_both_dialects(pg_url: str, tmp_path: Path) -> None:
    """Operators query either database with the same table and column names."""
    db = tmp_path / "gw.db"
    for url in (pg_url, f"sqlite:///{db}"):
        async with open_store(db_settings(url)) as store:
            await store.migrate()

    rows = await trio.to_thread.run_sync(
        psql,
        pg_url,
        # The partitions of messages are messages; message_keys is PostgreSQL's dedupe key (a
        # partitioned table cannot hold it, migration 0004), SQLite keeps it as a unique index.
        "SELECT table_name || '.' || column_name FROM information_schema.columns c"
        " JOIN pg_class t ON t.relname = c.table_name AND t.relnamespace = 'public'::regnamespace"
        " WHERE table_schema = 'public' AND NOT t.relispartition AND table_name <> 'message_keys'",
    )
    pg_cols = set(rows.split())
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        lite_cols = {
            f"{t}.{c[1]}"
            for t in tables
            if not t.startswith("sqlite_")
            for c in conn.execute(f"PRAGMA table_info({t})")
        }
    assert pg_cols == lite_cols
    assert {"messages.id", "messages.device_ts", "rejects.payload", "events.created_at"} <= pg_cols
    assert "schema_migrations.version" in pg_cols


_OLD_STYLE = [  # (timestamp as sent, seq): zone offsets, microseconds, the ends of the range
    ("2026-11-27T09:00:00Z", 1),
    ("2026-11-27T10:00:00.123456+01:00", 2),
    ("0001-01-01T00:00:00Z", 3),
    ("9999-12-31T23:59:59.999999Z", 4),
    (1_790_000_000.5, 5),
]


def _mig_packet(ts: object, seq: int) -> bytes:
    body = {"device_id": "old", "timestamp": ts, "seq": seq, "measurements": {"t": 1}, "status": "ok"}
    return json.dumps(body).encode()


async def test_0002_rewrites_old_dedupe_keys(store_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows stored with the old 'seq:<n>' key still dedupe their redelivery once 0002 ran: the SQL
    # produces exactly the text of Packet.dedupe_key, in both dialects.
    every = migrate.load_migrations

    # SQLite: every migration but 0002 first (today's write_batch needs the columns later ones
    # add). PostgreSQL: only 0001 and 0003, since 0004 moves the keys to message_keys and 0002 must
    # rewrite them first; the store writes with its pre-0004 statement until then.
    def held(dialect: str, version: int) -> bool:
        return version == 2 or (dialect == "postgres" and version >= 4)

    monkeypatch.setattr(migrate, "load_migrations", lambda d: [f for f in every(d) if not held(d, f.version)])
    now = datetime.now(UTC)
    packets = [parse_packet(_mig_packet(ts, seq)) for ts, seq in _OLD_STYLE]
    new = [message_from_packet(p, "mqtt", now) for p in packets]
    old: list[NewMessage] = [m._replace(dedupe_key=f"seq:{m.seq}") for m in new]
    async with open_store(store_settings) as st, trio.open_nursery() as nursery:
        await nursery.start(st.run)  # applies all but 0002
        assert 1 in (applied := [m.version for m in await st.migration_status()]) and 2 not in applied
        stored = await st.write_batch(old, [])
        monkeypatch.setattr(migrate, "load_migrations", every)
        assert 2 in [m.version for m in await st.migrate()]  # and, on PostgreSQL, 0004 after it
        again = await st.write_batch(new, [])
        assert [(o.id, o.duplicate) for o in again] == [(o.id, True) for o in stored]
        # A restarted counter (same seq, new time) is a new reading.
        later = parse_packet(_mig_packet("2026-11-28T09:00:00Z", 1))
        assert not (await st.write_batch([message_from_packet(later, "mqtt", now)], []))[0].duplicate
        nursery.cancel_scope.cancel()
