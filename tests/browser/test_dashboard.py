"""The dashboard in a real browser against a real gateway process fed by ``gateway simulate``.

Every wait is on a condition in the page (Playwright's auto-waiting ``expect`` and
``wait_for_function``), never a fixed sleep, so the tests hold under load.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import expect

from tests.browser.stack import Stack


def connect(page: Any, stack: Stack, key: str | None = None) -> None:
    """Open the dashboard and enter ``key`` (the stack's read key by default)."""
    page.goto(stack.url + "/")
    page.fill("#key", key if key is not None else stack.key)
    page.click("#keyform button")


def test_page_is_html5_with_favicon(page: Any, stack: Stack) -> None:
    response = page.goto(stack.url + "/")
    assert response.status == 200
    assert page.evaluate("document.compatMode") == "CSS1Compat"  # a <!doctype html> page
    icon = page.locator("link[rel=icon]").get_attribute("href")
    favicon = page.request.get(stack.url + icon)
    assert favicon.status == 200 and favicon.headers["content-type"].startswith("image/svg+xml")
    assert page.request.get(stack.url + "/favicon.ico").status == 200


def test_before_a_key_the_page_shows_ping(page: Any, stack: Stack, shot: Any) -> None:
    page.goto(stack.url + "/")
    expect(page.locator("#gateway-status")).to_have_text("ok")
    expect(page.locator("#gateway-summary")).to_contain_text("gateway time")
    expect(page.locator("#conn")).to_contain_text("Not connected")
    expect(page.locator("#welcome")).to_be_visible()
    expect(page.locator("#fleet-view")).to_be_hidden()
    shot("no-key")


def test_device_cards_appear_and_their_values_change(page: Any, stack: Stack, shot: Any) -> None:
    connect(page, stack)
    expect(page.locator("#conn")).to_contain_text("Live")
    cards = page.locator(".card")
    expect(cards).to_have_count(4)
    card = page.locator('.card[data-device="sensor-0001"]')
    expect(card.locator(".status")).to_have_text(re.compile("ok|warning|error|maintenance"))
    expect(card.locator(".battery-text")).to_have_text(re.compile(r"\d+ %"))
    expect(card.locator(".seen")).to_contain_text("ago")
    value = card.locator('[data-measure="temperature"] .value')
    expect(value).to_contain_text("°C")
    # A new reading arrives over SSE: the value (or, if equal, the card's seq) changes.
    before = card.evaluate("c => c.querySelector('.value').textContent + c.querySelector('.seen').title")
    page.wait_for_function(
        "([id, before]) => { const c = document.querySelector(`.card[data-device='${id}']`);"
        " return c.querySelector('.value').textContent + c.querySelector('.seen').title !== before; }",
        arg=["sensor-0001", before],
    )
    shot("fleet")


def test_sparkline_and_health_charts_draw(page: Any, stack: Stack, shot: Any) -> None:
    connect(page, stack)
    spark = page.locator('.card[data-device="sensor-0001"] [data-measure="temperature"] canvas')
    page.wait_for_function("c => c.width > 0", arg=spark.element_handle())
    wait_for_ink(page, spark)
    # The ingest chart needs two /metrics polls for a rate: its canvas gets a line.
    ingest = page.locator("#ingest-chart canvas")
    wait_for_ink(page, ingest)
    expect(page.locator("#ingest-now")).to_contain_text("stored/s")
    expect(page.locator('#components li[data-component="mqtt"]')).to_contain_text(re.compile(r"up \d+\s(s|min)"))
    shot("health")


def test_device_page_charts_each_measurement(page: Any, stack: Stack, shot: Any) -> None:
    connect(page, stack)
    page.locator('.card[data-device="sensor-0002"] .card-head a').click()
    expect(page).to_have_url(re.compile("#/device/sensor-0002$"))
    expect(page.locator("#device-title")).to_have_text("sensor-0002")
    panel = page.locator('.chart-panel[data-measure="temperature"]')
    expect(panel.locator("h3")).to_have_text("temperature (°C)")
    wait_for_ink(page, panel.locator("canvas"))
    expect(page.locator("#device-note")).to_contain_text("reading")
    rows = page.locator("#readings-body tr")
    expect(rows.first).to_be_visible()
    # Followed live: newer readings arrive over SSE and go on top of the table.
    top = rows.first.text_content()
    page.wait_for_function("t => document.querySelector('#readings-body tr').textContent !== t", arg=top)
    page.select_option("#window", "900")
    expect(page.locator("#device-note")).to_contain_text(re.compile(r"last 15\smin"))
    wait_for_ink(page, panel.locator("canvas"))
    shot("device")


def test_rejects_panel_shows_a_reject(page: Any, stack: Stack, shot: Any) -> None:
    connect(page, stack)
    expect(page.locator("#reject-reasons li").first).not_to_have_class("none")
    expect(page.locator("#rejects-total")).to_have_text(re.compile(r"^[1-9]\d*\+?$"))
    first = page.locator("#reject-list li").first
    expect(first).to_contain_text("sensors/")  # the topic it came on
    expect(first.locator(".why")).not_to_be_empty()
    first.locator("summary").click()
    expect(first.locator("pre")).to_be_visible()
    shot("rejects")


def test_wrong_key_says_key_refused(page: Any, stack: Stack, shot: Any) -> None:
    connect(page, stack, key="not-a-key")
    conn = page.locator("#conn")
    expect(conn).to_contain_text("Key refused")
    expect(conn).to_have_attribute("data-state", "refused")
    expect(conn).not_to_contain_text("reconnecting")
    expect(page.locator("#gateway-status")).to_have_text("ok")  # /ping still shown
    shot("key-refused")


def test_docs_render_with_the_network_blocked(page: Any, stack: Stack, shot: Any) -> None:
    host = urlsplit(stack.url).netloc
    blocked: list[str] = []

    def only_the_gateway(route: Any) -> None:
        if urlsplit(route.request.url).netloc == host:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_gateway)
    page.goto(stack.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("ensor gateway")
    expect(page.locator(".opblock").first).to_be_visible()
    assert page.evaluate("document.compatMode") == "CSS1Compat"
    shot("docs-offline")
    assert blocked == [], f"/docs asked for something outside the gateway: {blocked}"


def wait_for_ink(page: Any, canvas: Any) -> None:
    """Wait until the canvas has drawn a data line: coloured pixels, not only the grey axes and grid."""
    page.wait_for_function(
        """c => { if (!c || !c.width || !c.height) return false;
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 let coloured = 0;
                 for (let i = 0; i < d.length; i += 4) {
                   const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
                   if (a > 128 && Math.max(r, g, b) - Math.min(r, g, b) > 80) coloured++;
                 }
                 return coloured >= 20; }""",
        arg=canvas.element_handle(),
    )
