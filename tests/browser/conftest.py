"""Browser tests: Debian's chromium driven by Playwright for Python (no browser download).

Without chromium or Playwright the tests skip, except under CI (``CI`` set), where that is a
failure: ``.ci/run`` installs the ``chromium`` package. Screenshots go to
``tests/browser/artifacts/`` (gitignored), one per test and step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.stack import Stack

ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 20_000  # how long any wait on the page may take (generous: the box may be loaded)


def _unavailable(why: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"browser tests cannot run in CI: {why} (.ci/run installs Debian's chromium)", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One headless chromium for these tests, closed after them (Playwright's event loop must not
    outlive them into the rest of the suite, which runs trio and trio-asyncio)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (the dev extras)")
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # each `expect` waits for its condition up to this long
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page (its own context: no sessionStorage shared between tests) of 1360 by 900."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def shot(page: Any, request: pytest.FixtureRequest) -> Any:
    """``shot("step")`` saves a full-page screenshot as artifacts/<test>-<step>.png; returns its path."""
    ARTIFACTS.mkdir(exist_ok=True)

    def take(step: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{step}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running gateway fed by a simulator (shared by the tests of a module)."""
    s = Stack(tmp_path_factory.mktemp("browser-stack"))
    try:
        s.start()
        s.wait_stored(10)
        yield s
    finally:
        s.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A gateway of the test's own (for tests that restart it)."""
    s = Stack(tmp_path / "stack")
    try:
        s.start()
        s.wait_stored(5)
        yield s
    finally:
        s.stop()
