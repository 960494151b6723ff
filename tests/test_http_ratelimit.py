"""The rate limiter: token buckets per key and per client address, eviction that no identity churn can
abuse, trusted proxies, and the limit checked before a body is read (over a real socket)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.http import ratelimit
from gateway.http.ratelimit import RateLimiter, address_bucket, client_address, parse_networks, retry_after_header
from gateway.settings import load_settings
from tests.support.http import ApiServer

Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]

# ---- the buckets (pure) -------------------------------------------------------------------------


def test_token_bucket_burst_refill_and_retry_after() -> None:
    limiter = RateLimiter()
    assert [limiter.check_address("a", 3, 60.0, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check_address("a", 3, 60.0, now=0.0)
    assert wait == 20.0 and retry_after_header(wait) == "20"
    assert limiter.check_address("b", 3, 60.0, now=0.0) == 0.0  # separate address, separate bucket
    assert limiter.check_key("a", 3, 60.0, now=0.0) == 0.0  # a key named like an address: separate
    assert limiter.check_address("a", 3, 60.0, now=19.0) > 0
    assert limiter.check_address("a", 3, 60.0, now=20.0) == 0.0  # one token refilled after 20 s
    assert retry_after_header(0.01) == "1"


def test_new_limit_resets_buckets() -> None:
    limiter = RateLimiter()
    limiter.check_address("a", 1, 60.0, now=0.0)
    limiter.check_key("k", 1, 60.0, now=0.0)
    assert limiter.check_address("a", 1, 60.0, now=0.0) > 0 and limiter.check_key("k", 1, 60.0, now=0.0) > 0
    assert limiter.check_address("a", 2, 60.0, now=0.0) == 0.0  # reload with a new limit
    assert limiter.check_key("k", 2, 60.0, now=0.0) == 0.0


@given(
    capacity=st.integers(min_value=1, max_value=20),
    count=st.integers(min_value=1, max_value=5),
    victims=st.integers(min_value=1, max_value=5),
    churn=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=0.999), st.integers(min_value=0, max_value=200)), max_size=300
    ),
)
def test_cycling_addresses_never_resets_a_drained_bucket(
    capacity: int, count: int, victims: int, churn: list[tuple[float, int]]
) -> None:
    """Victims (an attacker's own address, a key) drain their buckets at t=0; then anything from other
    addresses, before one token could refill, must leave every drained bucket drained."""
    period = float(count)  # one token per second: nothing refills before t=1
    limiter = RateLimiter(max_addresses=capacity)
    names = [f"victim{i}" for i in range(min(victims, capacity))]
    for name in names:
        for _ in range(count):
            assert limiter.check_address(name, count, period, now=0.0) == 0.0
            assert limiter.check_key(name, count, period, now=0.0) == 0.0
    for t, who in sorted(churn):
        limiter.check_address(f"other{who}", count, period, now=t)
        assert limiter.addresses <= capacity
        for name in names:
            assert limiter.check_address(name, count, period, now=t) > 0, (name, t)
            assert limiter.check_key(name, count, period, now=t) > 0, (name, t)


def test_full_buckets_are_forgotten_and_a_flood_shares_one_bucket() -> None:
    limiter = RateLimiter(max_addresses=3)
    for i in range(3):
        limiter.check_address(f"a{i}", 2, 2.0, now=0.0)
    # All three active within the period: a new address shares the overflow bucket (2 tokens).
    assert [limiter.check_address(f"new{i}", 2, 2.0, now=0.5) for i in range(3)][:2] == [0.0, 0.0]
    assert limiter.check_address("new9", 2, 2.0, now=0.5) > 0
    assert limiter.addresses == 3
    # Once the oldest has refilled, it is forgotten and the new address gets its own bucket.
    assert limiter.check_address("late", 2, 2.0, now=2.0) == 0.0
    assert limiter.check_address("late", 2, 2.0, now=2.0) == 0.0
    assert limiter.check_address("late", 2, 2.0, now=2.0) > 0


def test_each_new_address_costs_constant_time_at_capacity() -> None:
    """The old limiter scanned every bucket for each new identity past capacity (quadratic)."""
    limiter = RateLimiter(max_addresses=5_000)
    for i in range(5_000):
        limiter.check_address(f"warm{i}", 10, 60.0, now=0.0)
    start = time.perf_counter()
    for i in range(30_000):
        limiter.check_address(f"new{i}", 10, 60.0, now=1.0 + i * 1e-6)
    elapsed = time.perf_counter() - start
    assert limiter.addresses == 5_000
    assert elapsed < 1.0, f"{elapsed:.2f}s for 30,000 new addresses"


# ---- who the client is (pure) ---------------------------------------------------------------------

TRUSTED = parse_networks(("127.0.0.1/32", "10.0.0.0/8", "fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "client"),
    [
        ("203.0.113.9", ["198.51.100.1"], TRUSTED, "203.0.113.9"),  # untrusted peer: header ignored
        ("127.0.0.1", ["198.51.100.1"], (), "127.0.0.1"),  # no trusted proxies configured
        ("127.0.0.1", ["198.51.100.1"], TRUSTED, "198.51.100.1"),
        ("127.0.0.1", ["6.6.6.6, 198.51.100.1, 10.1.2.3"], TRUSTED, "198.51.100.1"),  # rightmost untrusted
        ("127.0.0.1", ["6.6.6.6", "198.51.100.1, 10.1.2.3"], TRUSTED, "198.51.100.1"),  # several headers
        ("127.0.0.1", ["10.1.1.1, 10.2.2.2"], TRUSTED, "10.1.1.1"),  # all trusted: the leftmost
        ("127.0.0.1", ["198.51.100.1, garbage"], TRUSTED, "127.0.0.1"),  # malformed: stop at the proxy
        ("127.0.0.1", [], TRUSTED, "127.0.0.1"),
        ("::ffff:127.0.0.1", ["198.51.100.1"], TRUSTED, "198.51.100.1"),  # IPv4-mapped peer
        ("fd00::1", [" 2001:db8::5 "], TRUSTED, "2001:db8::5"),
        (None, ["198.51.100.1"], TRUSTED, "unknown"),
    ],
)
def test_client_address(peer: str | None, xff: list[str], trusted: tuple[object, ...], client: str) -> None:
    assert client_address(peer, xff, trusted) == client  # type: ignore[arg-type]


def test_address_bucket_groups_ipv6_by_64() -> None:
    assert address_bucket("198.51.100.7") == "198.51.100.7"
    assert address_bucket("2001:db8:1:2:aaaa::1") == address_bucket("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:3::1") != address_bucket("2001:db8:1:2::1")


# ---- over HTTP --------------------------------------------------------------------------------------


async def _status(server: ApiServer, role: str | None = None, xff: str | None = None) -> int:
    headers = {"X-Forwarded-For": xff} if xff else {}
    async with server.client(role, headers=headers) as c:
        return (await c.get("/api/v1/messages" if role else "/api/v1/ping")).status_code


async def test_address_churn_resets_neither_an_address_nor_a_key(
    api_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "MAX_ADDRESSES", 50)
    env = {"RATE_LIMIT": "2/minute", "HTTP_TRUSTED_PROXIES": "127.0.0.1"}
    async with api_factory(env=env) as server:
        attacker = "198.51.100.66"
        assert [await _status(server, xff=attacker) for _ in range(3)] == [200, 200, 429]
        assert [await _status(server, "read") for _ in range(3)] == [200, 200, 429]
        # 200 more addresses than the table holds, all within the period.
        async with server.client() as c:
            statuses = [
                (await c.get("/api/v1/ping", headers={"X-Forwarded-For": f"203.0.{i // 250}.{i % 250}"})).status_code
                for i in range(250)
            ]
        assert statuses.count(200) < 60  # the table's worth, then one shared overflow bucket
        assert await _status(server, xff=attacker) == 429  # its own bucket was not reset
        assert await _status(server, "read") == 429  # nor the key's
        r = await server.client().get("/api/v1/ping", headers={"X-Forwarded-For": attacker})
        assert r.status_code == 429 and r.json()["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1


async def test_forwarded_for_is_honoured_only_from_trusted_proxies(api_factory: Factory) -> None:
    async with api_factory(env={"RATE_LIMIT": "1/minute"}) as server:
        # Not trusted: a forged header does not buy a fresh bucket.
        assert await _status(server, xff="198.51.100.1") == 200
        assert await _status(server, xff="198.51.100.2") == 429
    env = {"RATE_LIMIT": "1/minute", "HTTP_TRUSTED_PROXIES": "127.0.0.0/8, 10.0.0.0/8"}
    async with api_factory(env=env) as server:
        assert await _status(server, xff="198.51.100.1, 10.0.0.7") == 200
        assert await _status(server, xff="198.51.100.2, 10.0.0.7") == 200  # another client
        # The client forges hops on the left: it is still 198.51.100.1.
        assert await _status(server, xff="1.1.1.1, 198.51.100.1, 10.0.0.7") == 429


async def test_limit_is_checked_before_the_body_is_read(api_factory: Factory) -> None:
    async with api_factory(env={"RATE_LIMIT": "1/minute"}) as server:
        assert await _status(server) == 200
        host, port = server.url.removeprefix("http://").split(":")
        sock = await trio.open_tcp_stream(host, int(port))
        async with sock:
            # Announce 60 KB, send ten bytes, then wait: the 429 must come without the rest.
            await sock.send_all(
                b"POST /api/v1/packets HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 60000\r\n\r\n{"device_"'
            )
            data = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in data:
                    chunk = await sock.receive_some(65536)
                    assert chunk, data
                    data += chunk
        head = data.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 429"), data
        assert b"connection: close" in head and b"retry-after:" in head


def test_trusted_proxies_setting_is_parsed_and_checked(tmp_path: Path) -> None:
    env = tmp_path / "gateway.env"
    env.write_text("HTTP_TRUSTED_PROXIES=10.1.2.3/8, ::1 ,192.168.0.1\n")
    assert load_settings(env, environ={}).http.trusted_proxies == ("10.0.0.0/8", "::1/128", "192.168.0.1/32")
    env.write_text("HTTP_TRUSTED_PROXIES=10.0.0.0/8,proxy.example\n")
    with pytest.raises(ConfigError) as info:
        load_settings(env, environ={})
    assert info.value.variable == "HTTP_TRUSTED_PROXIES" and "proxy.example" in str(info.value)
