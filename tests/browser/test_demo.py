"""``gateway demo`` as a newcomer meets it: run it, open the link it prints, see sensors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.e2e.harness import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_link() -> Iterator[str]:
    """A running ``gateway demo`` (its own broker, gateway and simulator); yields the printed link."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--http-port", str(free_port()), "--rate", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    link = None
    while time.monotonic() < deadline and link is None:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"Dashboard\s+(http://\S+#key=\S+)", line)
        link = m.group(1) if m else None
    try:
        assert link is not None, "".join(lines)
        yield link
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0


def test_the_printed_link_signs_in_and_shows_the_simulated_fleet(page: Any, demo_link: str, shot: Any) -> None:
    page.goto(demo_link)
    expect(page.locator("#conn")).to_contain_text("Live")
    assert "#key=" not in page.url  # the key leaves the address bar (history, copied links)
    expect(page.locator(".card")).to_have_count(20)
    expect(page.locator('.card[data-device="demo-0001"] .seen')).to_contain_text("ago")
    # The simulator's malformed share shows up as rejects.
    expect(page.locator("#rejects-total")).to_contain_text(re.compile(r"[1-9]"))
    shot("fleet")
