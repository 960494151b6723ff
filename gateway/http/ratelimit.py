"""Per-client token buckets, and who the client is.

Written here rather than using quart-rate-limiter, whose 429 carries ``Retry-After`` twice
(FACTS.md). Limits are passed on every call so a reload changes them live.

- An API key has its own bucket. Keys come from the configuration, so that table is bounded by it
  and nothing anonymous traffic does can evict a key's bucket.
- Anonymous clients have one bucket per address, an IPv6 client per /64 (one host or household
  usually owns a whole /64). That table holds at most ``max_addresses`` entries in least-recently-
  used order. Only a bucket that has refilled completely is forgotten: it behaves exactly like a new
  one, so no client can reset its own bucket (or anyone's) by cycling addresses. Eviction looks at
  the oldest entry only, so a check costs O(1) however many addresses there are.
- When every address in the table was active within one period (a flood from more addresses than the
  table holds), new addresses share one overflow bucket until old ones refill: the flood is limited as
  a whole, known clients keep their own buckets, and keyed clients are not affected.
- The address is the TCP peer's. Only when the peer is a trusted proxy (``HTTP_TRUSTED_PROXIES``) is
  ``X-Forwarded-For`` read: the client is the rightmost address there that is not a trusted proxy
  (everything left of it was written by the client itself and may be forged).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# (tokens left, monotonic time of the last check)
_State = tuple[float, float]


MAX_ADDRESSES = 50_000  # anonymous buckets held (about 10 MB)


class RateLimiter:
    """``count`` requests per ``period`` seconds per key or client address, with bursts up to ``count``."""

    def __init__(self, *, max_addresses: int | None = None) -> None:
        self.max_addresses = MAX_ADDRESSES if max_addresses is None else max_addresses
        self._limit: tuple[int, float] | None = None
        self._keys: dict[str, _State] = {}
        self._addresses: OrderedDict[str, _State] = OrderedDict()
        self._overflow: _State | None = None

    @property
    def addresses(self) -> int:
        """How many anonymous address buckets are held."""
        return len(self._addresses)

    def check_key(self, name: str, count: int, period: float, now: float | None = None) -> float:
        """Take one token for API key ``name``. Returns 0 when allowed, else seconds until one is free."""
        now = self._now(count, period, now)
        state, wait = _take(self._keys.get(name, (float(count), now)), count, count / period, now)
        self._keys[name] = state
        return wait

    def check_address(self, address: str, count: int, period: float, now: float | None = None) -> float:
        """Take one token for an anonymous client (see :func:`address_bucket`). Same result as
        :meth:`check_key`."""
        now = self._now(count, period, now)
        rate = count / period
        table = self._addresses
        state = table.get(address)
        if state is not None:
            table.move_to_end(address)
        else:
            if len(table) >= self.max_addresses:
                oldest, (tokens, last) = next(iter(table.items()))
                if tokens + (now - last) * rate >= count:  # refilled: forgetting it changes nothing
                    del table[oldest]
            if len(table) >= self.max_addresses:
                self._overflow, wait = _take(self._overflow or (float(count), now), count, rate, now)
                return wait
            state = (float(count), now)
        table[address], wait = _take(state, count, rate, now)
        return wait

    def _now(self, count: int, period: float, now: float | None) -> float:
        if (count, period) != self._limit:
            # A new limit (reload) starts everyone with a full bucket.
            self._limit = (count, period)
            self._keys.clear()
            self._addresses.clear()
            self._overflow = None
        return time.monotonic() if now is None else now


def _take(state: _State, count: int, rate: float, now: float) -> tuple[_State, float]:
    tokens, last = state
    tokens = min(float(count), tokens + (now - last) * rate)
    if tokens >= 1.0:
        return (tokens - 1.0, now), 0.0
    return (tokens, now), (1.0 - tokens) / rate


def retry_after_header(wait: float) -> str:
    """``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))


@lru_cache(maxsize=8)
def parse_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """``HTTP_TRUSTED_PROXIES`` entries as networks (cached: called per request)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _parse(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the rightmost
    ``X-Forwarded-For`` hop that is not one (all headers of that name, in order).

    A malformed hop ends the walk at the trusted proxy that passed it on; when every hop is
    trusted the leftmost one is the client.
    """
    peer_address = _parse(peer) if peer else None
    if peer_address is None:
        return peer or "unknown"
    if not trusted or not _trusted(peer_address, trusted):
        return str(peer_address)
    client = peer_address
    hops = [h for header in forwarded_for for h in header.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break
        client = address
        if not _trusted(address, trusted):
            break
    return str(client)


def address_bucket(address: str) -> str:
    """The anonymous bucket an address counts against: itself for IPv4, its /64 for IPv6."""
    parsed = _parse(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed) if parsed is not None else address
