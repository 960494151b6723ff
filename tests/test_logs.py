"""Logging: rotating file, formats, and that no secret ever reaches a line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.logs import redact, set_level, setup_logging
from gateway.settings import LogSettings

SECRETS = {
    "mqtt_password": "s3cr3t-Mqtt-Pa55",
    "api_key": "gk_4hGf8sK2LmQ9zXwP0aB7cD1eF3gH5iJ6",
    "dsn_password": "pgPa55w0rd!x",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.payload.sig",
}


def _settings(tmp_path: Path, **kw: object) -> LogSettings:
    return LogSettings(LOG_FILE=str(tmp_path / "logs" / "server.log"), **kw)  # type: ignore[arg-type]


def test_lines_have_time_level_logger_and_context(tmp_path: Path) -> None:
    setup_logging(_settings(tmp_path), stderr=False)
    logging.getLogger("gateway.mqtt").info("connected host=%s session_present=%s", "broker", True)
    text = (tmp_path / "logs" / "server.log").read_text()
    line = text.strip().splitlines()[-1]
    ts, level, logger, *rest = line.split(" ")
    assert ts.endswith("Z") and "T" in ts
    assert (level, logger) == ("INFO", "gateway.mqtt")
    assert "host=broker session_present=True" in line


def test_json_format_parses_context_and_tracebacks(tmp_path: Path) -> None:
    setup_logging(_settings(tmp_path, LOG_FORMAT="json"), stderr=False)
    log = logging.getLogger("gateway.http")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("request failed request_id=abc status=500")
    record = json.loads((tmp_path / "logs" / "server.log").read_text().strip().splitlines()[-1])
    assert record["level"] == "ERROR" and record["logger"] == "gateway.http"
    assert record["ctx"] == {"request_id": "abc", "status": "500"}
    assert "ValueError: boom" in record["exc"]


def test_no_secret_reaches_the_file(tmp_path: Path) -> None:
    setup_logging(_settings(tmp_path), secrets=[SECRETS["mqtt_password"], SECRETS["api_key"]], stderr=False)
    log = logging.getLogger("gateway.test")
    log.info("connecting password=%s", SECRETS["mqtt_password"])
    log.info("literal secret %s in the middle", SECRETS["mqtt_password"])
    log.info("request X-API-Key: %s", SECRETS["api_key"])
    log.warning("db url postgresql://gw:%s@db.example:5432/gw down", SECRETS["dsn_password"])
    log.info("Authorization: Bearer %s", SECRETS["bearer"])
    log.info("GET /api/v1/events?access_token=%s&types=packet", SECRETS["api_key"])
    log.info("api_key=%s role=read", "someOtherKeyValue123")
    try:
        raise ConnectionError(f"auth failed for postgresql://gw:{SECRETS['dsn_password']}@h/db")
    except ConnectionError:
        log.exception("with traceback")
    text = (tmp_path / "logs" / "server.log").read_text()
    for secret in [*SECRETS.values(), "someOtherKeyValue123"]:
        assert secret not in text
    assert text.count("**********") >= 8
    assert "types=packet" in text, "redaction must not eat the rest of the line"


def test_rotation_keeps_backup_count(tmp_path: Path) -> None:
    setup_logging(_settings(tmp_path, LOG_MAX_BYTES=2048, LOG_BACKUP_COUNT=2), stderr=False)
    log = logging.getLogger("gateway.test")
    for i in range(400):
        log.info("line number=%d %s", i, "x" * 40)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all((tmp_path / "logs" / f).stat().st_size <= 2048 + 200 for f in files)


def test_level_changes_live(tmp_path: Path) -> None:
    setup_logging(_settings(tmp_path, LOG_LEVEL="warning"), stderr=False)
    log = logging.getLogger("gateway.test")
    log.info("hidden-line")
    set_level("DEBUG")
    log.debug("shown-line")
    text = (tmp_path / "logs" / "server.log").read_text()
    assert "hidden-line" not in text and "shown-line" in text


def test_redact_helper_masks_dsn() -> None:
    assert redact("postgresql://u:pw1234@h/db") == "postgresql://u:**********@h/db"


@pytest.fixture(autouse=True)
def _reset_logging() -> None:
    logging.getLogger("gateway").setLevel(logging.INFO)


def test_library_loggers_are_redacted_too(tmp_path: Path) -> None:
    """asyncpg, hypercorn, quart and any other library log through the same redacting handlers."""
    setup_logging(_settings(tmp_path), stderr=False)
    secret = "Lib-Pa55"
    for name in ("asyncpg", "asyncpg.pool", "hypercorn.error", "quart.app", "some.other.library"):
        logging.getLogger(name).warning("%s lost postgresql://gw:%s@db:5432/gw", name, secret)
    logging.getLogger("asyncpg").info("noise below warning")
    text = (tmp_path / "logs" / "server.log").read_text()
    for name in ("asyncpg", "asyncpg.pool", "hypercorn.error", "quart.app", "some.other.library"):
        assert f"{name} lost postgresql://gw:**********@db:5432/gw" in text
    assert secret not in text and "noise below warning" not in text


def test_a_short_password_is_masked_as_a_password_not_as_a_word(tmp_path: Path) -> None:
    from gateway.settings import load_settings, secret_values

    s = load_settings(None, environ={"DATABASE_URL": "postgresql://postgres:postgres@localhost/postgres"})
    setup_logging(_settings(tmp_path), secrets=secret_values(s), stderr=False)
    log = logging.getLogger("gateway.app")
    log.info("gateway ready database=postgres user=postgres")
    log.warning("lost postgresql://postgres:postgres@localhost/postgres password=postgres")
    text = (tmp_path / "logs" / "server.log").read_text()
    assert "gateway ready database=postgres user=postgres" in text
    assert "lost postgresql://postgres:**********@localhost/postgres password=**********" in text


_PASSWORD = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Z")), min_size=1, max_size=24
) | st.text("@:/%?#&=+!", min_size=1, max_size=12)


@given(password=_PASSWORD)
@settings(max_examples=300, deadline=None)
def test_dsn_passwords_in_log_text_are_masked(password: str) -> None:
    """Any password (``@`` and ``:`` included) in a DSN inside a log line: only the password goes."""
    text = f"connect to postgresql://gw:{password}@db.example:5432/gw failed after 3 tries"
    assert redact(text) == "connect to postgresql://gw:**********@db.example:5432/gw failed after 3 tries"
