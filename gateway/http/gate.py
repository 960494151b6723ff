"""Per-request policy, one implementation for the Quart hooks and the raw ASGI routes: request ids,
who is calling and whether the rate limit lets them, the headers every response carries, and the
metrics and access log line of every request.

Framework-free (plain strings and mappings), so the raw fast path (:mod:`gateway.http.fast`) and
Quart's ``before_request``/``after_request`` hooks apply exactly the same rules.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode

from gateway import metrics
from gateway.http.auth import Principal, authenticate, presented_key
from gateway.http.ratelimit import RateLimiter, address_bucket, client_address, parse_networks
from gateway.settings import HttpSettings

log = logging.getLogger("gateway.http")

# Query parameters whose values never reach the log.
_SECRET_PARAMS = ("access_token", "api_key", "key_token")
_EXPOSED = "X-Request-ID, ETag, Retry-After, WWW-Authenticate"  # the last: /ping's refused key
_ALLOWED_HEADERS = "X-API-Key, Authorization, Content-Type, Last-Event-ID, If-None-Match"


class HeaderSink(Protocol):
    """Response headers being built: Quart's ``Headers`` or a plain dict."""

    def __contains__(self, name: str, /) -> bool: ...

    def __setitem__(self, name: str, value: str, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Admission:
    """What the gate decided for one request: its id and start, the key presented (if any), the
    caller it names (None: anonymous or invalid) and how long to wait when over the limit (0: go)."""

    request_id: str
    started: float
    key: str | None
    principal: Principal | None
    wait: float


class Gate:
    """The per-request rules of one app (one rate limiter, one request id sequence)."""

    def __init__(self) -> None:
        self.limiter = RateLimiter()
        # Request ids: a random per-process prefix and a counter (unique, and cheaper than uuid4).
        self._id_prefix = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)
        # Prometheus children per label set, looked up once (labels() costs more than inc()).
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latencies: dict[str, Any] = {}

    def request_id(self) -> str:
        """A new request id."""
        return f"{self._id_prefix}{next(self._ids):08x}"

    def admit(
        self,
        http: HttpSettings,
        started: float,
        *,
        x_api_key: str | None,
        authorization: str | None,
        access_token: str | None,
        peer: str | None,
        forwarded_for: Iterable[str],
    ) -> Admission:
        """Identify the caller and take one token from its bucket (its key's, else its address's).

        Comes before the body is read: a client over the limit costs no body buffering.
        """
        key = presented_key(x_api_key, authorization, access_token)
        principal = authenticate(key, http.api_keys) if key else None
        count, period = http.rate
        if principal is not None:
            wait = self.limiter.check_key(principal.name, count, period)
        else:
            address = client_address(peer, forwarded_for, parse_networks(http.trusted_proxies))
            wait = self.limiter.check_address(address_bucket(address), count, period)
        return Admission(self.request_id(), started, key, principal, wait)

    @staticmethod
    def finish_headers(
        headers: HeaderSink,
        http: HttpSettings,
        *,
        request_id: str,
        scheme: str,
        method: str,
        origin: str | None,
        status: int,
        body_unread: bool,
    ) -> None:
        """Add the headers every response carries (request id, security, caching, CORS)."""
        headers["X-Request-ID"] = request_id
        headers["X-Content-Type-Options"] = "nosniff"
        if scheme == "https":
            # Browsers keep to HTTPS for this host for a year (only sent over TLS, as RFC 6797 asks).
            headers["Strict-Transport-Security"] = "max-age=31536000"
        if "Cache-Control" not in headers:
            headers["Cache-Control"] = "no-store"
        if origin and origin in http.cors_origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
            headers["Access-Control-Expose-Headers"] = _EXPOSED
            if method == "OPTIONS":
                headers["Access-Control-Allow-Methods"] = "GET, POST"
                headers["Access-Control-Allow-Headers"] = _ALLOWED_HEADERS
                headers["Access-Control-Max-Age"] = "600"
        if status >= 400 and body_unread:
            # The body may be unread: hypercorn (h11) hangs the connection when the rest of a body
            # arrives after the response, so end the connection instead of keeping it alive.
            headers["Connection"] = "close"

    def record(
        self,
        *,
        route: str,
        method: str,
        status: int,
        elapsed: float,
        principal: Principal | None,
        request_id: str,
        path: str,
        query_string: bytes,
    ) -> None:
        """Count the request and log its access line.

        Labels come from fixed sets only (h11 accepts any token as a method, and paths are the
        client's): ``route`` is the route template or "unmatched", the method a known one or "other".
        """
        method_label = metrics.method_label(method)
        counter = self._counters.get((route, method_label, status))
        if counter is None:
            counter = metrics.HTTP_REQUESTS.labels(route, method_label, str(status))
            self._counters[(route, method_label, status)] = counter
        counter.inc()
        latency = self._latencies.get(route)
        if latency is None:
            latency = self._latencies[route] = metrics.HTTP_LATENCY.labels(route)
        latency.observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d %.1fms key=%s rid=%s",
                method,
                loggable_path(path, query_string),
                status,
                elapsed * 1000,
                principal.name if principal else "-",
                request_id,
            )


def loggable_path(path: str, query_string: bytes) -> str:
    """The request path and query with secrets (``access_token``) masked.

    The decoded path is percent-encoded again (``%0a``, spaces, quotes), so it stays one field of
    one line and cannot imitate the status or key that follow it.
    """
    quoted = quote(path, safe="/!$&'()*+,;=:@-._~")
    if not query_string:
        return quoted
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    masked = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
    return f"{quoted}?{urlencode(masked)}"
