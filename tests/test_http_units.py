"""Pure parts of the HTTP layer: the message-page cache (the limiter: test_http_ratelimit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ApiError, ProblemCode
from gateway.http import cache
from gateway.http.cache import PageCache
from gateway.http.query import BUILTIN_EVENT_TYPES, event_types, parse_types
from gateway.rules import default_rules, load_rules


def test_cache_generation_ttl_and_bound() -> None:
    live = PageCache(ttl=1000.0, max_entries=2)
    gen = live.generation
    cached = live.put("q1", gen, b"body")
    assert live.get("q1") == cached and cached.etag.startswith('"')
    live.clear()
    assert live.get("q1") is None  # an API commit drops every page
    # A page read before a commit is not cached after it (it may be stale).
    old = live.generation
    live.invalidate()
    live.put("q2", old, b"stale")
    assert live.get("q2") is None
    for k in ("a", "b", "c"):
        live.put(k, live.generation, k.encode())
    assert live.get("a") is None and live.get("c") is not None  # bounded, oldest evicted
    expired = PageCache(ttl=0.0)
    expired.put("q", expired.generation, b"x")
    assert expired.get("q") is None


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_ingest_commits_hide_rows_at_most_max_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(cache, "time", clock)
    live = PageCache(ttl=10.0, max_stale=0.5)
    live.put("q", live.generation, b"page")
    live.invalidate()  # an ingest commit: the page may lag it, but for 0.5 s at most
    clock.now += 0.4
    assert live.get("q") is not None
    clock.now += 0.1
    assert live.get("q") is None
    # Without commits a page lives ttl; past half its life the next request rebuilds it.
    live.put("q", live.generation, b"page")
    clock.now += 4.9
    assert live.lookup("q") == (live.get("q"), False)
    clock.now += 0.2
    cached, refresh = live.lookup("q")
    assert cached is not None and refresh
    build = live.begin("q")
    assert live.building("q") is build and live.lookup("q")[1] is False  # one rebuild at a time
    clock.now += 0.1
    rebuilt = live.put("q", build.generation, b"new", started=build.started)
    live.end("q", build)
    assert build.done.is_set() and live.building("q") is None and live.get("q") == rebuilt


def test_a_read_begun_before_a_commit_is_cached_only_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(cache, "time", clock)
    live = PageCache(ttl=10.0, max_stale=0.5)
    build = live.begin("q")
    live.invalidate()  # committed while the page was read: it may miss that row
    clock.now += 0.2
    live.put("q", build.generation, b"a", started=build.started)
    live.end("q", build)
    assert live.get("q") is not None
    clock.now += 0.3  # 0.5 s after the read began
    assert live.get("q") is None
    # An API write (clear) during a read: that page is never cached (read-your-writes).
    build = live.begin("q")
    live.clear()
    live.put("q", build.generation, b"b", started=build.started)
    live.end("q", build)
    assert live.get("q") is None
    clock.now += 0.01
    live.put("q", live.generation, b"c")
    assert live.get("q") is not None


def test_event_types_are_the_builtin_ones_and_each_sse_actions(tmp_path: Path) -> None:
    assert event_types(default_rules()) == BUILTIN_EVENT_TYPES == {"packet", "alert", "reset"}
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "hot"\nactions = [{ type = "sse", event = "overheat" }, { type = "mqtt" }]\n',
        encoding="utf-8",
    )
    assert event_types(load_rules(rules)) == {"packet", "alert", "reset", "overheat"}
    assert parse_types("overheat,packet", frozenset({"packet", "overheat"})) == {"packet", "overheat"}
    with pytest.raises(ApiError) as refused:
        parse_types(",".join(["packet"] * 17), BUILTIN_EVENT_TYPES)
    assert refused.value.code == ProblemCode.QUERY_INVALID
