"""Backoff: growth, bounds, jitter, reset, and timing on a virtual clock."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import trio

from gateway.backoff import Backoff


def test_delays_grow_within_bounds() -> None:
    b = Backoff(0.5, 30, rng=random.Random(1))
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for ceiling in ceilings:
        d = b.next()
        assert 0.5 <= d <= ceiling
    assert b.attempt == len(ceilings)


def test_full_jitter_spreads_the_delays() -> None:
    b = Backoff(1, 64, rng=random.Random(7))
    for _ in range(6):
        b.next()
    samples = []
    for _ in range(200):
        samples.append(b.next())
    assert min(samples) < 10 and max(samples) > 50  # spread over [1, 64], not a fixed step


def test_seeded_rng_is_deterministic() -> None:
    a = Backoff(0.1, 5, rng=random.Random(42))
    b = Backoff(0.1, 5, rng=random.Random(42))
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


def test_reset_starts_over() -> None:
    b = Backoff(1, 100, rng=random.Random(3))
    for _ in range(10):
        b.next()
    b.reset()
    assert b.attempt == 0
    assert b.next() == 1.0  # the first delay is exactly min


def test_never_overflows() -> None:
    b = Backoff(0.001, 2.0, factor=10.0)
    for _ in range(5000):
        assert b.next() <= 2.0


def test_factor_one_is_constant() -> None:
    b = Backoff(2, 2, factor=1.0)
    assert [b.next() for _ in range(3)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(("lo", "hi", "factor"), [(0, 1, 2.0), (2, 1, 2.0), (-1, 1, 2.0), (1, 2, 0.5)])
def test_bad_arguments(lo: float, hi: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(lo, hi, factor=factor)


async def test_retry_loop_timing_on_virtual_clock(autojump_clock: trio.testing.MockClock) -> None:
    """A retry loop sleeping Backoff delays waits between the floor and the growing ceiling."""
    b = Backoff(0.5, 4, rng=random.Random(5))
    attempts: list[float] = []
    start = trio.current_time()
    for _ in range(8):
        attempts.append(trio.current_time() - start)
        await trio.sleep(b.next())
    gaps = [y - x for x, y in itertools.pairwise(attempts)]
    for gap, ceiling in zip(gaps, [0.5, 1, 2, 4, 4, 4, 4], strict=True):
        assert 0.5 - 1e-9 <= gap <= ceiling + 1e-9
    assert trio.current_time() - start <= 0.5 + 1 + 2 + 4 * 5 + 1e-9


@pytest.mark.parametrize(
    ("jitter", "low"), [("floor", lambda c: 0.5), ("equal", lambda c: c / 2), ("full", lambda c: 0.0)]
)
def test_jitter_modes_and_delay_by_attempt(jitter: Any, low: Any) -> None:
    """``delay(n)`` draws from the mode's range under attempt n's ceiling; ``next`` follows it."""
    b = Backoff(0.5, 8, jitter=jitter, rng=random.Random(11))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (4, 8.0), (10, 8.0), (10**6, 8.0)]:
        assert b.ceiling(attempt) == ceiling
        samples = [b.delay(attempt) for _ in range(200)]
        assert all(low(ceiling) <= d <= ceiling for d in samples)
        assert max(samples) - min(samples) >= (ceiling - low(ceiling)) / 2  # really spread
    assert b.attempt == 0  # delay() keeps no count
    assert [round(b.next(), 9) <= c for c in (0.5, 1, 2, 4, 8, 8)] == [True] * 6 and b.attempt == 6
