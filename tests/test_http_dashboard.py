"""The dashboard is served entirely from the package: its page names only same-origin assets, each
is served with the right content type under the page CSP, and the chart library is pinned with its
licence. (What the page does is tested in a real browser: tests/browser.)"""

from __future__ import annotations

from tests.support.http import ApiServer


def test_vendored_chart_library_is_pinned_with_its_licence() -> None:
    from gateway.http.dashboard import _STATIC, UPLOT_VERSION

    root = _STATIC / "vendor" / "uplot"
    assert f"uplot {UPLOT_VERSION}" in root.joinpath("VERSION").read_text()
    assert "MIT License" in root.joinpath("LICENSE").read_text()


async def test_dashboard_assets_are_served_from_the_package(api: ApiServer) -> None:
    async with api.client() as c:
        page = (await c.get("/")).text
        assert page.startswith("<!doctype html>")
        for path, kind in [
            ("/dashboard.js", "text/javascript"),
            ("/dashboard.css", "text/css"),
            ("/favicon.svg", "image/svg+xml"),
            ("/favicon.ico", "image/svg+xml"),
            ("/vendor/uplot/uPlot.iife.min.js", "text/javascript"),
            ("/vendor/uplot/uPlot.min.css", "text/css"),
        ]:
            if path != "/favicon.ico":
                assert f'"{path}"' in page, path  # the page names it, same-origin
            r = await c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
            assert "default-src 'none'" in r.headers["content-security-policy"]
        assert b"uPlot" in (await c.get("/vendor/uplot/uPlot.iife.min.js")).content
        assert 'href="favicon.svg"' in (await c.get("/docs")).text
