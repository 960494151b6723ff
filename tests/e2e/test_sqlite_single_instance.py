"""SQLite is for one gateway: a second one on the same file is refused at start-up (exit 3), and a
restart after a SIGKILL is not (the kernel drops the lock with the process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import EXIT_REFUSED
from gateway.errors import StartupRefused
from gateway.store.single import lock_path, single_instance
from tests.e2e.harness import GatewayProcess
from tests.support.pg import db_settings


def _gateway(tmp_path: Path, name: str, db: Path) -> GatewayProcess:
    workdir = tmp_path / name
    workdir.mkdir()
    return GatewayProcess(
        workdir, {"DATABASE_URL": f"sqlite:///{db}", "MQTT_CLIENT_ID": f"e2e-single-{name}-{tmp_path.name}"}
    )


def test_second_gateway_on_one_sqlite_file_is_refused_and_a_restart_after_sigkill_is_not(tmp_path: Path) -> None:
    db = tmp_path / "data" / "gateway.db"
    first = _gateway(tmp_path, "first", db)
    first.start()
    try:
        second = _gateway(tmp_path, "second", db)
        second.start(wait=False)
        rc = second.wait(30)
        lines = second.log_text().strip().splitlines()
        assert rc == EXIT_REFUSED == 3, second.log_text()[-3000:]
        assert first.proc is not None
        assert lines[-1] == (
            f"gateway: cannot start: database: another gateway (pid {first.proc.pid}) is using {db.resolve()}:"
            " SQLite is for one instance; to run several, share a PostgreSQL database (ops/SCALING.md)"
        ), lines[-5:]
        assert "Traceback" not in second.log_text()
        assert first.proc.poll() is None  # the first one never noticed
        first.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        assert lock_path(db.resolve()).exists()
        again = _gateway(tmp_path, "again", db)
        again.start()  # ready: a stale lock file does not refuse
        assert again.stop() == 0, again.log_text()[-3000:]
    finally:
        first.kill()


def test_lock_is_per_open_file_and_released_on_exit(tmp_path: Path) -> None:
    """Even within one process a second holder is refused (``flock`` locks an open file, not a
    process); the lock goes with the block; PostgreSQL URLs take none."""
    settings = db_settings(f"sqlite:///{tmp_path}/gw.db")
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path)
    with single_instance(settings):
        with pytest.raises(StartupRefused, match="SQLite is for one instance") as refused:
            with single_instance(db_settings(f"sqlite:///{alias}/gw.db")):  # same file, other spelling
                pass
        assert refused.value.component == "database"
    with single_instance(settings):
        pass
    with single_instance(db_settings("postgresql://postgres@127.0.0.1:1/none")):
        pass
