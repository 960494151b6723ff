"""The restart policy, on Trio's autojump clock: no real sleeping."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from gateway.settings import SupervisorSettings
from gateway.supervisor import Component, Supervisor, restart_backoff

POLICY = SupervisorSettings(RESTART_MIN=1.0, RESTART_MAX=8.0, RESTART_RESET_AFTER=100.0, SHUTDOWN_TIMEOUT=5.0)


class Recorder:
    """Components that record their lifecycle; ``crash_plan`` says when each run crashes."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.live: set[str] = set()
        self.runs: dict[str, int] = {}

    def component(self, name: str, crash_after: Callable[[int], float | None] | None = None) -> Component:
        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            n = self.runs[name] = self.runs.get(name, 0) + 1
            self.live.add(name)
            self.events.append((trio.current_time(), f"start {name}"))
            try:
                task_status.started()
                delay = crash_after(n) if crash_after else None
                if delay is None:
                    await trio.sleep_forever()
                await trio.sleep(delay)
                raise RuntimeError(f"{name} crashed (run {n})")
            finally:
                self.live.discard(name)
                self.events.append((trio.current_time(), f"stop {name}"))

        return Component(name, run)


def test_restart_delay_grows_is_capped_and_jittered() -> None:
    backoff = restart_backoff(POLICY, random.Random(1))
    for attempt, base in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 8.0), (20, 8.0), (500, 8.0)]:
        for _ in range(50):
            d = backoff.delay(attempt)
            assert base / 2 <= d <= base


async def test_crash_restarts_group_with_growing_then_capped_delays(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    # "b" crashes 1 s after every start: consecutive crashes, so delays grow and hit the cap.
    build: Callable[[], Sequence[Component]] = lambda: [  # noqa: E731
        rec.component("a"),
        rec.component("b", lambda n: 1.0),
    ]
    sup = Supervisor(POLICY, build, rng=random.Random(0))
    with caplog.at_level(logging.ERROR, logger="gateway.supervisor"):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(60)
            await sup.stop()
    assert sup.restarts >= 6
    bases = [min(8.0, 2.0**i) for i in range(len(sup.delays))]
    for delay, base in zip(sup.delays, bases, strict=True):
        assert base / 2 <= delay <= base
    assert max(sup.delays) <= 8.0
    # Every crash cancelled its sibling too: "a" was restarted with "b".
    assert sum(1 for _, e in rec.events if e == "start a") in (sup.restarts, sup.restarts + 1)
    assert not rec.live, "no task outlives the supervisor"
    # Each restart is logged with its traceback.
    crash_logs = [r for r in caplog.records if "restarting group" in r.getMessage()]
    assert crash_logs and all(r.exc_info for r in crash_logs)
    assert "b crashed" in caplog.text


async def test_backoff_resets_after_a_healthy_period(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    # Three quick crashes, then one after a long healthy period, then quick again.
    plan = {1: 1.0, 2: 1.0, 3: 1.0, 4: 500.0, 5: 1.0}
    sup = Supervisor(POLICY, lambda: [rec.component("x", lambda n: plan.get(n))], rng=random.Random(3))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(700)
        await sup.stop()
    assert len(sup.delays) == 5
    assert 0.5 <= sup.delays[0] <= 1.0
    assert 1.0 <= sup.delays[1] <= 2.0
    assert 2.0 <= sup.delays[2] <= 4.0
    # Run 4 stayed up 500 s > reset_after: the next delay starts from the minimum again.
    assert 0.5 <= sup.delays[3] <= 1.0
    assert 1.0 <= sup.delays[4] <= 2.0


async def test_ready_only_when_every_component_started(autojump_clock: trio.testing.MockClock) -> None:
    slow_ready = trio.Event()

    async def slow(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(5)
        slow_ready.set()
        task_status.started()
        await trio.sleep_forever()

    rec = Recorder()
    sup = Supervisor(POLICY, lambda: [rec.component("first"), Component("slow", slow), rec.component("last")])
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(sup.run)
        assert slow_ready.is_set()
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert sup.components == ["first", "slow", "last"]
        await sup.stop()


async def test_stop_goes_in_reverse_start_order(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    sup = Supervisor(POLICY, lambda: [rec.component(n) for n in ("store", "ingest", "mqtt", "http")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.stop()
    stops = [e for _, e in rec.events if e.startswith("stop")]
    assert stops == ["stop http", "stop mqtt", "stop ingest", "stop store"]
    assert not rec.live


async def test_stop_is_bounded_when_a_component_ignores_cancel(autojump_clock: trio.testing.MockClock) -> None:
    async def stubborn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1000)  # a cleanup that hangs

    sup = Supervisor(POLICY, lambda: [Component("stubborn", stubborn)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        t0 = trio.current_time()
        with trio.move_on_after(30):
            await sup.stop()
        assert trio.current_time() - t0 == pytest.approx(POLICY.shutdown_timeout)
        nursery.cancel_scope.cancel()


async def test_restart_one_component_in_place(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    sup = Supervisor(POLICY, lambda: [rec.component("a"), rec.component("b")])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sup.restart("b")
        assert not sup.restart("nope")
        await trio.sleep(1)
        await sup.stop()
    names = [e for _, e in rec.events]
    assert names.count("start b") == 2
    assert names.count("start a") == 1
    assert sup.restarts == 0


async def test_component_returning_is_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def quits(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal calls
        calls += 1
        task_status.started()
        await trio.sleep(1)

    sup = Supervisor(POLICY, lambda: [Component("quits", quits)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10)
        await sup.stop()
    assert calls >= 3
    assert sup.restarts >= 2


async def test_crash_during_start_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    attempts = 0

    async def flaky_start(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise OSError("port busy")
        task_status.started()
        await trio.sleep_forever()

    sup = Supervisor(POLICY, lambda: [Component("http", flaky_start)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert attempts == 3
        await sup.stop()


async def test_stop_while_a_component_cannot_finish_starting(autojump_clock: trio.testing.MockClock) -> None:
    """The first start never completes (a store that waits for its database): stop still works,
    the stuck component goes first, then the started ones in reverse order."""
    rec = Recorder()
    stuck_cancelled = trio.Event()

    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.sleep_forever()
        finally:
            rec.events.append((trio.current_time(), "stop stuck"))
            stuck_cancelled.set()

    sup = Supervisor(POLICY, lambda: [rec.component("store"), Component("stuck", never_ready), rec.component("x")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await trio.sleep(60)
        assert not sup.ready.is_set()
        t0 = trio.current_time()
        await sup.stop()
        assert trio.current_time() - t0 < 1
    assert stuck_cancelled.is_set()
    assert [e for _, e in rec.events] == ["start store", "stop stuck", "stop store"]


async def test_stop_while_a_restart_waits_out_its_backoff(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder()
    sup = Supervisor(POLICY, lambda: [rec.component("a", lambda n: 0.5)])
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(0.6)  # crashed; now sleeping before the restart
        assert sup.restarts == 1
        t0 = trio.current_time()
        await sup.stop()
        assert trio.current_time() - t0 < 0.01
    assert sup.restarts == 1
