"""Pipeline: a QoS 1 burst end to end, and the gateway's CPU per reading beside a bare paho client's.

One throwaway mosquitto serves every run. Each run starts the real gateway (``gateway serve``, the
default rules: one ``packet`` SSE event and one MQTT publish per reading) on a fresh database, one SSE
client (``curl -N`` on ``/api/v1/events``, counting ``id:`` lines) and one MQTT subscriber
(``mosquitto_sub`` on the publish topic, QoS 1, counting lines), then ``mosquitto_pub -l`` publishes
the burst (QoS 1, the simulator's packets from 100 devices, all on one topic, so
``MQTT_DEVICE_FROM_TOPIC`` is off). Timed from the first publish until the last reading's SSE event
and MQTT publish both arrived (the SSE event is appended in the transaction that marks the reading
processed, so that is also "processed").

CPU comes from ``/proc/<pid>/stat`` (utime + stime, all threads) read before the first publish and
after the last arrival: the gateway's (summed over instances), the broker's, PostgreSQL's (postmaster
and backends) and the load tools' (publisher, SSE client, subscriber and this process's counting).
The load tools are C programs so the load costs little next to what is measured.

The baseline, in the same run on the same broker: a bare paho MQTT 3.1.1 client (``bench.bare_sub``)
receiving the same burst; its CPU µs per message, measured the same way, before and after the gateway
runs. ``ratio`` = gateway CPU per reading / the baseline's mean.

Runs: PostgreSQL and SQLite with one instance; in the full run (or with ``--instances N``) also N
instances on one PostgreSQL with a shared subscription (``MQTT_SHARE_GROUP``), SSE on the first.
Then the stage budget table (:mod:`bench.stages`) on the same PostgreSQL cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion

from bench import stages
from bench.common import PROCESSED, REJECTED, STORED
from bench.cpu import LineCounter, Snapshot, host_seconds, per_item_us, ratio
from bench.harness import (
    PY,
    ROOT,
    BenchFailed,
    Gateway,
    Mosquitto,
    Options,
    Postgres,
    Result,
    scrape,
    table,
    workdir,
)
from gateway.simulate import Fleet

BURST = 20_000
QUICK_BURST = 5_000
TOPIC = "sensors/bench/data"
PUBLISH_TOPIC = "gateway/events"  # the harness's MQTT_PUBLISH_TOPIC; default rules publish on it
PACED_RATE = 1000.0
PACED_SECONDS = 10.0
DUPLICATES = "gateway_messages_duplicate_total"
INGEST_BATCHES = "gateway_ingest_batch_size_count"
PROCESSOR_RUNS = "gateway_processor_run_seconds_count"


def write_burst(path: Path, n: int, prefix: str) -> None:
    """``n`` packets as the firmware sends them (the simulator's shape), one per line."""
    fleet = Fleet(100, seed=11, id_prefix=prefix)
    with path.open("wb") as fh:
        for _ in range(n):
            fh.write(fleet.next_packet().payload + b"\n")


class Tail:
    """A load tool writing to a file whose lines starting with ``prefix`` we count.

    The file, not a pipe: polled every :data:`POLL` s in big reads, counting costs this process
    almost nothing, where reading a pipe would wake it for every SSE write.
    """

    def __init__(self, name: str, cmd: Sequence[str], prefix: bytes, target: int, out: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.out = out
        self.lines = LineCounter(prefix)
        self.target = target
        self.heard = False  # any output at all (the stream is up)
        self.done_at: float | None = None
        self.progress_at = time.monotonic()
        self.pid = 0
        self._offset = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the tool until cancelled (then stop it)."""
        with self.out.open("wb") as fh:
            proc = await trio.lowlevel.open_process(self.cmd, stdout=fh, stderr=subprocess.DEVNULL)
        self.pid = proc.pid
        try:
            task_status.started()
            await proc.wait()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    def poll(self) -> bool:
        """Count what the tool wrote since the last call; True once ``target`` lines arrived."""
        with self.out.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        if data:
            self._offset += len(data)
            self.heard = True
            before = self.lines.count
            if self.lines.feed(data) != before:
                self.progress_at = time.monotonic()
        if self.done_at is None and self.lines.count >= self.target:
            self.done_at = time.monotonic()
        return self.done_at is not None


POLL = 0.05


def _postmaster_pid(pg: Postgres) -> int:
    return int((pg.dir / "postmaster.pid").read_text().split()[0])


def _forget_session(broker: Mosquitto, client_id: str) -> None:
    """Connect once with a clean start, so the stopped gateway's session stops queueing the next bursts."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    with contextlib.suppress(OSError):
        c.connect("127.0.0.1", broker.port, clean_start=True)
        c.loop(1.0)
        c.disconnect()
        c.loop(0.2)


def _run_publisher(cmd: list[str], stdin_path: Path, rate: float | None = None) -> tuple[float, float, int, bytes]:
    """Run ``cmd`` with its stdin from a file (in a worker thread): (seconds, its CPU seconds from
    its rusage, exit code, stderr). With ``rate`` the lines are fed at that many per second."""
    t0 = time.monotonic()
    if rate is None:
        with stdin_path.open("rb") as stdin:
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        lines = stdin_path.read_bytes().splitlines(keepends=True)
        step = max(1, int(rate // 100))  # about 100 writes per second
        for i in range(0, len(lines), step):
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            proc.stdin.write(b"".join(lines[i : i + step]))
            proc.stdin.flush()
        proc.stdin.close()
    # wait4 gives the child's rusage; Popen never reaps it after this.
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr else b""
    return elapsed, usage.ru_utime + usage.ru_stime, proc.returncode, err


async def _publish(broker: Mosquitto, burst: Path, rate: float | None = None) -> tuple[float, float]:
    """``mosquitto_pub -l`` (QoS 1) the burst, as fast as it goes or at ``rate`` msg/s; returns
    (seconds, its CPU seconds)."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", TOPIC, "-l"]
    elapsed, cpu_s, rc, err = await trio.to_thread.run_sync(_run_publisher, cmd, burst, rate)
    if rc != 0:
        raise BenchFailed(f"mosquitto_pub failed ({rc}): {err.decode(errors='replace')[-500:]}")
    return elapsed, cpu_s


async def _wait_all(tails: Sequence[Tail], limit: float, stall: float) -> None:
    """Until every tail reached its target, ``limit`` s passed, or nothing moved for ``stall`` s."""
    with trio.move_on_after(limit):
        while not all([t.poll() for t in tails]):
            if time.monotonic() - max(t.progress_at for t in tails) > stall:
                return
            await trio.sleep(POLL)


async def _probe_subscriber(broker: Mosquitto, sub: Tail) -> None:
    """Publish probe lines on the publish topic until ``mosquitto_sub`` prints one (it is subscribed)."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", PUBLISH_TOPIC, "-m", "probe"]
    with trio.fail_after(20):
        while True:
            await trio.run_process(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with trio.move_on_after(0.5):
                while not (sub.poll() or sub.heard):
                    await trio.sleep(POLL)
            if sub.heard:
                break
    await trio.sleep(0.3)  # a late probe must land before the count starts (probes are not counted anyway)


async def run_gateways(
    d: Path,
    broker: Mosquitto,
    *,
    label: str,
    database_url: str,
    n: int,
    instances: int = 1,
    pg: Postgres | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """One end-to-end burst through ``instances`` gateways on one database (``rate``: paced)."""
    burst = d / f"burst-{label}.txt"
    write_burst(burst, n, f"pl{secrets.token_hex(2)}-")
    extra = {"MQTT_DEVICE_FROM_TOPIC": "false"}
    if instances > 1:
        extra["MQTT_SHARE_GROUP"] = "bench"
    gws = [
        Gateway(d / label / f"gw{i}", database_url=database_url, mqtt_url=broker.url, **extra) for i in range(instances)
    ]
    out: dict[str, Any] = {
        "label": label,
        "backend": "postgres" if pg else "sqlite",
        "instances": instances,
        "burst": n,
        "offered_rate": rate,
    }
    try:
        for gw in gws:  # one after the other: the first applies the migrations
            gw.start()
        out["ready_s"] = [gw.ready_seconds for gw in gws]
        first = gws[0]
        sse = Tail(
            "sse",
            ["curl", "-N", "-s", "-H", f"X-API-Key: {first.key}", first.url + "/api/v1/events"],
            b"id:",
            n,
            d / f"sse-{label}.txt",
        )
        sub = Tail(
            "mqtt",
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", PUBLISH_TOPIC],
            b"{",
            n,
            d / f"mqtt-{label}.txt",
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(sse.run)
            await nursery.start(sub.run)
            with trio.fail_after(20):
                while not (sse.poll() or sse.heard):  # the retry: line: the stream is open
                    await trio.sleep(POLL)
            await _probe_subscriber(broker, sub)
            await trio.sleep(0.5)  # margin (the SSE stream subscribes before retry: goes out)
            groups: dict[str, list[int]] = {
                "gateway": [gw.proc.pid for gw in gws if gw.proc],
                "broker": [broker.proc.pid] if broker.proc else [],
                "sse_client": [sse.pid],
                "mqtt_subscriber": [sub.pid],
            }
            for i, gw in enumerate(gws):
                if gw.proc:
                    groups[f"gateway{i}"] = [gw.proc.pid]
            if pg is not None:
                groups["database"] = [_postmaster_pid(pg)]
            out["loadavg_start"] = os.getloadavg()
            before = Snapshot.take(groups, trees=["database"], kernel=["gateway"])
            host0 = host_seconds()
            self0 = time.process_time()
            t0 = time.monotonic()
            pub_s, pub_cpu = await _publish(broker, burst, rate)
            await _wait_all([sse, sub], limit=60 + n / 200 + (n / rate if rate else 0), stall=30)
            t1 = time.monotonic()
            spent = Snapshot.take(groups, trees=["database"], kernel=["gateway"]).since(before)
            host1 = host_seconds()
            spent["publisher"] = pub_cpu
            spent["bench_counting"] = time.process_time() - self0
            out["loadavg_end"] = os.getloadavg()
            nursery.cancel_scope.cancel()
        async with httpx.AsyncClient() as client:
            metrics = [await scrape(client, gw) for gw in gws]
    finally:
        for gw in gws:
            gw.stop()
            _forget_session(broker, gw.client_id)
    ends = [t.done_at for t in (sse, sub)]
    finished = max(e for e in ends if e is not None) if all(ends) else t1
    wall = finished - t0
    received = min(sse.lines.count, sub.lines.count)
    if not received:
        raise BenchFailed(f"{label}: nothing arrived at the SSE client or the subscriber: {gws[0].log_tail()}")
    load = spent["publisher"] + spent["sse_client"] + spent["mqtt_subscriber"] + spent["bench_counting"]
    out.update(
        {
            "complete": all(ends),
            "sse_received": sse.lines.count,
            "mqtt_received": sub.lines.count,
            "publish_s": pub_s,
            "publish_rate": n / pub_s if pub_s else None,
            "wall_s": wall,
            "rate": received / wall if wall else None,
            "cpu_s": spent,
            "gateway_cpu_us": per_item_us(spent["gateway"], received),
            "instance_cpu_us": [per_item_us(spent[f"gateway{i}"], received) for i in range(instances)],
            "broker_cpu_us": per_item_us(spent["broker"], received),
            "database_cpu_us": per_item_us(spent["database"], received) if "database" in spent else None,
            "load_cpu_us": per_item_us(load, received),
            "gateway_cores": spent["gateway"] / wall if wall else None,
            # Kernel time (syscalls, socket wake-ups): a large share means round trips, not Python.
            "gateway_sys_share": spent["gateway_sys"] / spent["gateway"] if spent["gateway"] else None,
            # The whole machine's busy share meanwhile (other work on the host shows here).
            "host_busy": (host1[0] - host0[0]) / (host1[1] - host0[1]) if host1[1] > host0[1] else None,
            "other_cores": _others(spent, host1[0] - host0[0], wall),
            "stored": sum(m.get(STORED, 0.0) for m in metrics),
            "duplicates": sum(m.get(DUPLICATES, 0.0) for m in metrics),
            "rejected": sum(m.get(REJECTED, 0.0) for m in metrics),
            "processed": sum(m.get(PROCESSED, 0.0) for m in metrics),
            # Batch sizes explain most of the spread in CPU per reading: a gateway that falls behind
            # works on bigger batches and pays less per reading.
            "ingest_batches": sum(m.get(INGEST_BATCHES, 0.0) for m in metrics),
            "processor_runs": sum(m.get(PROCESSOR_RUNS, 0.0) for m in metrics),
        }
    )
    return out


async def run_bare(d: Path, broker: Mosquitto, n: int, tag: str, protocol: str = "3.1.1") -> dict[str, Any]:
    """The baseline: ``bench.bare_sub`` receiving the same burst on the same broker."""
    burst = d / f"burst-bare-{tag}.txt"
    write_burst(burst, n, f"bare{secrets.token_hex(2)}-")
    ready = d / f"bare-{tag}.ready"
    cmd = [PY, "-m", "bench.bare_sub", "--port", str(broker.port), "--expect", str(n), "--ready-file", str(ready)]
    cmd += ["--protocol", protocol]
    proc = await trio.lowlevel.open_process(
        cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        with trio.fail_after(20):
            while not ready.exists():  # another process creates it: poll
                await trio.sleep(0.05)
        groups = {"bare": [proc.pid], "broker": [broker.proc.pid] if broker.proc else []}
        before = Snapshot.take(groups)
        t0 = time.monotonic()
        pub_s, pub_cpu = await _publish(broker, burst)
        line = b""
        with trio.move_on_after(60 + n / 1000):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    break
                line += chunk
        spent = Snapshot.take(groups).since(before)
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await proc.stdin.aclose()
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if not line.strip():
        raise BenchFailed(f"the bare paho client did not receive {n} messages")
    got = json.loads(line)
    wall = got["last"] - t0
    return {
        "tag": tag,
        "protocol": protocol,
        "received": got["received"],
        "wall_s": wall,
        "rate": got["received"] / wall if wall > 0 else None,
        "publish_s": pub_s,
        "publisher_cpu_s": pub_cpu,
        "cpu_s": spent,
        "cpu_us": per_item_us(spent["bare"], got["received"]),
        "broker_cpu_us": per_item_us(spent["broker"], got["received"]),
    }


def _others(spent: dict[str, float], busy: float, wall: float) -> float | None:
    """Cores busy with anything this run did not start (other work on the host) during the burst."""
    # gateway0.. and gateway_sys are inside "gateway"
    ours = sum(v for k, v in spent.items() if not k[-1].isdigit() and not k.endswith("_sys"))
    return max(0.0, busy - ours) / wall if wall else None


def _mean_batch(items: float, batches: float | None) -> float | None:
    return items / batches if batches else None


def pipeline_table(runs: list[dict[str, Any]], bare: list[dict[str, Any]], n: int) -> str:
    """The end-to-end table: one row per gateway run and per baseline, with the ratio to the baseline."""
    base = [b["cpu_us"] for b in bare if b["cpu_us"] is not None]
    base_us = sum(base) / len(base) if base else None
    rows: list[list[Any]] = []
    for r in runs:
        name = f"{r['backend']}, {r['instances']} instance{'s' if r['instances'] > 1 else ''}"
        if r.get("offered_rate"):
            name += f", paced {r['offered_rate']:,.0f}/s"
        got = f"{min(r['sse_received'], r['mqtt_received']):,}/{r['burst']:,}"
        per = "" if r["instances"] == 1 else " (" + " + ".join(f"{u:.0f}" for u in r["instance_cpu_us"] if u) + ")"
        rows.append(
            [
                name,
                got,
                r["wall_s"],
                r["rate"],
                f"{r['gateway_cpu_us']:.0f}{per}",
                ratio(r["gateway_cpu_us"], base_us),
                r["gateway_cores"],
                None if r.get("gateway_sys_share") is None else f"{r['gateway_sys_share']:.0%}",
                r.get("other_cores"),
                r["broker_cpu_us"],
                r["database_cpu_us"],
                r["load_cpu_us"],
                _mean_batch(r.get("stored", 0.0), r.get("ingest_batches")),
                _mean_batch(r.get("processed", 0.0), r.get("processor_runs")),
            ]
        )
    for b in bare:
        rows.append(
            [
                f"bare paho 3.1.1 ({b['tag']})",
                f"{b['received']:,}/{n:,}",
                b["wall_s"],
                b["rate"],
                f"{b['cpu_us']:.0f}",
                ratio(b["cpu_us"], base_us),
                None,
                None,
                None,
                b["broker_cpu_us"],
                None,
                per_item_us(b["publisher_cpu_s"], b["received"]),
                None,
                None,
            ]
        )
    return table(
        f"pipeline: {n:,}-message QoS 1 burst, default rules, 1 SSE client + 1 MQTT subscriber"
        " (CPU in µs per reading; ratio = gateway CPU / bare paho CPU)",
        [
            "run",
            "arrived",
            "wall s",
            "msg/s",
            "gateway CPU µs",
            "ratio",
            "cores",
            "sys",
            "others' cores",
            "broker µs",
            "db µs",
            "load µs",
            "ingest batch",
            "proc batch",
        ],
        rows,
    )


async def run(opts: Options) -> Result:
    missing = [tool for tool in ("mosquitto_pub", "mosquitto_sub", "curl") if shutil.which(tool) is None]
    if missing:
        raise BenchFailed(f"pipeline needs {', '.join(missing)} on PATH (Debian: mosquitto-clients, curl)")
    res = Result("pipeline")
    n = opts.burst or (QUICK_BURST if opts.quick else BURST)
    instances = opts.instances if opts.instances is not None else (1 if opts.quick else 2)
    # A paced run shows the per-batch costs a burst hides (a gateway that keeps up works on small batches).
    pace = opts.rate if opts.rate is not None else (None if opts.quick else PACED_RATE)
    paced_n = min(n, round(pace * PACED_SECONDS)) if pace else 0
    runs: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    stage_data: dict[str, Any] = {}
    with workdir("pipeline") as d, Mosquitto(d) as broker:
        bare.append(await run_bare(d, broker, n, "before"))
        with Postgres(d) as pg:
            runs.append(await run_gateways(d, broker, label="postgres", database_url=pg.dsn, n=n, pg=pg))
        runs.append(await run_gateways(d, broker, label="sqlite", database_url=f"sqlite:///{d}/pipeline.db", n=n))
        if pace:
            with Postgres(d / "paced") as pg:
                runs.append(
                    await run_gateways(
                        d, broker, label="postgres-paced", database_url=pg.dsn, n=paced_n, pg=pg, rate=pace
                    )
                )
        if instances > 1:
            with Postgres(d / "shared") as pg:
                runs.append(
                    await run_gateways(
                        d, broker, label=f"postgres-x{instances}", database_url=pg.dsn, n=n, instances=instances, pg=pg
                    )
                )
        bare.append(await run_bare(d, broker, n, "after"))
        with Postgres(d / "stages") as pg:
            stage_data = await stages.measure(pg_url=pg.dsn, sqlite_dir=d, quick=opts.quick)
    base = [b["cpu_us"] for b in bare if b["cpu_us"] is not None]
    base_us = sum(base) / len(base) if base else None
    for r in runs:
        r["ratio_to_bare"] = ratio(r["gateway_cpu_us"], base_us)
    res.data = {"burst": n, "bare_cpu_us": base_us, "runs": runs, "bare": bare, "stages": stage_data}
    res.tables.append(pipeline_table(runs, bare, n))
    res.tables.append(stages.stage_table(stage_data))
    return res
