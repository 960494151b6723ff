"""The live dashboard: one static page and its script, no external CDN.

The page asks for an API key (kept in the browser's sessionStorage), reads ``/api/v1/ping`` and
``/api/v1/latest``, and follows ``/api/v1/events?access_token=…`` with EventSource.
"""

from __future__ import annotations

from importlib.resources import files

from quart import Quart, Response

_STATIC = files("gateway.http") / "static"
_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_response(
    name: str, content_type: str, *, csp: str = _CSP, cache: str = "no-cache", body: bytes | None = None
) -> Response:
    """A file from ``gateway/http/static`` (or ``body``) with the page headers: CSP, no referrer, no framing."""
    response = Response(_STATIC.joinpath(name).read_bytes() if body is None else body, content_type=content_type)
    response.headers["Content-Security-Policy"] = csp
    response.headers["Cache-Control"] = cache
    # The page puts the key in the EventSource URL: never leak it in a Referer; never framed.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


async def dashboard() -> Response:
    """The dashboard page."""
    return static_response("dashboard.html", "text/html; charset=utf-8")


async def dashboard_js() -> Response:
    """The dashboard's script."""
    return static_response("dashboard.js", "text/javascript; charset=utf-8")


def register(app: Quart) -> None:
    """Add the dashboard routes (hidden from the OpenAPI description: they are not API)."""
    from quart_schema import hide

    app.add_url_rule("/", "dashboard", hide(dashboard), methods=["GET"])
    app.add_url_rule("/dashboard.js", "dashboard_js", hide(dashboard_js), methods=["GET"])
