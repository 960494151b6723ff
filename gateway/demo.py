"""``gateway demo``: the whole gateway on this machine in one command, with nothing to configure.

It starts, each as a child process in a fresh temporary directory:

1. a throwaway broker on a free port: ``mosquitto`` when it is installed, otherwise an embedded
   Python broker (``amqtt``, MQTT 3.1.1, from ``pip install 'gateway[demo]'``);
2. the gateway (``gateway serve``) on SQLite, with its own MQTT client id and its own HTTP port, so
   it never disturbs a gateway already running here, and a read key made for this run only;
3. ``gateway simulate``: a fleet of devices, a share of whose packets are malformed (the reject path
   shows too), in rounds of :data:`ROUND_SECONDS` for as long as the demo runs.

It prints the dashboard's address with the key in it. Ctrl-C (or SIGTERM) stops the children in
reverse order (simulator, gateway, broker), each with SIGTERM and, after :data:`STOP_TIMEOUT`,
SIGKILL, then removes the directory. A child that ends by itself ends the demo, with the tail of its
log, so a broken demo never pretends to run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio

from gateway.apikeys import new_key
from gateway.errors import DemoError

ROUND_SECONDS = 600.0
"""One simulator run: it keeps per-message figures for its summary, so a long demo runs in rounds."""

STOP_TIMEOUT = 10.0
"""Seconds a child has to stop on SIGTERM before it is killed."""

READY_TIMEOUT = 30.0
"""Seconds the broker and the gateway each have to start answering."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``gateway demo`` runs; every field has a default that needs nothing else."""

    devices: int = 20
    rate: float = 10.0
    invalid_ratio: float = 0.05
    http_port: int | None = None
    broker: str = "auto"  # auto | mosquitto | amqtt
    workdir: Path | None = None  # kept after the demo when given


@dataclass
class Child:
    """A child process of the demo and where its output goes."""

    name: str
    process: trio.Process
    log: Path

    def tail(self) -> str:
        """The end of the child's output, for an error message."""
        return _tail(self.log)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a port the kernel picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port or 0))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoError("no free TCP port on 127.0.0.1")  # pragma: no cover - port 0 always binds


def broker_command(kind: str, workdir: Path, port: int) -> tuple[list[str], str]:
    """The command line of the demo broker and the MQTT protocol it speaks.

    ``auto`` takes mosquitto when it is on PATH (or in /usr/sbin, where Debian puts it), otherwise
    amqtt when it is importable. Raises DemoError when the one asked for (or either) is missing.
    """
    mosquitto = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if kind in ("auto", "mosquitto") and mosquitto:
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        return [mosquitto, "-c", str(conf)], "5"
    if kind in ("auto", "amqtt") and importlib.util.find_spec("amqtt") is not None:
        conf = workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        code = "import sys; from amqtt.scripts.broker_script import main; sys.argv[0] = 'amqtt'; main()"
        return [sys.executable, "-c", code, "-c", str(conf)], "3.1.1"
    wanted = "mosquitto" if kind == "mosquitto" else "mosquitto or amqtt"
    raise DemoError(
        f"no MQTT broker for the demo: install {wanted} "
        "(Fedora: dnf install mosquitto; Debian: apt install mosquitto; or pip install 'gateway[demo]')"
    )


