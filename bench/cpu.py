"""CPU time of other processes from ``/proc``, and counting the lines a load tool prints.

``/proc/<pid>/stat`` fields 14 and 15 (utime, stime, in clock ticks) already sum every thread of the
process, so one read per process gives the whole gateway (Trio thread, SQLite worker, asyncio side).
CPU seconds per message are the stable figure on a shared machine; wall-clock rates vary 2x here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

TICK = 1.0 / os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def parse_stat(text: str) -> tuple[int, int, int]:
    """(ppid, utime, stime) in clock ticks from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or ``)``: split after the last one.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    return int(rest[1]), int(rest[11]), int(rest[12])


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """utime + stime of ``pid`` in seconds (all its threads), or None once it is gone."""
    try:
        _, utime, stime = parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return (utime + stime) * TICK


def sys_seconds(pid: int, proc: Path = PROC) -> float:
    """stime of ``pid`` in seconds (kernel time: syscalls, wake-ups), 0 once it is gone."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())[2] * TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """``pid`` and every live process below it (e.g. a postmaster and its backends)."""
    parents: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, _, _ = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_seconds(pid: int, proc: Path = PROC) -> float:
    """CPU seconds of ``pid`` and its live descendants (exited children are not counted)."""
    return sum(cpu_seconds(p, proc) or 0.0 for p in descendants(pid, proc))


def parse_host_stat(text: str) -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from the text of ``/proc/stat``.

    Busy is everything but idle and iowait, summed over all cores (so 2 cores give 2 s per second).
    """
    fields = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (total - idle) * TICK, total * TICK


def host_seconds(proc: Path = PROC) -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine so far."""
    return parse_host_stat((proc / "stat").read_text())


@dataclass
class Snapshot:
    """CPU seconds of named process groups at one moment."""

    seconds: dict[str, float]

    @classmethod
    def take(
        cls, groups: Mapping[str, Iterable[int]], *, trees: Iterable[str] = (), kernel: Iterable[str] = ()
    ) -> Snapshot:
        """Read every pid of every group now; groups named in ``trees`` include descendants, those
        in ``kernel`` also get ``<name>_sys`` (their kernel time alone)."""
        tree, ker = set(trees), set(kernel)
        out: dict[str, float] = {}
        for name, pids in groups.items():
            pids = list(pids)
            read = tree_seconds if name in tree else (lambda p: cpu_seconds(p) or 0.0)
            out[name] = sum(read(p) for p in pids)
            if name in ker:
                out[name + "_sys"] = sum(sys_seconds(p) for p in pids)
        return cls(out)

    def since(self, before: Snapshot) -> dict[str, float]:
        """CPU seconds spent by each group between ``before`` and this snapshot."""
        return {k: v - before.seconds.get(k, 0.0) for k, v in self.seconds.items()}


class LineCounter:
    """Counts lines that start with ``prefix`` in a byte stream fed in arbitrary chunks."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.count = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> int:
        """Take the next chunk; returns the count so far (a line counts once its newline came)."""
        data = self._tail + chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()
        p = self.prefix
        self.count += sum(1 for line in lines if line.startswith(p))
        return self.count


def per_item_us(seconds: float, items: int) -> float | None:
    """Microseconds per item, None when nothing was counted."""
    return seconds / items * 1e6 if items else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is zero."""
    if a is None or not b:
        return None
    return a / b
