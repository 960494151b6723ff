"""Fuzz the served API from its own OpenAPI description with schemathesis (all default checks).

The gateway runs on a real socket with a real SQLite store; ``st run`` is a subprocess so the
server keeps serving from this Trio test. Bounded by ``FUZZ_EXAMPLES`` (default 25 per operation;
``just fuzz`` raises it); ``SCHEMATHESIS_SEED`` changes the seed. Excluded from fuzzing:
``GET /api/v1/events`` (an endless stream by design; it has its own tests in test_http_sse.py).

Configuration given to schemathesis (``schemathesis.toml`` written per run):
- ``/api/v1/messages``, ``/api/v1/messages/aggregate``, ``/api/v1/rejects`` and
  ``/api/v1/rejects/replay``: ``positive_data_acceptance`` also expects 400, because the schema
  cannot say that a ``cursor`` must come from a previous page (an arbitrary string matching its
  pattern is refused), that ``value`` needs ``key``, that ``start_time`` must not be after
  ``end_time``, that a range holds at most 10,000 buckets or that a replay selects by ``ids`` or by
  time window. ``/api/v1/rejects/replay`` also answers 413 to positive and negative data alike: too
  many ids exceed ``HTTP_MAX_BODY`` before anything else is checked. Every other check and
  operation runs with schemathesis' defaults.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import trio

from tests.support.http import ApiServer

_CONFIG = """
[[operations]]
include-path-regex = "^/api/v1/(messages|rejects|messages/aggregate)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "429"]

[[operations]]
include-path-regex = "^/api/v1/rejects/replay$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "413", "429"]
checks.negative_data_rejection.expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""


@pytest.mark.slow
async def test_schemathesis_finds_no_failure(api: ApiServer, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(_CONFIG, encoding="utf-8")
    st = Path(sys.executable).with_name("st")
    examples = os.environ.get("FUZZ_EXAMPLES", "25")
    seed = os.environ.get("SCHEMATHESIS_SEED", "20261127")
    cmd = [
        str(st),
        "--config-file",
        str(config),
        "run",
        f"{api.url}/openapi.json",
        "-H",
        f"X-API-Key: {api.keys['admin']}",
        "--max-examples",
        examples,
        "--seed",
        seed,
        "--workers",
        "1",
        "--exclude-path",
        "/api/v1/events",
        "--request-timeout",
        "10",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    with trio.fail_after(max(600, 4 * int(examples))):
        result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=str(tmp_path))
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, out[-20000:]
    # It really exercised every operation (not an empty run because the schema failed to load).
    tested = re.search(r"Tested:\s+(\d+)", out)
    assert tested is not None and int(tested.group(1)) >= 10, out[-5000:]
    reports = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "report").glob("*.xml"))
    assert "/api/v1/messages/aggregate" in reports, reports[-5000:]
    assert "generated" in out and " failed" not in out.split("SUMMARY")[-1], out[-5000:]
