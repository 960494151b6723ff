"""``/docs`` is served entirely from the package: the page names only same-origin assets, each is
served with the right content type, and the CSP allows nothing from elsewhere."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

from gateway.http.docs import DOCS_ASSET_VERSION
from tests.support.http import ApiServer


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, value))


async def test_docs_page_uses_only_same_origin_assets(api: ApiServer) -> None:
    async with api.client() as c:
        page = await c.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
        assert "http" not in csp and "*" not in csp and "unsafe-eval" not in csp
        assert "<script>" not in page.text  # no inline script: the CSP would block it
        parser = _Refs()
        parser.feed(page.text)
        assert {tag for tag, _ in parser.refs} == {"link", "script"}
        base = str(page.url)
        kinds = {}
        for _tag, ref in parser.refs:
            url = urljoin(base, ref)
            assert urlsplit(url).netloc == urlsplit(base).netloc, ref  # same origin
            r = await c.get(url)
            assert r.status_code == 200, url
            kinds[ref.rsplit("/", 1)[-1]] = r.headers["content-type"]
            assert "nosniff" in r.headers["x-content-type-options"]
        assert kinds["swagger-ui.css"].startswith("text/css")
        assert kinds["swagger-ui-bundle.js"].startswith("text/javascript")
        assert kinds["docs.js"].startswith("text/javascript")
        init = (await c.get(urljoin(base, "docs/docs.js"))).text
        assert re.search(r'url: "openapi.json"', init) and "validatorUrl: null" in init
        assert "http://" not in init and "https://" not in init
        bundle = await c.get(urljoin(base, "docs/swagger-ui-bundle.js"))
        assert len(bundle.content) > 1_000_000 and b"SwaggerUIBundle" in bundle.content
        # The description it loads is there too (relative to the page).
        assert (await c.get(urljoin(base, "openapi.json"))).status_code == 200


def test_vendored_build_is_pinned_with_its_licence() -> None:
    from gateway.http.dashboard import _STATIC

    root = _STATIC / "swagger-ui"
    assert f"swagger-ui-dist {DOCS_ASSET_VERSION}" in root.joinpath("VERSION").read_text()
    assert "Apache License" in root.joinpath("LICENSE").read_text()
    assert root.joinpath("NOTICE").is_file()