def gateway_env(workdir: Path, *, mqtt_port: int, protocol: str, http_port: int, key_entries: Sequence[str]) -> str:
    """The demo gateway's ``.env``: SQLite in ``workdir``, the demo broker, its own client id."""
    lines = {
        "DATABASE_URL": f"sqlite:///{workdir / 'gateway.db'}",
        "MQTT_URL": f"mqtt://127.0.0.1:{mqtt_port}",
        "MQTT_PROTOCOL": protocol,
        "MQTT_CLIENT_ID": f"gateway-demo-{secrets.token_hex(4)}",
        "MQTT_SESSION_EXPIRY": "0",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(http_port),
        "API_KEYS": ",".join(key_entries),
        "LOG_FILE": str(workdir / "gateway.log"),
        "LOG_FORMAT": "text",
    }
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def child_env() -> dict[str, str]:
    """The environment for children: ours without the gateway's own variables (a user's ``MQTT_URL``
    or ``DATABASE_URL`` must not leak into the demo's gateway), and this package importable."""
    prefixes = ("MQTT_", "DATABASE_", "HTTP_", "API_", "LOG_", "RULES_", "PROCESSOR_", "INGEST_", "SECRETS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


@contextlib.asynccontextmanager
async def child(name: str, argv: Sequence[str], workdir: Path, *, cwd: Path | None = None) -> AsyncIterator[Child]:
    """Run ``argv`` for the body; on exit SIGTERM it, and SIGKILL it after :data:`STOP_TIMEOUT`.

    The child gets its own session, so the terminal's Ctrl-C reaches only the demo, which stops the
    children in order instead of all at once.
    """
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd or workdir,
            env=child_env(),
            start_new_session=True,
        )
    try:
        yield Child(name, process, log)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


async def wait_port(port: int, proc: Child, within: float = READY_TIMEOUT) -> None:
    """Until something accepts on 127.0.0.1:``port``; DemoError if ``proc`` ends or time runs out."""
    with trio.move_on_after(within):
        while proc.process.returncode is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
        raise DemoError(f"the {proc.name} ended at start-up:\n{proc.tail()}")
    raise DemoError(f"the {proc.name} did not answer within {within:.0f} s:\n{proc.tail()}")


async def wait_http_ok(port: int, path: str, proc: Child, within: float = READY_TIMEOUT) -> None:
    """Until ``GET path`` answers 200 (the gateway's ``/ping`` says 503 while it starts)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with trio.move_on_after(within):
        while proc.process.returncode is None:
            status = b""
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(request)
                    with trio.move_on_after(2):
                        status = await stream.receive_some(64)
            if status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                return
            await trio.sleep(0.1)
        raise DemoError(f"the {proc.name} ended at start-up:\n{proc.tail()}")
    raise DemoError(f"the {proc.name} was not ready within {within:.0f} s:\n{proc.tail()}")


async def simulate_rounds(opts: DemoOptions, mqtt_port: int, protocol: str, workdir: Path) -> None:
    """``gateway simulate`` round after round; returns (ending the demo) when a round fails."""
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "simulate",
        f"--url=mqtt://127.0.0.1:{mqtt_port}",
        f"--protocol={protocol}",
        f"--devices={opts.devices}",
        f"--rate={opts.rate}",
        f"--invalid-ratio={opts.invalid_ratio}",
        f"--duration={ROUND_SECONDS}",
        "--device-prefix=demo-",
    ]
    while True:
        async with child("simulator", argv, workdir) as sim:
            await sim.process.wait()
        if sim.process.returncode != 0:
            return


def banner(
    out: TextIO, *, workdir: Path, kept: bool, broker: str, mqtt_port: int, http_port: int, key: str, opts: DemoOptions
) -> None:
    """What is running and where to look."""
    url = f"http://127.0.0.1:{http_port}"
    where = "kept afterwards" if kept else "removed when the demo stops"
    print(
        f"""
gateway demo is running (files in {workdir}, {where}):
  broker     {broker} on mqtt://127.0.0.1:{mqtt_port}
  gateway    SQLite {workdir / "gateway.db"}, API on {url}
  simulator  {opts.devices} devices, {opts.rate:g} msg/s, {opts.invalid_ratio:.0%} malformed (rejects)

  Dashboard  {url}/#key={key}
             (a read key made for this run only; it is in the link, nothing to type)
  API        curl -H 'X-API-Key: {key}' '{url}/api/v1/messages?limit=5'
  Docs       {url}/docs

