"""``GET /docs``: Swagger UI served from the package (a pinned swagger-ui-dist build, see
``static/swagger-ui/VERSION``), so the page where people paste keys loads nothing from elsewhere and
works offline. A strict CSP allows only same-origin scripts, styles and requests.
"""

from __future__ import annotations

from functools import cache

from quart import Quart, Response

from gateway.http.dashboard import _STATIC, static_response

DOCS_ASSET_VERSION = "5.35.0"
# Swagger UI sets inline styles and uses data: images; scripts and requests stay same-origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}


@cache
def _asset(name: str) -> bytes:
    return _STATIC.joinpath("swagger-ui", name).read_bytes()


async def docs_page() -> Response:
    """The docs page."""
    return static_response("docs.html", "text/html; charset=utf-8", csp=DOCS_CSP)


async def docs_js() -> Response:
    """The script that starts Swagger UI on ``/openapi.json``."""
    return static_response("docs.js", "text/javascript; charset=utf-8", csp=DOCS_CSP)


def _asset_view(name: str) -> Response:
    # Pinned files that change only with the package: cacheable for a day.
    return static_response(name, _ASSETS[name], csp=DOCS_CSP, cache="public, max-age=86400", body=_asset(name))


async def swagger_js() -> Response:
    """Swagger UI's bundle."""
    return _asset_view("swagger-ui-bundle.js")


async def swagger_css() -> Response:
    """Swagger UI's stylesheet."""
    return _asset_view("swagger-ui.css")


def register(app: Quart) -> None:
    """Add the docs routes (hidden from the OpenAPI description: they are not API)."""
    from quart_schema import hide

    app.add_url_rule("/docs", "docs", hide(docs_page), methods=["GET"])
    app.add_url_rule("/docs/docs.js", "docs_js", hide(docs_js), methods=["GET"])
    app.add_url_rule("/docs/swagger-ui-bundle.js", "swagger_js", hide(swagger_js), methods=["GET"])
    app.add_url_rule("/docs/swagger-ui.css", "swagger_css", hide(swagger_css), methods=["GET"])
