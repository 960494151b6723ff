"""A gateway restart under an open dashboard: the page says so and resumes from its last event id
(EventSource + Last-Event-ID replay) with no gap and no repeat."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import expect

from tests.browser.stack import Stack
from tests.browser.test_dashboard import connect


def test_gateway_restart_resumes_with_no_gap(page: Any, own_stack: Stack, shot: Any) -> None:
    connect(page, own_stack)
    expect(page.locator("#conn")).to_contain_text("Live")
    page.wait_for_function("() => window.gatewayDashboard.eventIds.length >= 3")
    before = page.evaluate("window.gatewayDashboard.eventIds.length")
    own_stack.restart_gateway()  # SIGTERM, then start again on the same port and database
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "resumed", timeout=60_000)
    expect(conn).to_contain_text("The gateway restarted; resumed after event #")
    # Events keep coming after the restart (the simulator publishes on; the broker kept them).
    page.wait_for_function("n => window.gatewayDashboard.eventIds.length >= n + 10", arg=before, timeout=60_000)
    ids = page.evaluate("window.gatewayDashboard.eventIds")
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"gap or repeat in event ids: {ids}"
    assert page.evaluate("window.gatewayDashboard.resumes") >= 1
    shot("resumed")