Ctrl-C stops everything.""",
        file=out,
        flush=True,
    )


async def demo(
    opts: DemoOptions, *, out: TextIO = sys.stdout, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the demo until Ctrl-C/SIGTERM or until a child ends; reports the dashboard URL as
    started. Raises DemoError when something cannot start."""
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        mqtt_port = free_port()
        http_port = free_port(opts.http_port or 8080)
        broker_argv, protocol = broker_command(opts.broker, workdir, mqtt_port)
        key, entry = new_key("demo", "read")
        (workdir / ".env").write_text(
            gateway_env(workdir, mqtt_port=mqtt_port, protocol=protocol, http_port=http_port, key_entries=[entry])
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with contextlib.AsyncExitStack() as stack:
                broker = await stack.enter_async_context(child("broker", broker_argv, workdir))
                await wait_port(mqtt_port, broker)
                gateway_argv = [sys.executable, "-m", "gateway", "serve", "--env-file", str(workdir / ".env")]
                gateway = await stack.enter_async_context(child("gateway", gateway_argv, workdir))
                await wait_http_ok(http_port, "/api/v1/ping", gateway)
                name = Path(broker_argv[0]).name if protocol == "5" else "amqtt (MQTT 3.1.1)"
                banner(
                    out,
                    workdir=workdir,
                    kept=opts.workdir is not None,
                    broker=name,
                    mqtt_port=mqtt_port,
                    http_port=http_port,
                    key=key,
                    opts=opts,
                )
                task_status.started(f"http://127.0.0.1:{http_port}/#key={key}")
                ended = await _until_one_ends([broker, gateway], signals, opts, mqtt_port, protocol, workdir, out)
            if ended:
                name, tail = ended
                raise DemoError(f"the {name} stopped; the demo ends:\n{tail}")
    finally:
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


async def _until_one_ends(
    children: list[Child],
    signals: AsyncIterator[int],
    opts: DemoOptions,
    mqtt_port: int,
    protocol: str,
    workdir: Path,
    out: TextIO,
) -> tuple[str, str] | None:
    """Run the simulator rounds until Ctrl-C/SIGTERM (returns None) or until a child or the
    simulator ends by itself (returns its name and the end of its log)."""
    ended: list[tuple[str, str]] = []
    async with trio.open_nursery() as nursery:

        async def watch(c: Child) -> None:
            await c.process.wait()
            ended.append((c.name, c.tail()))
            nursery.cancel_scope.cancel()

        async def on_signal() -> None:
            async for _ in signals:
                print("\nstopping the demo…", file=out, flush=True)
                nursery.cancel_scope.cancel()

        async def simulator() -> None:
            await simulate_rounds(opts, mqtt_port, protocol, workdir)
            ended.append(("simulator", _tail(workdir / "simulator.log")))
            nursery.cancel_scope.cancel()

        for c in children:
            nursery.start_soon(watch, c)
        nursery.start_soon(on_signal)
        nursery.start_soon(simulator)
    return ended[0] if ended else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``gateway demo`` options to ``parser`` (all optional)."""
    d = DemoOptions()
    parser.add_argument("--devices", type=int, default=d.devices, help=f"virtual sensors ({d.devices})")
    parser.add_argument("--rate", type=float, default=d.rate, help=f"messages/s in total ({d.rate:g})")
    parser.add_argument(
        "--invalid-ratio", type=float, default=d.invalid_ratio, help=f"share of malformed packets ({d.invalid_ratio})"
    )
    parser.add_argument("--http-port", type=int, default=None, help="dashboard/API port (8080 if free, else any)")
    parser.add_argument(
        "--broker", choices=("auto", "mosquitto", "amqtt"), default="auto", help="which broker to start (auto)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the demo's files here (default: a temp dir)")


def main(args: argparse.Namespace) -> int:
    """``gateway demo`` from parsed arguments; returns the exit code."""
    opts = DemoOptions(
        devices=args.devices,
        rate=args.rate,
        invalid_ratio=args.invalid_ratio,
        http_port=args.http_port,
        broker=args.broker,
        workdir=args.workdir,
    )
    try:
        trio.run(demo, opts)
    except DemoError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    return 0
