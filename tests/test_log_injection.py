"""Log injection: whatever a client puts in a path, header, topic or device id, one record stays one
line in the log file, with control characters escaped (text and JSON formats)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.logs import escape_control, setup_logging
from gateway.settings import LogSettings
from tests.support.http import ApiServer

_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ ")
FAKE = "2026-01-01T00:00:00.000Z INFO gateway.http GET /api/v1/admin 200 0.1ms key=admin rid=x"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "logs" / "server.log"
    setup_logging(LogSettings(LOG_FILE=str(path), LOG_LEVEL="INFO"), stderr=False)  # type: ignore[call-arg]
    yield path
    logging.getLogger("gateway").setLevel(logging.INFO)


def _lines(path: Path) -> list[str]:
    for handler in logging.getLogger("gateway").handlers:
        handler.flush()
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _assert_one_record_per_line(lines: list[str]) -> None:
    for line in lines:
        assert _RECORD.match(line) or line.startswith("  "), repr(line)
        assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), repr(line)


async def test_encoded_newline_in_path_writes_one_escaped_line(api: ApiServer, log_file: Path) -> None:
    evil = "/api/v1/x\n" + FAKE + "\r\x1b[2J\u2028\x85\x00end"
    async with api.client("read") as c:
        r = await c.get(quote(evil), params={"q": "a\nb"}, headers={"User-Agent": "ua\twith tab"})
    assert r.status_code == 404
    lines = _lines(log_file)
    _assert_one_record_per_line(lines)
    access = [line for line in lines if "/api/v1/x" in line]
    assert len(access) == 1, lines
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in lines)
    assert "%0A2026-01-01T00" in access[0] and " 404 " in access[0]
    fields = access[0].split(" ")
    assert fields[3] == "GET" and fields[5] == "404"  # the path is one field: no space survives


async def test_generated_paths_give_exactly_one_line_each(api: ApiServer, log_file: Path) -> None:
    sent: list[str] = []

    # Hypothesis drives a blocking client from a worker thread while Trio serves the API.
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=st.text(min_size=1, max_size=40))
    def probe(text: str) -> None:
        with httpx.Client(base_url=api.url, timeout=10) as c:
            r = c.get("/p/" + quote(text, safe=""), params={"access_token": text, "v": text})
        assert r.status_code == 404
        sent.append(r.headers["x-request-id"])

    await trio.to_thread.run_sync(probe)
    lines = _lines(log_file)
    _assert_one_record_per_line(lines)
    for rid in sent:
        assert sum(f"rid={rid}" in line for line in lines) == 1, rid


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_topic_and_device_id_with_control_characters_are_escaped(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "server.log"
    setup_logging(LogSettings(LOG_FILE=str(path), LOG_FORMAT=fmt), stderr=False)  # type: ignore[call-arg]
    log = logging.getLogger("gateway.ingest")
    topic = "sensors/a\n" + FAKE + "/data"
    log.warning("reject topic=%s device_id=%s", topic, "dev\r\x1b]0;x\x07")
    try:
        raise ValueError("bad payload\n" + FAKE)
    except ValueError:
        log.exception("validation crashed topic=%s", topic)
    lines = _lines(path)
    if fmt == "text":
        _assert_one_record_per_line(lines)
        assert len([line for line in lines if _RECORD.match(line)]) == 2
        assert "topic=sensors/a\\n2026-01-01" in lines[0] and "device_id=dev\\r\\x1b]0;x\\x07" in lines[0]
        assert any(line.startswith("  ") and FAKE in line for line in lines)  # traceback stays indented
    else:
        assert len(lines) == 2
        first = json.loads(lines[0])
        assert first["msg"].startswith("reject topic=sensors/a\\n2026-01-01")
        assert first["ctx"]["topic"] == "sensors/a\\n2026-01-01T00:00:00.000Z"
        assert FAKE in json.loads(lines[1])["exc"]


def test_escape_control() -> None:
    assert escape_control("plain ü €") == "plain ü €"
    assert escape_control("a\nb\rc\td\x00e\x7f\x9b\u2028") == "a\\nb\\rc\\td\\x00e\\x7f\\x9b\\u2028"
