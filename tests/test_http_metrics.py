"""``/metrics`` stays small whatever clients send: HTTP labels come from fixed sets only."""

from __future__ import annotations

import re
from urllib.parse import quote

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.http import create_app
from gateway.metrics import HTTP_METHODS, UNMATCHED_ROUTE
from tests.support.http import ApiServer

# Every character h11 accepts in a method token (RFC 9110 tchar).
TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LINE = re.compile(r'^gateway_http_requests_total\{method="([^"]*)",route="([^"]*)",status="([^"]*)"\}', re.M)


async def _metrics(server: ApiServer) -> str:
    async with server.client("read") as c:
        r = await c.get("/metrics")
    assert r.status_code == 200
    return r.text


async def test_random_methods_and_paths_keep_labels_bounded(api: ApiServer) -> None:
    before = await _metrics(api)
    seen: list[tuple[str, str]] = []

    # Hypothesis drives a blocking client from a worker thread while Trio serves the API.
    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        method=st.text(alphabet=TCHAR, min_size=1, max_size=24),
        path=st.one_of(
            st.text(min_size=0, max_size=60).map(lambda s: "/" + quote(s, safe="/")),
            st.sampled_from(["/api/v1/ping", "/api/v1/packets", "/metrics"]).map(lambda p: p + "/x"),
        ),
    )
    def probe(method: str, path: str) -> None:
        with httpx.Client(base_url=api.url, timeout=10) as c:
            r = c.request(method, path)
        assert r.status_code < 500, (method, path, r.status_code)
        seen.append((method, path))

    await trio.to_thread.run_sync(probe)
    assert len({m for m, _ in seen}) > 200  # many distinct methods really were sent
    after = await _metrics(api)

    labels = _LINE.findall(after)
    methods = {m for m, _, _ in labels}
    routes = {r for _, r, _ in labels}
    assert methods <= HTTP_METHODS | {"other"}, sorted(methods - HTTP_METHODS)[:10]
    templates = {rule.rule for rule in create_app(api.ctx).url_map.iter_rules()}
    assert routes <= templates | {UNMATCHED_ROUTE}, sorted(routes - templates)[:10]
    statuses = {s for _, _, s in labels}
    assert len(statuses) <= 20, statuses  # the codes the app answers with (other tests add some)
    # A handful of new series at most, not one per method or path.
    assert len(after) - len(before) < 8_000, len(after) - len(before)
