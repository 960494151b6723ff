"""Measurement helpers shared by scenarios that drive a running gateway."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.harness import PY, ROOT, BenchFailed, Gateway, scrape

STORED = "gateway_messages_stored_total"
REJECTED = "gateway_messages_rejected_total"
PROCESSED = "gateway_processor_processed_total"


async def counter(client: httpx.AsyncClient, gw: Gateway, name: str) -> float:
    """One counter of the gateway (summed over its labels; 0 before its first increment)."""
    return (await scrape(client, gw)).get(name, 0.0)


async def wait_counter(
    client: httpx.AsyncClient,
    gw: Gateway,
    name: str,
    target: float,
    *,
    limit: float,
    interval: float = 0.1,
) -> list[tuple[float, float]]:
    """Poll ``name`` until it reaches ``target`` or ``limit`` s pass; returns (time, value) samples."""
    samples: list[tuple[float, float]] = []
    with trio.move_on_after(limit):
        while True:
            value = await counter(client, gw, name)
            samples.append((time.monotonic(), value))
            if value >= target:
                break
            await trio.sleep(interval)
    return samples


def slope(samples: list[tuple[float, float]], start_value: float, target: float) -> float:
    """Rows per second between the first sample above ``start_value`` and the one reaching ``target``."""
    moving = [s for s in samples if s[1] > start_value]
    if len(moving) < 2:
        return 0.0
    (t0, v0), (t1, v1) = moving[0], moving[-1]
    return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


async def receiver(args: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.receiver ARGS`` to completion; its JSON result."""
    result = await trio.run_process(
        [PY, "-m", "bench.receiver", *args], capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT
    )
    if result.returncode != 0:
        raise BenchFailed(f"receiver failed: {result.stderr.decode()[-2000:]}")
    out: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return out


async def wait_file(path: Path, limit: float = 20.0) -> None:
    """Wait until a helper process says it is ready by creating ``path`` (another process: poll)."""
    with trio.fail_after(limit):
        while not await trio.Path(path).exists():  # another process creates it: nothing to wait on
            await trio.sleep(0.05)


async def json_process(cmd: list[str], *, name: str) -> dict[str, Any]:
    """Run a helper process to completion and return the JSON object on its last stdout line."""
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise BenchFailed(f"{name} failed ({result.returncode}): {result.stderr.decode()[-2000:]}")
    out: dict[str, Any] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return out


def delays_ms(published: dict[tuple[str, int], int], record: Path) -> list[float]:
    """Publish → receipt delays (ms) for every line of a receiver's record file."""
    out: list[float] = []
    if not record.exists():
        return out
    with record.open() as fh:
        for line in fh:
            dev, seq, t = line.split()
            sent = published.get((dev, int(seq)))
            if sent is not None:
                out.append((int(t) - sent) / 1e6)
    return out


async def quiesce(client: httpx.AsyncClient, gw: Gateway, limit: float) -> float:
    """Wait (at most ``limit`` s) until nothing is being stored or processed any more, so one step's
    leftovers do not count for the next. Returns the seconds waited.

    Idle means both counters stood still over half a second (the backlog gauge is refreshed only
    every few seconds, too stale to tell)."""
    t0 = time.monotonic()
    last: tuple[float, float] | None = None
    with trio.move_on_after(limit):
        while True:
            m = await scrape(client, gw)
            now = (m.get(STORED, 0.0), m.get(PROCESSED, 0.0))
            if now == last:
                break
            last = now
            await trio.sleep(0.5)
    return time.monotonic() - t0
