"""A gateway restart under an open dashboard: the page says so and resumes from its last event id
(EventSource + Last-Event-ID replay) with no gap and no repeat."""

from __future__ import annotations

import re
from typing import Any

from playwright.sync_api import expect

from tests.browser.stack import Stack
from tests.browser.test_dashboard import connect


def test_gateway_restart_resumes_with_no_gap(page: Any, own_stack: Stack, shot: Any) -> None:
    connect(page, own_stack)
    expect(page.locator("#conn")).to_contain_text("Live")
    page.wait_for_function("() => window.gatewayDashboard.eventIds.length >= 3")
    before = page.evaluate("window.gatewayDashboard.eventIds.length")
    own_stack.gateway.stop()  # SIGTERM: a clean stop
    conn = page.locator("#conn")
    # While it is away the page says so, and the header tells the gateway does not answer.
    expect(conn).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#gateway-status")).to_have_text("unreachable")
    expect(page.locator("#backlog-line")).to_contain_text("the states above are the last known")
    shot("down")
    own_stack.gateway.start()  # the same port and database
    expect(conn).to_have_attribute("data-state", "resumed", timeout=60_000)
    expect(conn).to_contain_text("The gateway restarted; resumed after event #")
    expect(page.locator("#components-panel")).not_to_have_class(re.compile(r"\boutdated\b"))
    # Events keep coming after the restart (the simulator publishes on; the broker kept them).
    page.wait_for_function("n => window.gatewayDashboard.eventIds.length >= n + 10", arg=before, timeout=60_000)
    ids = page.evaluate("window.gatewayDashboard.eventIds")
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"gap or repeat in event ids: {ids}"
    assert page.evaluate("window.gatewayDashboard.resumes") >= 1
    shot("resumed")
