"""Pure parts of the HTTP layer: the message-page cache (the limiter: test_http_ratelimit.py)."""

from __future__ import annotations

from gateway.http.cache import LiveView


def test_cache_generation_ttl_and_latest() -> None:
    live = LiveView(ttl=1000.0, max_entries=2)
    gen = live.generation
    cached = live.put("q1", gen, b"body")
    assert live.get("q1") == cached and cached.etag.startswith('"')
    live.stored([{"device_id": "d1", "seq": 1}, {"device_id": "d1", "seq": 2}, {"device_id": "d0"}])
    assert live.get("q1") is None  # a commit invalidates
    assert live.latest() == {"d0": {"device_id": "d0"}, "d1": {"device_id": "d1", "seq": 2}}
    # A page read before a commit is not cached after it (it may be stale).
    old = live.generation
    live.invalidate()
    live.put("q2", old, b"stale")
    assert live.get("q2") is None
    for k in ("a", "b", "c"):
        live.put(k, live.generation, k.encode())
    assert live.get("a") is None and live.get("c") is not None  # bounded, oldest evicted
    expired = LiveView(ttl=0.0)
    expired.put("q", expired.generation, b"x")
    assert expired.get("q") is None
