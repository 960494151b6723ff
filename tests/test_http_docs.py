"""``/docs`` is served entirely from the package: the page names only same-origin assets, each is
served with the right content type, and the CSP allows nothing from elsewhere."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

from gateway.errors import ProblemCode
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


async def test_openapi_problem_lists_the_stable_codes(api: ApiServer) -> None:
    """``Problem.code`` is the enum of every code the API answers with (from ProblemCode), and the
    members some codes add are described; every error response of every operation refers to it."""
    async with api.client() as c:
        spec = (await c.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    problem = schemas["Problem"]
    code = problem["properties"]["code"]
    assert code["$ref"] == "#/components/schemas/ProblemCode"
    assert schemas["ProblemCode"]["enum"] == [c.value for c in ProblemCode]
    assert "| `query_timeout` | 503 |" in code["description"]  # the table of codes and statuses
    for member in ("errors", "reason", "parameter", "variable", "limit"):
        assert problem["properties"][member]["description"], member
    assert schemas["FieldError"]["required"] == ["loc", "msg", "type"]
    assert "``" not in json.dumps(problem) + json.dumps(schemas["ProblemCode"])  # Markdown, not reST
    refs = {
        (path, method, status): response["content"].get("application/problem+json", {}).get("schema")
        for path, item in spec["paths"].items()
        for method, op in item.items()
        for status, response in op["responses"].items()
        if int(status) >= 400
    }
    del refs["/api/v1/ping", "get", "503"]  # a Ping body: "starting"
    assert len(refs) > 20 and all(r == {"$ref": "#/components/schemas/Problem"} for r in refs.values()), refs
    # Each error response names the codes the operation answers with at that status.
    events, messages = spec["paths"]["/api/v1/events"]["get"], spec["paths"]["/api/v1/messages"]["get"]
    assert events["responses"]["429"]["description"] == "Too many requests: `too_many_streams`, `rate_limited`"
    assert messages["responses"]["503"]["description"].endswith(": `db_unavailable`, `query_timeout`")
    assert messages["responses"]["401"]["description"].endswith(": `auth_missing`, `auth_invalid`")


async def test_openapi_gives_each_operations_role_timestamps_as_date_time_and_markdown(api: ApiServer) -> None:
    async with api.client() as c:
        spec = (await c.get("/openapi.json")).json()
    expected = {
        ("/api/v1/ping", "get"): "none",
        ("/api/v1/messages", "get"): "read",
        ("/api/v1/events", "get"): "read",
        ("/api/v1/packets", "post"): "write",
        ("/api/v1/rereadenv", "post"): "admin",
    }
    roles = {
        (path, method): op["x-required-role"] for path, item in spec["paths"].items() for method, op in item.items()
    }
    assert expected.items() <= roles.items() and set(roles.values()) <= {"none", "read", "write", "admin"}
    for (path, method), role in roles.items():
        op = spec["paths"][path][method]
        wanted = "**Role:** none" if role == "none" else f"**Role:** `{role}`"
        assert op["description"].startswith(wanted), (path, method)
        assert (op["security"] == []) == (role == "none"), (path, method)
    # Markdown everywhere, no reStructuredText literals (the docstrings have them).
    assert "``" not in json.dumps(spec)
    assert "`cause`" in spec["paths"]["/api/v1/ping"]["get"]["description"]
    # Every time is a date-time: body fields and query parameters.
    schemas = spec["components"]["schemas"]

    def formats(prop: dict[str, Any]) -> set[str | None]:
        return {b.get("format") for b in prop.get("anyOf", [prop]) if b.get("type") != "null"}

    for model, fields in {
        "MessageItem": ("timestamp", "received_at", "processed_at"),
        "Reading": ("timestamp", "received_at"),
        "RejectItem": ("received_at",),
        "Ping": ("time",),
    }.items():
        for name in fields:
            assert formats(schemas[model]["properties"][name]) == {"date-time"}, (model, name)
    assert schemas["Latest"]["properties"]["devices"]["additionalProperties"] == {
        "$ref": "#/components/schemas/Reading"
    }
    params = {p["name"]: p for p in spec["paths"]["/api/v1/messages"]["get"]["parameters"]}
    for name in ("start_time", "end_time"):
        assert formats(params[name]["schema"]) == {"date-time"}, name
    # /ping documents the header a refused key gets.
    ping_ok = spec["paths"]["/api/v1/ping"]["get"]["responses"]["200"]
    assert "invalid_token" in ping_ok["headers"]["WWW-Authenticate"]["description"]
