"""Pure parts of the HTTP layer: the token-bucket limiter and the message-page cache."""

from __future__ import annotations

from gateway.http.cache import LiveView
from gateway.http.ratelimit import RateLimiter, retry_after_header


def test_token_bucket_burst_refill_and_retry_after() -> None:
    limiter = RateLimiter()
    assert [limiter.check("a", 3, 60.0, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check("a", 3, 60.0, now=0.0)
    assert wait == 20.0 and retry_after_header(wait) == "20"
    assert limiter.check("b", 3, 60.0, now=0.0) == 0.0  # separate identity, separate bucket
    assert limiter.check("a", 3, 60.0, now=19.0) > 0
    assert limiter.check("a", 3, 60.0, now=20.0) == 0.0  # one token refilled after 20 s
    assert retry_after_header(0.01) == "1"


def test_new_limit_resets_buckets_and_identities_are_bounded() -> None:
    limiter = RateLimiter(max_identities=100)
    limiter.check("a", 1, 60.0, now=0.0)
    assert limiter.check("a", 1, 60.0, now=0.0) > 0
    assert limiter.check("a", 2, 60.0, now=0.0) == 0.0  # reload with a new limit
    for i in range(1000):
        limiter.check(f"ip{i}", 2, 60.0, now=float(i))
    assert len(limiter._buckets) <= 101


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
