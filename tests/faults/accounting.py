"""Loss accounting for fault scenarios, in the manner of Jepsen's queue checker.

Every scenario ends with one :class:`Accounting` line: what the publisher attempted, what the
broker acknowledged, what the store holds, and from those what was lost, duplicated or unexpected.
:func:`report` prints the line and appends it to ``tests/faults/report.json`` (one object per
scenario, rewritten whole each time so the file is always valid JSON); the README's reliability
table is made from that file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT = Path(os.environ.get("FAULTS_REPORT", Path(__file__).with_name("report.json")))


@dataclass(frozen=True)
class Accounting:
    """One scenario's figures. ``lost`` counts acked keys not stored; ``unexpected`` stored keys
    never attempted; ``duplicated`` the extra copies of stored keys (stored n times counts n-1)."""

    scenario: str
    sent: int
    acked: int
    stored: int
    lost: int
    duplicated: int
    unexpected: int
    recovery_s: float | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
        extra = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (
            f"[faults] {self.scenario}: sent={self.sent} acked={self.acked} stored={self.stored} "
            f"lost={self.lost} duplicated={self.duplicated} unexpected={self.unexpected} recovery={rec}{extra}"
        )


def account(
    scenario: str,
    *,
    sent: Iterable[str],
    acked: Iterable[str],
    stored: Iterable[str],
    recovery_s: float | None = None,
    **notes: object,
) -> Accounting:
    """Compare keys (e.g. ``device_id:seq``): attempted, acknowledged by the broker, and stored
    (one entry per stored row, so a key stored twice appears twice)."""
    sent_set = set(sent)
    acked_set = set(acked)
    counts = Counter(stored)
    stored_set = set(counts)
    return Accounting(
        scenario=scenario,
        sent=len(sent_set),
        acked=len(acked_set),
        stored=len(stored_set),
        lost=len(acked_set - stored_set),
        duplicated=sum(n - 1 for n in counts.values()),
        unexpected=len(stored_set - sent_set),
        recovery_s=recovery_s,
        notes=dict(notes),
    )


def report(acc: Accounting, path: Path = REPORT) -> Accounting:
    """Print the accounting line and record it in the report file (replacing an earlier line of
    the same scenario); returns ``acc`` so a test can assert on it."""
    print(acc.line())
    lines: list[dict[str, object]] = []
    if path.exists():
        try:
            lines = [x for x in json.loads(path.read_text()) if x.get("scenario") != acc.scenario]
        except (ValueError, AttributeError):
            lines = []
    lines.append(asdict(acc))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lines, indent=2) + "\n")
    tmp.replace(path)
    return acc


def table(path: Path = REPORT) -> str:
    """The report as a Markdown table (the README's reliability section is made from it)."""
    head = "| scenario | sent | acked | stored | lost | duplicated | recovery s | notes |\n" + "|---" * 8 + "|"
    rows = []
    lines = json.loads(path.read_text())
    # By scenario number (the names start with it), then in the order they ran.
    lines.sort(key=lambda x: int(x["scenario"].split()[0]) if x["scenario"].split()[0].isdigit() else 999)
    for x in lines:
        rec = "-" if x.get("recovery_s") is None else f"{x['recovery_s']:.2f}"
        notes = ", ".join(f"{k}={v}" for k, v in (x.get("notes") or {}).items())
        rows.append(
            f"| {x['scenario']} | {x['sent']} | {x['acked']} | {x['stored']} | {x['lost']} | {x['duplicated']} "
            f"| {rec} | {notes} |"
        )
    return "\n".join([head, *rows])


if __name__ == "__main__":
    print(table())
