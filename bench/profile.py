"""Sample the running gateway with py-spy and attribute on-CPU time to pipeline stages.

Each sampled stack is charged to the innermost frame that belongs to the gateway package (so time
inside sqlite3, paho or pydantic counts for the gateway module that called it); stacks with no
gateway frame are the event loop, the HTTP server or start-up, reported by their outermost library.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from bench.harness import table

_LOOP = "(trio run loop: scheduling, I/O polling, thread hand-off)"
_LOOP_LIBS = {"trio", "outcome", "sniffio", "attr", "attrs"}
_LOOP_ROOTS = {("cli", "_serve"), ("cli", "main"), ("__main__", "<module>")}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable (next to this Python first), or None when it is not installed."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


async def record(pid: int, seconds: float, out: Path, rate: int = 200) -> bool:
    """Record ``seconds`` of on-CPU samples of ``pid`` (all threads) into ``out`` (collapsed stacks)."""
    exe = py_spy()
    if exe is None:
        return False
    cmd = [
        exe,
        "record",
        "-p",
        str(pid),
        "-d",
        str(max(1, round(seconds))),
        "-r",
        str(rate),
        "-f",
        "raw",
        "-o",
        str(out),
        "--nonblocking",
        "--full-filenames",
    ]
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode == 0 and await trio.Path(out).exists()


def _library(path: str) -> str | None:
    return path.split("site-packages/", 1)[1].split("/", 1)[0] if "site-packages/" in path else None


def stage_of(stack: str) -> tuple[str, str]:
    """(stage, hottest gateway function) for one collapsed stack ``frame;frame;...``."""
    frames = stack.split(";")
    for i in range(len(frames) - 1, -1, -1):
        m = _FRAME.match(frames[i])
        if m is None:
            continue
        path = m.group("file").replace("\\", "/")
        if ("/gateway/" in path or path.startswith("gateway/")) and "site-packages" not in path:
            module = ("/" + path).split("/gateway/", 1)[1].removesuffix(".py").replace("/", ".")
            if (module, m.group("func")) in _LOOP_ROOTS:
                # Below the function that called trio.run(): the HTTP server's frames when there are
                # any (hypercorn, quart, h11), else only trio's own (the run loop itself).
                for frame in frames[i + 1 :]:
                    fm = _FRAME.match(frame)
                    lib = _library(fm.group("file")) if fm else None
                    if lib is not None and lib not in _LOOP_LIBS:
                        return f"(no gateway frame: {lib})", lib
                return _LOOP, _LOOP
            return module, f"{module}:{m.group('func')}"
    for frame in frames:
        m = _FRAME.match(frame)
        if m is not None and "site-packages/" in m.group("file"):
            lib = m.group("file").split("site-packages/", 1)[1].split("/", 1)[0]
            return f"(no gateway frame: {lib})", lib
    return "(other)", "(other)"


def attribute(path: Path) -> dict[str, Any]:
    """Shares of samples per stage and the top functions, from a py-spy raw file."""
    stages: Counter[str] = Counter()
    funcs: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        stage, func = stage_of(stack)
        stages[stage] += n
        funcs[func] += n
        leaf = _FRAME.match(stack.split(";")[-1])
        if leaf is not None:
            leaves[f"{leaf.group('func')} ({Path(leaf.group('file')).name})"] += n
    return {
        "samples": total,
        "stages": [(s, n / total) for s, n in stages.most_common(12)] if total else [],
        "functions": [(f, n / total) for f, n in funcs.most_common(12)] if total else [],
        "leaves": [(f, n / total) for f, n in leaves.most_common(12)] if total else [],
    }


def tables(title: str, prof: dict[str, Any]) -> list[str]:
    """The stage and leaf-function tables of one profile (or a note that there is none)."""
    if not prof.get("samples"):
        return [f"{title}: py-spy not available or failed (pip install py-spy)"]
    return [
        table(
            f"{title}: {prof['samples']:,} py-spy samples, share of on-CPU time",
            ["stage (innermost gateway module)", "share", "hottest gateway functions", "share"],
            [
                [s, f"{a:.0%}", f, f"{b:.0%}"]
                for (s, a), (f, b) in zip(prof["stages"][:10], prof["functions"][:10], strict=False)
            ],
        ),
        table(
            f"{title}: hottest leaf functions (any library)",
            ["function", "share"],
            [[f, f"{a:.0%}"] for f, a in prof["leaves"][:10]],
        ),
    ]


async def sample(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """Record and attribute in one go; ``{"samples": 0}`` when py-spy is missing or failed."""
    if not await record(pid, seconds, out):
        return {"samples": 0}
    return attribute(out)
