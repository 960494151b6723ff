"""The accounting arithmetic the fault scenarios rely on."""

from __future__ import annotations

import json
from pathlib import Path

from tests.faults.accounting import account, report


def test_lost_duplicated_unexpected_are_counted_from_keys(tmp_path: Path) -> None:
    acc = account("s", sent=["a", "b", "c", "d"], acked=["a", "b", "c"], stored=["a", "a", "b", "z"])
    assert (acc.sent, acc.acked, acc.stored) == (4, 3, 3)
    assert (acc.lost, acc.duplicated, acc.unexpected) == (1, 1, 1)  # c lost, a twice, z never sent
    path = tmp_path / "report.json"
    report(acc, path)
    report(account("s", sent=["a"], acked=["a"], stored=["a"], recovery_s=1.5), path)
    report(account("t", sent=[], acked=[], stored=[]), path)
    lines = json.loads(path.read_text())
    assert [x["scenario"] for x in lines] == ["s", "t"]
    assert lines[0]["lost"] == 0 and lines[0]["recovery_s"] == 1.5
