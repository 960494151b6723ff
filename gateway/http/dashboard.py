"""The live dashboard: one static page, its script and stylesheet, a favicon and a vendored chart
library (uPlot, pinned: see ``static/vendor/uplot/VERSION``). No build step, no external CDN.

The page asks for an API key (kept in the browser's sessionStorage), reads ``/api/v1/ping``,
``/api/v1/latest``, ``/api/v1/messages``, ``/api/v1/rejects`` and ``/metrics``, and follows
``/api/v1/events?access_token=…`` with EventSource. It is also the reference client of the API.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from quart import Quart, Response

_STATIC = files("gateway.http") / "static"
UPLOT_VERSION = "1.6.32"
_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"
_SVG = "image/svg+xml"
# URL path → (file under static/, content type, Cache-Control). The page and its own script change
# with every release and are revalidated; the pinned library is cacheable for a day.
_FILES: dict[str, tuple[str, str, str]] = {
    "/": ("dashboard.html", "text/html; charset=utf-8", "no-cache"),
    "/dashboard.js": ("dashboard.js", _JS, "no-cache"),
    "/dashboard.css": ("dashboard.css", _CSS, "no-cache"),
    "/favicon.svg": ("favicon.svg", _SVG, "public, max-age=86400"),
    "/favicon.ico": ("favicon.svg", _SVG, "public, max-age=86400"),  # what browsers ask for unprompted
    "/vendor/uplot/uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", _JS, "public, max-age=86400"),
    "/vendor/uplot/uPlot.min.css": ("vendor/uplot/uPlot.min.css", _CSS, "public, max-age=86400"),
}


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


@cache
def _read(name: str) -> bytes:
    return _STATIC.joinpath(name).read_bytes()


def _view(path: str) -> Response:
    name, content_type, cache_control = _FILES[path]
    return static_response(name, content_type, cache=cache_control, body=_read(name))


def register(app: Quart) -> None:
    """Add the dashboard routes (hidden from the OpenAPI description: they are not API)."""
    from quart_schema import hide

    for path in _FILES:

        async def view(path: str = path) -> Response:
            return _view(path)

        endpoint = "dashboard" if path == "/" else "dashboard_" + path.strip("/").replace("/", "_").replace(".", "_")
        app.add_url_rule(path, endpoint, hide(view), methods=["GET"])
